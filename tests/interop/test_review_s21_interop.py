"""Review s21: loading and converting other people's models (ttt-lm-pytorch folders, official TTT-E2E
checkpoints) on unusual and hostile files. Each test is one defect found by the review; while it is
unfixed it is marked ``xfail(strict=True)``. Report: /work/notes/review_s21_interop.md.

Only the repository's own fixtures (tests/data/models, tests/data/e2e) are read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

from innerloop.interop import ttt_e2e, ttt_lm_pytorch

DATA = Path(__file__).parents[1] / "data"
MODELS = DATA / "models"
E2E = DATA / "e2e"
W1 = "language_model.model.h.blocks.feed_forward.w1.weight"


def _reference_folder(tmp_path: Path, name: str, weights: dict, config: dict | None = None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    source = MODELS / "ttt_linear_transformer"
    config = (
        config if config is not None else json.loads((source / "config.json").read_text(encoding="utf-8"))
    )
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file(weights, str(folder / "model.safetensors"))
    return folder


def _reference_weights() -> dict[str, torch.Tensor]:
    return load_file(str(MODELS / "ttt_linear_transformer" / "model.safetensors"))


@pytest.mark.slow  # converts a model, writes and reads a checkpoint (~1 s)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_converted_model_saved_and_loaded_again_is_bit_identical(tmp_path, dtype):
    from innerloop.checkpoints import load_model as load_checkpoint_model
    from innerloop.train.module import save_model_checkpoint

    source = MODELS / "ttt_mlp_mamba"
    folder = tmp_path / "reference"
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    weights = load_file(str(source / "model.safetensors"))
    save_file({k: v.to(dtype) for k, v in weights.items()}, str(folder / "model.safetensors"))
    ids = load_file(str(source / "expected.safetensors"))["input_ids"]

    converted = ttt_lm_pytorch.load_model(folder)
    path = save_model_checkpoint(converted, tmp_path / "out" / "last.safetensors")
    reloaded = load_checkpoint_model(path, keep_dtype=True)  # what the export writes: the stored dtype
    with torch.no_grad():
        before, after = converted(ids)[0], reloaded(ids)[0]
    assert before.dtype == after.dtype == dtype
    assert torch.equal(before, after)


def test_a_float64_value_that_overflows_float32_is_refused():
    arrays = load_numpy(str(E2E / "weights.safetensors"))
    arrays[W1] = arrays[W1].astype(np.float64)
    arrays[W1][0, 0, 0] = 1e39  # finite in float64, inf in float32
    with pytest.raises(ttt_e2e.OfficialConfigError, match=r"w1.* up to 1e\+39 .*beyond float32's largest"):
        ttt_e2e.model_from_arrays(arrays, E2E / "config.json")


def test_bfloat16_torch_tensors_load_or_are_refused_by_name():
    arrays = {
        k: torch.from_numpy(v).to(torch.bfloat16)
        for k, v in load_numpy(str(E2E / "weights.safetensors")).items()
    }
    model = ttt_e2e.model_from_arrays(arrays, E2E / "config.json")  # bf16 widens to float32 exactly
    expected = arrays["language_model.model.wte.weight"].float()
    assert torch.equal(model.embed.weight, expected)


def test_a_binary_config_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\x80\x04\x95binary pickle\x00")
    with pytest.raises(
        ttt_e2e.OfficialConfigError, match=r"config.yaml' cannot be read: it is not UTF-8 text"
    ):
        ttt_e2e.read_config(path)


def test_float8_weights_are_refused_with_one_line(tmp_path):
    weights = {k: v.to(torch.float8_e4m3fn) for k, v in _reference_weights().items()}
    folder = _reference_folder(tmp_path, "fp8", weights)
    with pytest.raises(ValueError, match=r"dtype torch.float8_e4m3fn; the weights are float16, bfloat16"):
        ttt_lm_pytorch.load_model(folder)


def test_an_unknown_buffer_prefixed_key_is_refused(tmp_path):
    weights = {**_reference_weights(), "model.layers.0.seq_modeling_block.buffer.foo": torch.zeros(3)}
    folder = _reference_folder(tmp_path, "extra", weights)
    with pytest.raises(ValueError, match="buffer.foo"):
        ttt_lm_pytorch.load_model(folder)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    weights = _reference_weights()
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(MODELS / "ttt_linear_transformer" / "config.json", folder / "config.json")
    keys = sorted(weights)
    embed = "model.embed_tokens.weight"
    first = {k: weights[k] for k in keys[: len(keys) // 2]} | {embed: weights[embed]}
    second = {k: weights[k] for k in keys[len(keys) // 2 :] if k != embed} | {embed: weights[embed] * 2}
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    save_file(first, str(folder / names[0]))
    save_file(second, str(folder / names[1]))
    weight_map = {k: names[0] for k in first} | {k: names[1] for k in second if k != embed}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map}), encoding="utf-8"
    )
    with pytest.raises(
        ValueError, match=r"holds 'model.embed_tokens.weight', which .* assigns to 'model-00001"
    ):
        ttt_lm_pytorch.load_model(folder)
    weight_map[embed] = names[0]  # and a shard name outside the folder
    weight_map[keys[0]] = "../elsewhere.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        ValueError, match=r"names weight files outside its folder: \['../elsewhere.safetensors'\]"
    ):
        ttt_lm_pytorch.load_model(folder)
