"""Review s48h (issue 9, trust): unusual but valid inputs of the public entry points."""

from __future__ import annotations

import torch

from innerloop.models import build_model
from innerloop.train.module import load_module, save_model_checkpoint

SMALL_ATTENTION = {"vocab_size": 32, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "mixer": "attention"}


def test_save_model_checkpoint_keeps_float32_weights_of_a_bfloat16_model(tmp_path):
    """A bfloat16 model whose norms are kept in float32 (a common mixed-precision recipe, and it runs):
    save_model_checkpoint cast every parameter to the first one's dtype, so the float32 norms were
    silently rounded to bfloat16 in the file. Every stored weight must load back exactly."""
    torch.manual_seed(0)
    model = build_model(SMALL_ATTENTION).bfloat16().eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("norm"):
                module.float()
                module.weight.copy_(1 + 0.1 * torch.randn_like(module.weight))
    loaded = load_module(save_model_checkpoint(model, tmp_path / "mixed.safetensors")).model
    stored = loaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(stored[key].to(value.dtype), value), key
        assert torch.equal(stored[key].double(), value.double()), f"{key} was rounded when saved"
