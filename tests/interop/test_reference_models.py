"""Whole reference models (test-time-training/ttt-lm-pytorch ``TTTForCausalLM``) loaded as CausalLMs.

The fixtures in tests/data/models/ were saved by the reference's ``save_pretrained``; each holds the
reference's own logits for its ``input_ids`` (see the README there).
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from innerloop.interop import ttt_lm_pytorch
from innerloop.interop.ttt_lm_pytorch import MODEL_FIELD_MAP, TTT_CONFIG_FIELDS, load_model

MODELS = Path(__file__).parents[1] / "data" / "models"
FIXTURES = ["ttt_linear_transformer", "ttt_mlp_mamba"]
# The models' README asks 1e-4 of any converter. Measured (review s56e), max-abs on logits up to 2.8
# (one float32 ulp 2.4e-7): float32 2.0e-6 (linear) and 9.5e-7 (mlp); float64 weights 2.7e-6 and 1.2e-6
# (the reference's own float32 rounding); prefill then decode 2.7e-6 and 1.2e-6. 1e-4 was 37x to 105x
# that and let a final RMSNorm eps of 1e-5 for the reference's 1e-6 through (1.7e-5 off).
REFERENCE_LOGITS = 1e-5


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_equal_the_reference_in_float32(name):
    model = load_model(MODELS / name)
    expected = load_file(str(MODELS / name / "expected.safetensors"))
    with torch.no_grad():
        logits, _ = model(expected["input_ids"])
    assert logits.dtype == torch.float32
    assert (logits - expected["logits"]).abs().max().item() < REFERENCE_LOGITS


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_equal_the_reference_in_float64(name):
    """Weights in float64 give the float32 reference's logits to float32 accuracy (the error is the
    reference's rounding, not ours)."""
    model = load_model(MODELS / name).double()
    expected = load_file(str(MODELS / name / "expected.safetensors"))
    with torch.no_grad():
        logits, _ = model(expected["input_ids"])
    assert (logits - expected["logits"].double()).abs().max().item() < REFERENCE_LOGITS


@pytest.mark.parametrize("name", FIXTURES)
def test_prefill_then_decode_equals_one_shot(name):
    model = load_model(MODELS / name)
    ids = load_file(str(MODELS / name / "expected.safetensors"))["input_ids"]
    with torch.no_grad():
        whole, _ = model(ids)
        prefix, state = model(ids[:, :13])  # not a whole number of mini-batches (8)
        pieces = [prefix]
        for t in range(13, ids.shape[1]):
            logits, state = model(ids[:, t : t + 1], state)
            pieces.append(logits)
    assert (torch.cat(pieces, dim=1) - whole).abs().max().item() < REFERENCE_LOGITS


def test_every_reference_config_field_is_mapped_or_refused():
    """Each argument of the reference TTTConfig says what it becomes (a ModelConfig field) or why it
    does not change the logits; a new field cannot slip through unmapped."""
    assert set(MODEL_FIELD_MAP) == set(TTT_CONFIG_FIELDS)
    assert set(ttt_lm_pytorch.MODEL_DEFAULTS) <= set(TTT_CONFIG_FIELDS)


def test_config_fields_reach_the_model():
    """Non-default values of the fields that shape the model land where MODEL_FIELD_MAP says."""
    config = ttt_lm_pytorch.model_config(
        {
            "vocab_size": 77,
            "hidden_size": 48,
            "intermediate_size": 40,
            "num_hidden_layers": 3,
            "num_attention_heads": 3,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "rope_theta": 500.0,
            "use_gate": True,
            "share_qk": False,
            "ttt_layer_type": "mlp",
            "ttt_base_lr": 0.25,
            "mini_batch_size": 5,
            "pre_conv": True,
            "conv_kernel": 3,
            "pad_token_id": 7,
        }
    )
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.padding_id) == (
        77,
        48,
        40,
        7,
    )
    assert (config.num_layers, config.num_heads, config.norm_eps, config.rope_theta) == (3, 3, 1e-5, 500.0)
    assert (config.tie_embeddings, config.pre_conv, config.pre_conv_kernel) == (False, True, 3)
    ttt = config.ttt
    assert (ttt.inner_model, ttt.base_lr, ttt.mini_batch_size, ttt.conv_kernel) == ("mlp", 0.25, 5, 3)
    assert (ttt.use_gate, ttt.share_qk) == (True, False)
    model = ttt_lm_pytorch.CausalLM(config)
    assert model.lm_head.weight is not model.embed.weight
    assert model.blocks[0].pre_conv is not None and model.blocks[0].mixer.use_gate


