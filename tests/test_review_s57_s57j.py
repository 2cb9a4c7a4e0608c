"""Review s57j: innerloop's LightningModule under a user's own Lightning Trainer."""

from __future__ import annotations

import math
from dataclasses import replace

import lightning as L
import pytest
import torch

from innerloop.models import ModelConfig
from innerloop.train import LanguageModelModule, TextDataModule

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


@pytest.mark.slow  # a 2-step fit (seconds)
def test_trainer_test_on_given_loaders_after_a_fit_with_a_datamodule_of_no_test_split():
    """``trainer.fit(module, datamodule=data)`` then ``trainer.test(module, dataloaders=...)`` (the
    documented way, the DataModules having no test loader) stopped with 'data.test_fraction=0 holds out
    no test text': Lightning keeps the fit's DataModule and calls its ``setup("test")``. The loaders given
    are scored, as ``trainer.validate`` scores them."""
    torch.manual_seed(0)
    module = LanguageModelModule(replace(CONFIG, vocab_size=256), warmup_steps=1, max_steps=2)
    data = TextDataModule(seq_len=16, batch_size=2, val_batches=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, max_epochs=-1, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    loader = data.val_dataloader()
    tested = trainer.test(module, dataloaders=loader, verbose=False)[0]
    validated = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    assert tested["test_loss"] == validated["val_loss"] and math.isfinite(tested["test_loss"])
