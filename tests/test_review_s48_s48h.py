"""Review s48h (issue 9, trust): unusual but valid inputs of the public entry points."""

from __future__ import annotations

import pytest
import torch

from innerloop.models import build_model
from innerloop.train.module import load_module, save_model_checkpoint

SMALL_ATTENTION = {
    "vocab_size": 256,
    "hidden_size": 16,
    "num_layers": 1,
    "num_heads": 2,
    "mixer": "attention",
}


def test_save_model_checkpoint_keeps_float32_weights_of_a_bfloat16_model(tmp_path):
    """A bfloat16 model whose norms are kept in float32 (a common mixed-precision recipe, and it runs):
    save_model_checkpoint cast every parameter to the first one's dtype, so the float32 norms were
    silently rounded to bfloat16 in the file. Every stored weight must load back exactly."""
    model = _bfloat16_model_with_float32_norms()
    loaded = load_module(save_model_checkpoint(model, tmp_path / "mixed.safetensors")).model
    stored = loaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(stored[key].to(value.dtype), value), key
        assert torch.equal(stored[key].double(), value.double()), f"{key} was rounded when saved"


def _bfloat16_model_with_float32_norms() -> torch.nn.Module:
    """A small attention model in bfloat16 whose RMSNorms are float32 with trained (not all-one) weights."""
    torch.manual_seed(0)
    model = build_model(SMALL_ATTENTION).bfloat16().eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("norm"):
                module.float()
                module.weight.copy_(1 + 0.1 * torch.randn_like(module.weight))
    return model


@pytest.mark.slow  # an export and a from_pretrained: about 1 s
def test_an_export_of_a_model_of_several_dtypes_loads_with_every_weight_unrounded(tmp_path):
    """Exported as it was, a bfloat16 model with float32 norms recorded bfloat16 in config.json, so
    from_pretrained (default or dtype='auto') cast the float32 norms to bfloat16: silently other weights.
    The export stores such a model in the widest of its dtypes, which loads back exactly."""
    from transformers import AutoModelForCausalLM

    from innerloop.hf.export import export_model

    model = _bfloat16_model_with_float32_norms()
    export_model(model, tmp_path / "export")
    for dtype in (None, "auto"):
        loaded = AutoModelForCausalLM.from_pretrained(
            tmp_path / "export", **({} if dtype is None else {"dtype": dtype})
        )
        stored = loaded.model.state_dict()
        for key, value in model.state_dict().items():
            assert torch.equal(stored[key].double(), value.double()), f"{key} was rounded (dtype={dtype})"