def test_the_pad_row_takes_no_gradient_from_its_lookup_as_in_the_reference(tmp_path):
    # the reference's nn.Embedding(padding_idx=pad_token_id): fine-tuning a converted model on inputs
    # that hold the pad id must leave that row's gradient to the tied head alone (review s18, reference)
    folder = _copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pad_token_id": 5}))
    model = load_model(folder).double()
    assert model.config.padding_id == 5 and model.embed.padding_idx == 5
    ids = torch.tensor([[5, 1, 5, 2, 3, 5]])
    lookup = torch.autograd.grad(model.embed(ids).square().sum(), model.embed.weight)[0]
    assert lookup[5].abs().max() == 0 and lookup[1].abs().max() > 0
    logits = model(ids)[0]
    whole = torch.autograd.grad(logits.logsumexp(-1).sum(), model.embed.weight)[0]
    assert whole[5].abs().max() > 0  # the tied head's share of the pad row remains, as in the reference


@pytest.mark.parametrize("pad", [[1, 2], 10**6])
def test_a_pad_token_id_the_embedding_cannot_take_is_refused(pad):
    with pytest.raises(ValueError, match=r"'pad_token_id'=.* must be one token id in \[0, vocab_size="):
        ttt_lm_pytorch.model_config({"pad_token_id": pad, "hidden_size": 64, "num_attention_heads": 4})


def test_unsupported_activation_is_refused():
    with pytest.raises(ValueError, match="'hidden_act'='gelu' is not supported"):
        ttt_lm_pytorch.model_config({"hidden_act": "gelu", "hidden_size": 64, "num_attention_heads": 4})


def _copy(tmp_path: Path, name: str = "ttt_linear_transformer") -> Path:
    folder = tmp_path / name
    shutil.copytree(MODELS / name, folder)
    return folder


def _edit_weights(folder: Path, edit) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    edit(weights)
    save_file(weights, str(folder / "model.safetensors"))


def _one_line_error(folder: Path, kind=ValueError) -> str:
    with pytest.raises(kind) as info:
        load_model(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_files_are_named(tmp_path):
    folder = _copy(tmp_path)
    (folder / "model.safetensors").unlink()
    assert "has no model.safetensors" in _one_line_error(folder, FileNotFoundError)
    (folder / "config.json").unlink()
    assert "has no config.json" in _one_line_error(folder, FileNotFoundError)
    assert "is not a folder" in _one_line_error(tmp_path / "absent", FileNotFoundError)


def test_extra_tensor_is_named(tmp_path):
    folder = _copy(tmp_path)
    _edit_weights(folder, lambda w: w.update({"model.layers.0.extra.weight": torch.zeros(3)}))
    assert "unexpected keys ['model.layers.0.extra.weight']" in _one_line_error(folder)


def test_missing_tensor_is_named(tmp_path):
    folder = _copy(tmp_path)
    _edit_weights(folder, lambda w: w.pop("model.layers.1.ffn_norm.weight"))
    assert "missing keys ['model.layers.1.ffn_norm.weight']" in _one_line_error(folder)


def test_wrong_shape_is_named(tmp_path):
    folder = _copy(tmp_path)
    _edit_weights(folder, lambda w: w.update({"model.norm.weight": torch.ones(65)}))
    assert "state_dict['model.norm.weight'] has shape (65,)" in _one_line_error(folder)


def test_untied_config_needs_the_head(tmp_path):
    folder = _copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    assert "missing keys ['lm_head.weight']" in _one_line_error(folder)


def test_untied_head_is_used(tmp_path):
    """An untied head with its own weights gives logits from those weights, not the embedding's."""
    folder = _copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    head = torch.randn(300, 64)
    _edit_weights(folder, lambda w: w.update({"lm_head.weight": head}))
    model = load_model(folder)
    assert torch.equal(model.lm_head.weight, head)
    assert not torch.equal(model.embed.weight, head)


def test_tied_head_that_differs_is_refused(tmp_path):
    folder = _copy(tmp_path)
    _edit_weights(folder, lambda w: w.update({"lm_head.weight": torch.zeros(300, 64)}))
    assert "differs from 'model.embed_tokens.weight'" in _one_line_error(folder)


def test_unknown_config_field_is_named(tmp_path):
    folder = _copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "ttt_base_Lr": 1.0}))
    assert "'ttt_base_Lr' -> 'ttt_base_lr'" in _one_line_error(folder)


HEAD_WIDTH_CASES = [
    (64, 3, "does not divide 'hidden_size'=64", "[1, 2, 4, 8, 16, 32]"),
    (72, 8, "splits 'hidden_size'=72 into heads of the odd width 9", "[1, 2, 3, 4, 6, 9, 12, 18, 36]"),
]


@pytest.mark.parametrize(("hidden", "heads", "problem", "valid"), HEAD_WIDTH_CASES)
def test_heads_that_do_not_split_the_width_evenly_name_the_config_json_fields(
    tmp_path, hidden, heads, problem, valid
):
    """The error names the fields of the user's config.json, not innerloop's ModelConfig fields."""
    folder = _copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "hidden_size": hidden, "num_attention_heads": heads})
    )
    message = _one_line_error(folder)
    assert message.startswith(f"config field 'num_attention_heads'={heads} {problem};"), message
    assert f"valid num_attention_heads for hidden_size={hidden}: {valid}" in message
    assert "model." not in message


