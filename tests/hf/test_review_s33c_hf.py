"""Review s33c (transformers integration): ``from_pretrained`` refuses non-finite weights, as innerloop's
own checkpoints (``load_checkpoint``), the reference-model loader and the official TTT-E2E loader do.

A folder saved by ``save_pretrained`` from a diverged model, or edited, loaded silently and every
output was NaN; so did a value past the range of the ``dtype`` asked for (float16's 65504).
"""

from __future__ import annotations

import pytest
import torch
from hf_testing import tiny_hf_model
from safetensors.torch import load_file, save_file

from innerloop.hf import InnerloopForCausalLM


def _save_with(folder, key_part: str, value: float) -> str:
    model = tiny_hf_model("e2e")
    model.save_pretrained(folder)
    path = folder / "model.safetensors"
    weights = load_file(path)
    key = next(k for k in sorted(weights) if key_part in k)
    weights[key].view(-1)[0] = value
    save_file(weights, path, metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_saved_non_finite_weight_is_refused_naming_it(tmp_path, value) -> None:
    key = _save_with(tmp_path, "prime.down_proj", value)
    with pytest.raises(ValueError, match=rf"{key}'? holds 1 NaN/infinite value"):
        InnerloopForCausalLM.from_pretrained(tmp_path)


def test_a_weight_past_the_range_of_the_dtype_asked_for_is_refused(tmp_path) -> None:
    key = _save_with(tmp_path, "embed", 1e6)  # finite in float32, inf in float16
    assert InnerloopForCausalLM.from_pretrained(tmp_path) is not None  # float32: loads
    with pytest.raises(ValueError, match=rf"{key}'? holds 1 NaN/infinite value.*float16"):
        InnerloopForCausalLM.from_pretrained(tmp_path, dtype=torch.float16)
