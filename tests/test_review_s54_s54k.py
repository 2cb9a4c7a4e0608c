"""Review s54k: HF construction and dtype, compare's notes, the testing kit's memo, Triton NaN."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
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


# review s54k (MED, unclear error): a config.json whose dtype (or torch_dtype) is "auto" -- what
# from_pretrained's dtype="auto" means: the weights' own dtype -- or a name torch has no dtype for
# ("float23") failed in transformers' config with "module 'torch' has no attribute 'auto'", naming neither
# the field nor the file. "auto" now means that (the folder loads in its weights' dtype, as one recording
# none does); another name is refused naming the field, the value and the dtypes it may be
@pytest.mark.slow  # a save and five loads: about 1.6 s on a loaded CPU
def test_hf_config_dtype_auto_is_the_weights_dtype_and_another_name_is_refused_clearly(tmp_path) -> None:
    import json

    import torch

    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    model = {"hidden_size": 8, "num_heads": 2, "num_layers": 1, "intermediate_size": 16, "vocab_size": 20}
    torch.manual_seed(0)
    InnerloopForCausalLM(InnerloopConfig(model=model)).double().save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    saved = json.loads(config_path.read_text())
    for field in ("dtype", "torch_dtype"):
        config_path.write_text(
            json.dumps({**{k: v for k, v in saved.items() if k != "dtype"}, field: "auto"})
        )
        loaded = InnerloopForCausalLM.from_pretrained(tmp_path)
        assert loaded.dtype == torch.float64  # as stored, not rounded
    config_path.write_text(json.dumps({**saved, "dtype": "float23"}))
    with pytest.raises(ValueError, match=r"dtype='float23'.*'float32', 'bfloat16'"):
        InnerloopForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"torch_dtype='int8'"):
        InnerloopConfig(model=model, torch_dtype="int8")