def test_load_model_is_documented():
    assert inspect.getdoc(load_model)


def _cli(capsys, *args: str) -> tuple[int, str]:
    """Run ``innerloop ARGS`` in this process (the console entry point itself is tested in
    tests/train/test_cli_errors.py); return its exit code and stderr."""
    from innerloop.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


def test_convert_refuses_a_training_runs_folder_even_with_overwrite(tmp_path, capsys):
    # the converted model would sit beside the run's config.yaml, logs and checkpoints (review s18, CLI)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}\n")
    (run / "last.safetensors").write_bytes(b"the run's own")
    code, err = _cli(
        capsys, "convert", "ttt-lm-pytorch", str(MODELS / "ttt_linear_transformer"), str(run), "--overwrite"
    )
    assert code == 2 and "holds a training run (its config.yaml)" in err
    assert (run / "last.safetensors").read_bytes() == b"the run's own"


def test_convert_then_generate(tmp_path, capsys):
    out = tmp_path / "converted"
    code, err = _cli(
        capsys, "convert", "ttt-lm-pytorch", str(MODELS / "ttt_mlp_mamba"), str(out), "--tokenizer", "bytes"
    )
    assert code == 0, err
    from innerloop.train.module import load_model as load_checkpoint_model

    converted = load_checkpoint_model(out / "last.safetensors")
    expected = load_file(str(MODELS / "ttt_mlp_mamba" / "expected.safetensors"))
    with torch.no_grad():
        logits, _ = converted(expected["input_ids"])
    assert (logits - expected["logits"]).abs().max().item() < REFERENCE_LOGITS
    code, err = _cli(capsys, "generate", str(out / "last.safetensors"), "--tokens", "5")
    assert code == 0, err
    code, err = _cli(
        capsys, "convert", "ttt-lm-pytorch", str(MODELS / "ttt_mlp_mamba"), str(out), "--tokenizer", "bytes"
    )
    assert code == 2 and "--overwrite" in err


def test_convert_of_a_broken_folder_is_one_line(tmp_path, capsys):
    code, err = _cli(capsys, "convert", "ttt-lm-pytorch", str(tmp_path), str(tmp_path / "out"))
    assert code == 2
    assert err.count("\n") == 1 and "has no config.json" in err


def test_data_beyond_the_vocabulary_is_refused(tmp_path):
    """A converted model with fewer than 256 tokens cannot read bytes: eval says so."""
    from innerloop.models import CausalLM, ModelConfig
    from innerloop.train.module import save_model_checkpoint
    from innerloop.train.run import evaluate

    model = CausalLM(ModelConfig(vocab_size=100, hidden_size=16, num_layers=1, num_heads=2))
    path = save_model_checkpoint(model, tmp_path / "last.safetensors")
    from innerloop.data.text import DataError

    # DataError, not any Exception (s50d): the type is what makes the CLI say it in one line (exit 2)
    with pytest.raises(DataError, match="vocabulary has 100 tokens"):
        evaluate(path, seq_len=16, batch_size=1, batches=1, progress_bar=False)


@pytest.mark.parametrize(("tp", "field"), [(2, "intermediate_size"), (3, "vocab_size")])
def test_a_pretraining_tp_that_does_not_divide_the_sizes_is_refused(tp, field):
    """The reference drops the remainder of its slices: a model innerloop does not reproduce."""
    config = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 24, "vocab_size": 48}
    config[field] += 1
    with pytest.raises(ValueError, match=rf"'pretraining_tp'={tp} does not divide {field}="):
        ttt_lm_pytorch.model_config({**config, "pretraining_tp": tp})
    config[field] -= 1
    ttt_lm_pytorch.model_config({**config, "pretraining_tp": tp})  # divides both: the same model


def test_swish_is_silu():
    config = {"hidden_size": 16, "num_attention_heads": 2}
    assert ttt_lm_pytorch.model_config({**config, "hidden_act": "swish"}) == ttt_lm_pytorch.model_config(
        config
    )


def test_a_bf16_model_keeps_its_rope_and_token_index_tables_in_float32(tmp_path):
    """As model.to(torch.bfloat16) does (the float32 islands autocast keeps, docs/architecture.md), and as
    the checkpoint and Hugging Face folder that convert writes load again
    (tests/interop/test_review_s21_interop.py: bit-identical logits): one answer per model."""
    folder = _copy(tmp_path)
    _edit_weights(folder, lambda w: w.update({k: v.bfloat16() for k, v in w.items()}))
    model = load_model(folder)
    assert model.embed.weight.dtype == torch.bfloat16
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {torch.float32}
    cast = load_model(_copy(tmp_path / "float32")).to(torch.bfloat16)
    assert {b.dtype for b in cast.buffers() if b.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize("index", ["[1, 2]", '{"weight_map": 3}', "{not json"])
def test_a_malformed_shard_index_is_one_line_naming_it(tmp_path, index):
    folder = _copy(tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(index)
    assert "model.safetensors.index.json" in _one_line_error(folder)
