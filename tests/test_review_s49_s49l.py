"""Review s49l: every reference artifact (../shared, and the repository's copies in tests/data) read,
every field compared, every tolerance set by the measured difference.

- The conformance vectors' ``buffer.token_idx``, ``buffer.rotary_emb.inv_freq`` and
  ``input.position_ids`` were read by no test: the layer's token-index and RoPE tables were held to the
  reference's only through outputs at a 1e-5 tolerance, which an inverse frequency rounded otherwise
  (10 of 32 entries one float32 ulp off, angles < 16 rad) does not reach.
- A field added to a regenerated vector could go unread: the keys each vector holds are pinned here
  to the kinds the tests compare.
- The whole reference models were compared by their logits only: their greedy tokens through
  :func:`innerloop.models.generate` (and Hugging Face's ``generate``, tests/hf/test_export.py), and
  their next-token loss (also ``labels=`` of the Hugging Face export) now are, against the reference's
  own logits.
- The repository's copy of the TTT-E2E vectors (tests/data/e2e) was never compared with the shared set
  it was copied from (the conformance and whole-model copies were), nor the official ``param_shapes``
  with :func:`~innerloop.interop.ttt_e2e.expected_shapes`; greedy decoding of the official model is
  now compared with the official logits' argmax.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from core.test_conformance import CASES, PARAMETRIZED_CASES, case_directory

from innerloop.interop.ttt_lm_pytorch import load_layer
from innerloop.interop.ttt_lm_pytorch import load_model as load_reference_model
from innerloop.models import generate

safetensors = pytest.importorskip("safetensors", reason="the reference vectors are safetensors files")
from safetensors.numpy import load_file as load_numpy  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_E2E = SHARED / "e2e" / "ttt_e2e_tiny"
needs_shared_e2e = pytest.mark.skipif(
    not SHARED_E2E.is_dir(), reason="../shared/e2e is not beside this checkout (CI checks the copy)"
)
REFERENCE_MODELS = ["ttt_linear_transformer", "ttt_mlp_mamba"]


# --------------------------------------------------------------------------------------------------
# Conformance vectors: every key read
# --------------------------------------------------------------------------------------------------

#: What each vector holds beside ``param.*`` and ``grad.param.*`` (one per reference parameter, compared
#: in tests/core/test_conformance.py); the test that compares each is named.
COMPARED_KEYS = {
    "input.hidden_states": "the input of every comparison",
    "input.position_ids": "here: 0 .. T-1, the positions the layer takes",
    "output": "tests/core/test_conformance.py, fp32",
    "output_fp64": "tests/core/test_conformance.py, tests/test_review_s47_s47a.py, every path",
    "grad.grad_output": "tests/core/test_conformance.py, the seed of the backward",
    "grad.input.hidden_states": "tests/core/test_conformance.py",
    "intermediate.ttt_output_pre_post_norm": "tests/test_review_s47_s47a.py",
    "intermediate.o_proj_input": "tests/test_review_s47_s47a.py",
    "buffer.token_idx": "here",
    "buffer.rotary_emb.inv_freq": "here",
}
FINAL_STATES = {"linear": ("W1", "b1"), "mlp": ("W1", "b1", "W2", "b2")}  # test_conformance.py


def _vector_keys(directory: Path, name: str) -> list[str]:
    with safetensors.safe_open(str(directory / f"{name}.safetensors"), "pt") as file:
        return list(file.keys())


@pytest.mark.parametrize("name", CASES)
def test_every_tensor_of_every_conformance_vector_is_one_the_tests_compare(request, name):
    keys = _vector_keys(case_directory(request, name), name)
    params = sorted(k.removeprefix("param.") for k in keys if k.startswith("param."))
    assert sorted(k.removeprefix("grad.param.") for k in keys if k.startswith("grad.param.")) == params
    finals = {f"intermediate.final_{w}_states" for w in FINAL_STATES[name.split("_")[0]]}
    rest = {k for k in keys if not k.startswith(("param.", "grad.param."))}
    assert rest == set(COMPARED_KEYS) | finals


@pytest.mark.parametrize("name", PARAMETRIZED_CASES)  # c1/c2 (from ../shared) slow: 0.2 to 1.3 s
def test_the_token_index_and_rope_tables_and_positions_are_the_references(request, name):
    directory = case_directory(request, name)
    meta = json.loads((directory / f"{name}.json").read_text())
    tensors = load_file(str(directory / f"{name}.safetensors"))
    params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    layer = load_layer(meta["layer_config"], params)
    expected_index, expected_inv_freq = tensors["buffer.token_idx"], tensors["buffer.rotary_emb.inv_freq"]
    assert layer.token_idx.dtype == layer.rope_inv_freq.dtype == torch.float32
    assert torch.equal(layer.token_idx, expected_index)  # 1 / (i + 1), bit for bit
    assert torch.equal(layer.rope_inv_freq, expected_inv_freq)
    layer.double()  # the reference's float64 run (output_fp64) cast its float32 tables
    assert torch.equal(layer.token_idx, expected_index.double())
    assert torch.equal(layer.rope_inv_freq, expected_inv_freq.double())
    # The vectors were made at positions 0 .. T-1, the positions a call without a state reads.
    length = tensors["input.hidden_states"].shape[1]
    assert torch.equal(tensors["input.position_ids"], torch.arange(length)[None])


# --------------------------------------------------------------------------------------------------
# Whole reference models: greedy tokens and the loss, through the public API
# --------------------------------------------------------------------------------------------------

LOGIT_TOLERANCE = 1e-4  # the models' README; measured 2.0e-6 (linear) and 9.5e-7 (mlp)
PROMPT_LENGTHS = (1, 7, 8, 9, 13, 37)  # in, at the end of and past mini-batches of 8; the whole input


def _reference(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    expected = load_file(str(DATA / "models" / name / "expected.safetensors"))
    return expected["input_ids"], expected["logits"]


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _assert_greedy_is_decided(logits: torch.Tensor, positions: list[int]) -> None:
    """The reference's top token at ``positions`` leads by far more than the logits' tolerance, so
    that the comparison of tokens is one of models, not of rounding."""
    top = logits[:, positions].topk(2, dim=-1).values
    assert (top[..., 0] - top[..., 1]).min() > 10 * LOGIT_TOLERANCE


@pytest.mark.slow  # 0.5 to 1.5 s a model (six prompts, one token each)
@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_greedy_tokens_and_the_loss_of_each_reference_model_equal_the_references(name):
    ids, logits = _reference(name)
    model = load_reference_model(DATA / "models" / name)
    _assert_greedy_is_decided(logits, [length - 1 for length in PROMPT_LENGTHS])
    for length in PROMPT_LENGTHS:
        tokens, _ = next(iter(generate(model, ids[:, :length], 1, temperature=0)))
        assert torch.equal(tokens, logits[:, length - 1].argmax(-1)), length
    with torch.no_grad():
        ours, _ = model(ids)
    # measured: 0 (linear) and 4.8e-7 (mlp, one float32 ulp of 5.84) against the reference's logits' loss
    assert abs(_next_token_loss(ours, ids) - _next_token_loss(logits, ids)) < 1e-5


# --------------------------------------------------------------------------------------------------
# TTT-E2E: the repository's copy, the official shapes, greedy decoding
# --------------------------------------------------------------------------------------------------


@needs_shared_e2e
def test_the_repository_e2e_vectors_are_the_shared_ones():
    """tests/data/e2e/README.md says what each file is a copy of; each is held to it here."""
    copy = DATA / "e2e"
    for path in (copy / "checkpoint").rglob("*"):
        if path.is_file():
            original = SHARED_E2E / path.relative_to(copy)
            assert path.read_bytes() == original.read_bytes(), path
    assert (copy / "weights.safetensors").read_bytes() == (
        SHARED_E2E / "params_init.safetensors"
    ).read_bytes()
    resolved = json.loads((SHARED_E2E / "fixture.json").read_text())["resolved_config_meta"]
    config = json.loads((copy / "config.json").read_text())
    assert config == {section: resolved[section] for section in ("model", "training")}
    ours, shared = (
        load_numpy(str(copy / "outputs.safetensors")),
        load_numpy(str(SHARED_E2E / "outputs.safetensors")),
    )
    for key in ("input_ids", "target_tokens"):  # from the .npy files (the README says why)
        assert ours[key].dtype == np.int64
        np.testing.assert_array_equal(ours[key], np.load(SHARED_E2E / f"{key}.npy"))
    for key in ("logits_ttt_on", "logits_ttt_off"):
        np.testing.assert_array_equal(ours[key], shared[key])
    for name in ("w1", "w2", "w3"):
        for chunk in (0, 7):
            np.testing.assert_array_equal(
                ours[f"fast_{name}_after_chunk{chunk}"], shared[f"fast_{name}_after_chunk"][:, chunk]
            )
    assert sorted(ours) == sorted(
        ["input_ids", "target_tokens", "logits_ttt_on", "logits_ttt_off"]
        + [f"fast_w{n}_after_chunk{c}" for n in (1, 2, 3) for c in (0, 7)]
    )


@needs_shared_e2e
def test_the_official_parameter_shapes_are_the_expected_shapes():
    from innerloop.interop.ttt_e2e import expected_shapes, model_config

    fixture = json.loads((SHARED_E2E / "fixture.json").read_text())
    official = {name: tuple(shape) for name, (shape, _) in fixture["param_shapes"].items()}
    assert official == expected_shapes(model_config(fixture["resolved_config_meta"]))
    assert {dtype for _, dtype in fixture["param_shapes"].values()} == {"float32"}


@pytest.mark.slow  # 1.5 to 2.5 s (the 4-block model, four prompts)
@pytest.mark.parametrize("test_time_training", [True, False], ids=["ttt_on", "ttt_off"])
def test_greedy_decoding_of_the_official_e2e_model_follows_the_official_logits(test_time_training):
    from innerloop.interop.ttt_e2e import model_from_arrays

    config = json.loads((DATA / "e2e" / "config.json").read_text())
    official = load_numpy(str(DATA / "e2e" / "outputs.safetensors"))
    model = model_from_arrays(
        load_numpy(str(DATA / "e2e" / "weights.safetensors")), config, test_time_training=test_time_training
    )
    ids = torch.from_numpy(official["input_ids"])
    logits = torch.from_numpy(official[f"logits_ttt_{'on' if test_time_training else 'off'}"])
    lengths = (1, 16, 17, 64)  # the first token; the end of chunk 0; into chunk 1 (trained on chunk 0)
    top = logits[:, [n - 1 for n in lengths]].topk(2, dim=-1).values
    assert (top[..., 0] - top[..., 1]).min() > 1e-5  # 7e-7 measured error on the logits
    for length in lengths:
        tokens, _ = next(iter(generate(model, ids[:, :length], 1, temperature=0)))
        assert torch.equal(tokens, logits[:, length - 1].argmax(-1)), length


# --------------------------------------------------------------------------------------------------
# The initial weights of the convs: as each reference draws them
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", ["ttt", "attention", "deltanet"])
def test_the_pre_conv_starts_as_the_reference_leaves_it(mixer):
    """ttt-lm-pytorch's ``_init_weights`` draws only ``nn.Linear`` and ``nn.Embedding``: its pre-conv
    (``Conv``: ``nn.Conv1d`` with bias, depthwise) keeps PyTorch's default, weights and bias uniform in
    +-1/sqrt(kernel) (std 0.29 at kernel 4), as the TTT layer's shared-QK convs do here. innerloop drew
    it from normal(0, init_std) with a zero bias: 14x smaller, a pre-conv that starts almost off."""
    from innerloop.models import CausalLM, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(mixer=mixer, hidden_size=64, num_layers=2, num_heads=4, window=8, pre_conv=True)
    model = CausalLM(config)
    bound = 1 / config.pre_conv_kernel**0.5
    for block in model.blocks:
        conv = block.pre_conv.conv
        for tensor in (conv.weight, conv.bias):
            assert tensor.abs().max() <= bound
            # 256 (weight) and 64 (bias) uniform draws: std within 25% of bound / sqrt(3)
            assert tensor.std().item() == pytest.approx(bound / 3**0.5, rel=0.25)


@pytest.mark.parametrize("mixer", ["linear_attention", "deltanet", "gated_deltanet", "titans"])
def test_the_family_layers_short_convs_start_as_flas_models_draw_them(mixer):
    """FLA's models draw every ``nn.Conv1d`` (its ``ShortConvolution``) from normal(0,
    initializer_range), as their projections (``_init_weights``: ``isinstance(module, (nn.Linear,
    nn.Conv1d))``); innerloop left the family layers' short convs at PyTorch's default (std 0.29 at
    kernel 4, 14x larger)."""
    from innerloop.models import CausalLM, ModelConfig

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(mixer=mixer, hidden_size=64, num_layers=2, num_heads=4))
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv1d) and ".mixer." in n}
    if mixer == "linear_attention":  # FLA's linear attention has no short convs
        assert not convs
        return
    assert len(convs) == 6  # q, k and v of each of the two blocks
    for name, conv in convs.items():
        # 256 normal draws: std within 15% of init_std
        assert conv.weight.std().item() == pytest.approx(model.config.init_std, rel=0.15), name
        assert conv.bias is None
