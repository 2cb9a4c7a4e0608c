"""Review s54 (main session): findings of the session's reviews fixed in the main session."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from torch import nn


def _hparams(lr: float) -> dict:
    """What build_module records for a default OptimConfig at ``lr`` and 100 steps."""
    return {
        "model": {},
        "lr": lr,
        "weight_decay": 0.1,
        "betas": [0.9, 0.95],  # as a checkpoint reads it back: a list
        "warmup_steps": 10,
        "max_steps": 100,
        "min_lr": 1e-5,
        "schedule": "cosine",
        "decay_steps": 0,
    }


# review s54k (found by reading) / main: compare's optimizer notes read the config.yaml beside each
# checkpoint, which is matched to it on model, data and seed only: another run's config.yaml there (same
# model, data and seed, another learning rate) hid a real difference (or made a false one) -> the
# settings are checked against the schedule the checkpoint's module recorded, and a disagreement is named
def test_compare_optimizer_notes_check_the_run_against_what_the_checkpoint_trained_with(monkeypatch) -> None:
    from innerloop.config.schema import OptimConfig
    from innerloop.train import compare as compare_module

    beside = SimpleNamespace(optim=replace(OptimConfig(), lr=3e-3), trainer=SimpleNamespace(max_steps=100))
    monkeypatch.setattr(compare_module, "run_of_checkpoint", lambda path, model: beside)
    modules = {
        name: SimpleNamespace(hparams=_hparams(lr), model=nn.Linear(2, 2))
        for name, lr in [("a", 3e-3), ("b", 1e-2)]
    }
    models = [
        compare_module.ComparedModel(name, Path(f"{name}.safetensors"), module, 6, None, None)
        for name, module in modules.items()
    ]
    assert compare_module.optimizer_notes(models, 0) == [
        "b: the config.yaml beside 'b.safetensors' gives other learning-rate settings than its checkpoint "
        "trained with (lr 0.01 != 0.003): another run's, so its optimizer settings are not compared"
    ]
    # the same run recorded by both: nothing to say
    modules["b"].hparams = _hparams(3e-3)
    assert compare_module.optimizer_notes(models, 0) == []
