"""Review s57j: innerloop's LightningModule under a user's own Lightning Trainer."""

from __future__ import annotations

import pytest
import torch

from innerloop.models import ModelConfig
from innerloop.train import LanguageModelModule

CONFIG = ModelConfig(hidden_size=16, num_heads=2, num_layers=1, intermediate_size=16, vocab_size=32)


@pytest.mark.slow  # torch.compile's first call imports torch._dynamo: seconds
def test_a_module_whose_model_is_compiled_saves_and_loads_the_uncompiled_names():
    """``module.model = torch.compile(module.model)`` (compiling the LightningModule itself fails in
    Lightning's ``self.log``) wrote checkpoints whose weights were named ``model._orig_mod.*``: no
    uncompiled module, ``innerloop eval`` or ``load_from_checkpoint`` could read them. The names are the
    uncompiled model's, and such weights load back into a compiled one (a resume)."""
    torch.manual_seed(0)
    plain = LanguageModelModule(CONFIG)
    compiled = LanguageModelModule(CONFIG)
    compiled.model = torch.compile(compiled.model)  # lazy: nothing compiles until a forward
    assert list(compiled.state_dict()) == list(plain.state_dict())
    compiled.load_state_dict(plain.state_dict())  # a resume into a compiled model
    for name, value in plain.state_dict().items():
        assert torch.equal(compiled.state_dict()[name], value), name
