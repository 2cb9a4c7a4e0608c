"""Review s51l: the LightningModule as a Lightning user drives it (their own Trainer, data, checkpoints)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from innerloop.train import LanguageModelModule
from tests.trainer_testing import SMALL_MODEL


def _lightning_checkpoint(module: LanguageModelModule, path) -> None:
    """Write ``module`` as ``trainer.save_checkpoint`` writes it without a plugin (a pickled dict)."""
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": L.__version__,
    }
    torch.save(checkpoint, path)


@pytest.mark.slow  # 0.9 s: Lightning's loader
def test_load_from_checkpoint_of_a_64_true_lightning_checkpoint_keeps_its_float64_weights(tmp_path) -> None:
    """A ``64-true`` run of the user's own Trainer (no ``SafetensorsCheckpointIO``) writes a pickled
    checkpoint of float64 weights; ``LanguageModelModule.load_from_checkpoint`` loaded them into the
    float32 module it built, rounding every weight (5.8e-8 measured) without a word, where the same
    weights in innerloop's own format load in float64 (``load_weights``). Both now load them unrounded."""
    torch.manual_seed(0)
    module = LanguageModelModule(SMALL_MODEL, diagnostics_batches=0).double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-3)
    _lightning_checkpoint(module, tmp_path / "run.ckpt")
    loaded = LanguageModelModule.load_from_checkpoint(tmp_path / "run.ckpt")
    for name, weight in module.state_dict().items():
        assert loaded.state_dict()[name].dtype == weight.dtype, name
        assert torch.equal(loaded.state_dict()[name], weight), name
