"""Review s53e: round trips of tiny float64 models (1 layer, 1 head, vocabulary 7) through
``save_pretrained`` / ``innerloop export`` and back: the model read back computes the in-memory model's
logits bit for bit.

Two defects were found this way, each a silent difference of the logits:

- a float64 TTT model cast from float32 (``.double()``, as a ``64-true`` run's is) holds the token index
  ``1 / (i + 1)`` rounded to float32; the folder did not say so, and ``from_pretrained`` made the index
  again in float64 (exact), so the model read back differed (2e-9 with ``inner_norm`` off, 2e-13 with
  it) from the model saved, and from ``load_model`` of the run's checkpoint;
- ``from_pretrained`` left the weights where transformers read them, at addresses not 64-byte aligned,
  and the CPU's matrix products round differently there: a TTT-E2E model's logits differed by 1 ulp.
"""

from __future__ import annotations

import pytest
import torch

from innerloop.hf.export import export_model, to_hugging_face
from innerloop.models import build_model
from innerloop.models.config import ModelConfig
from tests.test_review_s53_s53m import built_in_float64

TINY = {"vocab_size": 7, "num_layers": 1, "num_heads": 1, "intermediate_size": 5, "hidden_size": 6}
IDS = torch.tensor([[3, 1, 4, 1, 5, 2, 6, 5, 3, 0, 2, 1], [2, 6, 5, 3, 0, 1, 1, 4, 6, 2, 0, 5]])


def tiny_float64(seed: int = 0, **model) -> torch.nn.Module:
    """A tiny model of ``model``'s config, built in float32 and cast to float64 (as a ``64-true`` run
    casts it), its matrices scaled by 4 so that its logits are far from uniform."""
    torch.manual_seed(seed)
    built = build_model(ModelConfig.from_dict({**TINY, **model})).double().eval()
    with torch.no_grad():
        for parameter in built.parameters():
            if parameter.dim() >= 2:
                parameter.mul_(4.0)
    return built


def logits(model: torch.nn.Module) -> torch.Tensor:
    """``model``'s logits of :data:`IDS` (an innerloop model or a Hugging Face one)."""
    with torch.no_grad():
        out = model(IDS)
    return out[0] if isinstance(out, tuple) else out.logits


TTT_CONFIGS = {
    "mini_batch_5": {"ttt": {"mini_batch_size": 5}},
    "no_norm_no_residual_untied": {
        "tie_embeddings": False,
        "ttt": {"mini_batch_size": 3, "inner_norm": False, "inner_residual": False},
    },
    "mlp_minibatch_gd": {"ttt": {"inner_model": "mlp", "update_rule": "minibatch_gd", "mini_batch_size": 5}},
}


@pytest.mark.slow  # reason: ~0.5 s: saves and reads back a model with transformers
@pytest.mark.parametrize("name", list(TTT_CONFIGS))
def test_a_float64_ttt_model_cast_from_float32_reads_back_with_its_own_token_index(tmp_path, name):
    from innerloop.hf import InnerloopForCausalLM

    model = tiny_float64(**TTT_CONFIGS[name])
    to_hugging_face(model).save_pretrained(tmp_path)
    loaded = InnerloopForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.model.blocks[0].mixer.token_idx, model.blocks[0].mixer.token_idx)
    assert loaded.dtype == torch.float64
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.slow  # reason: ~0.5 s: saves and reads back a model with transformers
def test_a_ttt_model_built_in_float64_keeps_its_exact_token_index_through_the_folder(tmp_path):
    from innerloop.hf import InnerloopForCausalLM

    model = built_in_float64({**TINY, "ttt": {"mini_batch_size": 3}})
    assert model.blocks[0].mixer.token_idx[2] == 1 / 3  # exact: built in float64
    wrapped = to_hugging_face(model)
    assert torch.equal(wrapped.model.blocks[0].mixer.token_idx, model.blocks[0].mixer.token_idx)
    assert torch.equal(logits(wrapped), logits(model))
    wrapped.save_pretrained(tmp_path)
    loaded = InnerloopForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))


def test_a_recorded_token_index_dtype_other_than_float32_is_refused():
    from innerloop.hf import InnerloopConfig

    with pytest.raises(
        ValueError, match=r"innerloop_token_index_dtype='bfloat16' must be one of 'float32', 'float64'"
    ):
        InnerloopConfig(model=TINY, innerloop_token_index_dtype="bfloat16")


@pytest.mark.slow  # reason: ~1 s: exports and reads back a TTT-E2E model with transformers
def test_an_exported_e2e_model_reads_back_with_aligned_weights_and_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_float64(mixer="e2e", num_layers=2, window=3, e2e={"chunk_size": 5})
    export_model(model, tmp_path / "out", tokenizer=None)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    misaligned = [name for name, tensor in loaded.state_dict().items() if tensor.data_ptr() % 64]
    assert misaligned == []
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.slow  # reason: imports Lightning (load_module), seconds on a cold process; the test ~0.3 s
def test_a_ttt_model_built_in_float64_keeps_its_exact_token_index_through_a_checkpoint(tmp_path):
    from innerloop.checkpoints import load_model
    from innerloop.train.module import load_module, save_model_checkpoint

    model = built_in_float64({**TINY, "ttt": {"mini_batch_size": 3}})
    path = save_model_checkpoint(model, tmp_path / "model.safetensors")
    for loaded in (load_model(path, keep_dtype=True), load_module(path, keep_dtype=True).model):
        assert loaded.blocks[0].mixer.token_idx[2] == 1 / 3
        assert torch.equal(logits(loaded), logits(model))
    cast = tiny_float64(ttt={"mini_batch_size": 3})  # built in float32: the index stays as it was made
    rounded = load_model(save_model_checkpoint(cast, tmp_path / "cast.safetensors"), keep_dtype=True)
    assert torch.equal(rounded.blocks[0].mixer.token_idx, cast.blocks[0].mixer.token_idx)
    assert torch.equal(logits(rounded), logits(cast))
