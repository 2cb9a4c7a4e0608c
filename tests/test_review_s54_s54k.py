"""Review s54k: HF construction and dtype, compare's notes, the testing kit's memo, Triton NaN."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from torch import nn


def _optimizer_notes(monkeypatch, runs: dict, learning_at_test_time: bool = True) -> list[str]:
    """``optimizer_notes`` of models named as ``runs``'s keys (the first the baseline), each trained by
    the run its value describes (``optim`` overrides and ``max_steps``)."""
    from innerloop.config.schema import OptimConfig
    from innerloop.train import compare as compare_module

    built = {
        name: SimpleNamespace(
            optim=replace(OptimConfig(), **{k: v for k, v in run.items() if k != "max_steps"}),
            trainer=SimpleNamespace(max_steps=run.get("max_steps", 100)),
        )
        for name, run in runs.items()
    }
    monkeypatch.setattr(compare_module, "run_of_checkpoint", lambda path, model: built[Path(path).stem])
    monkeypatch.setattr(
        compare_module,
        "modules_learning_at_test_time",
        lambda model: ["mixer"] if learning_at_test_time else [],
    )
    module = SimpleNamespace(hparams={"model": {}}, model=nn.Linear(2, 2))
    models = [compare_module.ComparedModel(n, Path(f"{n}.safetensors"), module, 6, None, None) for n in runs]
    return compare_module.optimizer_notes(models, 0)


# review s54k (MED, false note): optimizer_notes named every optim.* key that differs, also one that acts
# on nothing in either run -- min_lr where both schedules are constant, ttt_base_lr_init where neither
# warms the inner lr up, a warmup_fraction / decay_fraction giving the same whole steps, max_steps under a
# constant schedule -- and so called two identically trained models "also one of training"
def test_compare_optimizer_notes_name_no_setting_that_acts_on_neither_run(monkeypatch) -> None:
    constant = {"schedule": "constant", "warmup_fraction": 0.1}
    runs = {
        "a": constant,
        "b": {**constant, "min_lr": 1e-3},  # a constant schedule never reaches min_lr
        "c": {**constant, "ttt_base_lr_init": 0.5},  # no inner warm-up in either: init unused
        "d": {**constant, "warmup_fraction": 0.105},  # 10 warm-up steps of 100, as 0.1's
        "e": {**constant, "warmup_fraction": 0.05, "max_steps": 200},  # 10 warm-up steps, then lr
        "f": {**constant, "warmup_fraction": 0.2},  # 20 warm-up steps: another lr at steps 10..19
    }
    assert _optimizer_notes(monkeypatch, runs) == [
        "f trained with optim.warmup_fraction=0.2, the baseline a with 0.1: its difference is also one of "
        "training"
    ]
    wsd = {"schedule": "wsd", "max_steps": 4}  # decay over max(1, 0.2 * 4) = 1 step, and 0.25 * 4 = 1
    assert _optimizer_notes(monkeypatch, {"a": wsd, "b": {**wsd, "decay_fraction": 0.25}}) == []
