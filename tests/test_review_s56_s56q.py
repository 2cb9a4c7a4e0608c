"""Review s56q: a run stopped and resumed ends with the uninterrupted run's whole checkpoint, bitwise on
the CPU: the weights, AdamW's moments and step counts, the lr scheduler, Lightning's loop counters (which
batch and which micro-batch of the accumulation come next) and the callbacks' states, not only the
logged rows (``tests/train/test_resume_logged_rows.py``) or the weights (``tests/train/test_train.py``).

The run accumulates gradients over 2 micro-batches and warms the TTT base lr up over 4 steps
(``optim.ttt_base_lr_warmup``), so a stop inside an accumulation window and inside the warm-up are
both tried; ``trainer.val_every`` and ``trainer.checkpoint_every`` (3) do not divide the stop steps.
Only the wall-clock seconds (:class:`~innerloop.train.throughput.TrainingThroughput`'s) may differ.
"""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lm_testing import TINY

import innerloop.checkpoints as checkpoints_module
from innerloop.config import load_config
from innerloop.train import CheckpointError, TrainingInterrupted, load_checkpoint, train

STEPS = 6
ROWS = [
    *TINY,
    "trainer.accumulate_grad_batches=2",
    "optim.ttt_base_lr_warmup=4",
    "trainer.val_every=3",
    "trainer.checkpoint_every=3",
    "trainer.log_every=1",
]
WALL_CLOCK_KEYS = (
    "/callbacks/TrainingThroughput/train_seconds",
    "/callbacks/TrainingThroughput/wall_seconds",
)
TIMING_COLUMNS = {"wall_time", "tokens_per_s"}


def _train(out_dir: Path, resume: bool = False, callbacks=()) -> None:
    run, cfg = load_config("tiny", [*ROWS, f"trainer.max_steps={STEPS}", f"out_dir={out_dir}"])
    train(run, cfg, resume=resume, callbacks=list(callbacks))


def _flat(tree: Any, run_dir: Path, prefix: str = "") -> dict[str, Any]:
    """``{path: leaf}`` of a checkpoint's tree of dicts, lists and leaves, ``run_dir`` in a string
    (``ModelCheckpoint``'s paths) written ``<run>``."""
    if isinstance(tree, dict):
        return {
            k: v for key, value in tree.items() for k, v in _flat(value, run_dir, f"{prefix}/{key}").items()
        }
    if isinstance(tree, (list, tuple)):
        return {
            k: v for i, value in enumerate(tree) for k, v in _flat(value, run_dir, f"{prefix}[{i}]").items()
        }
    return {prefix: tree.replace(str(run_dir), "<run>") if isinstance(tree, str) else tree}


def _differences(expected: tuple[Path, dict[str, Any]], got: tuple[Path, dict[str, Any]]) -> list[str]:
    """The paths where two runs' checkpoints differ: a tensor not bitwise equal (or of another dtype
    or shape), a plain value not equal, a path only one has; the wall-clock seconds left out."""
    a, b = _flat(expected[1], expected[0]), _flat(got[1], got[0])
    differing = []
    for key in sorted(set(a) | set(b)):
        if key in WALL_CLOCK_KEYS:
            continue
        x, y = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        else:
            same = type(x) is type(y) and x == y
        if not same:
            differing.append(key)
    return differing


def _logged_rows(out_dir: Path) -> list[dict[str, str]]:
    rows = []
    for launch in sorted((out_dir / "logs").glob("version_*"), key=lambda d: int(d.name.split("_")[1])):
        with open(launch / "metrics.csv", newline="", encoding="utf-8") as file:
            rows += [
                {k: v for k, v in row.items() if v != "" and k not in TIMING_COLUMNS}
                for row in csv.DictReader(file)
            ]
    return rows


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, Any], list[dict[str, str]]]:
    out = tmp_path_factory.mktemp("uninterrupted")
    _train(out)
    return out, load_checkpoint(out / "last.safetensors"), _logged_rows(out)


def _assert_continues_exactly(out_dir: Path, uninterrupted) -> None:
    run_dir, checkpoint, rows = uninterrupted
    resumed = load_checkpoint(out_dir / "last.safetensors")
    assert _differences((run_dir, checkpoint), (out_dir, resumed)) == []
    assert _logged_rows(out_dir) == rows


class _CtrlCInsideAnAccumulationWindow(L.Callback):
    """Presses Ctrl-C before the second micro-batch of optimizer step ``step + 1``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and batch_idx % 2 == 1:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow  # reason: a stopped and a resumed training run (~4 s)
def test_a_ctrl_c_inside_an_accumulation_window_resumes_to_the_uninterrupted_checkpoint(
    tmp_path, uninterrupted
) -> None:
    with pytest.raises(TrainingInterrupted, match=rf"after 2 of {STEPS} steps"):
        _train(tmp_path, callbacks=[_CtrlCInsideAnAccumulationWindow(step=1)])
    assert load_checkpoint(tmp_path / "last.safetensors")["global_step"] == 2  # whole, in the warm-up
    _train(tmp_path, resume=True)
    _assert_continues_exactly(tmp_path, uninterrupted)


@pytest.mark.slow  # reason: a stopped and a resumed training run (~4 s)
def test_a_keyboard_interrupt_inside_a_checkpoint_write_resumes_to_the_uninterrupted_checkpoint(
    tmp_path, uninterrupted, monkeypatch
) -> None:
    written = []
    save_file = checkpoints_module.save_file

    def interrupted_at_the_second_write(tensors, file, metadata=None) -> None:
        written.append(file)
        save_file(tensors, file, metadata=metadata)  # the bytes are on disk, the rename is not done
        if len(written) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints_module, "save_file", interrupted_at_the_second_write)
    with pytest.raises(TrainingInterrupted, match="while writing the checkpoint of step 6"):
        _train(tmp_path)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.safetensors")["global_step"] == 3
    _train(tmp_path, resume=True)
    _assert_continues_exactly(tmp_path, uninterrupted)


def test_the_comparison_sees_one_changed_bit_a_loop_counter_and_a_missing_entry(tmp_path) -> None:
    moment = torch.arange(4, dtype=torch.float32)
    run = {
        "optimizer_states": [{"state": {0: {"exp_avg": moment, "step": torch.tensor(3.0)}}}],
        "loops": {"fit_loop": {"total": {"completed": 6}}},
        "callbacks": {"ModelCheckpoint": {"dirpath": str(tmp_path / "a")}},
    }
    assert (
        _differences(
            (tmp_path / "a", run),
            (tmp_path / "b", {**run, "callbacks": {"ModelCheckpoint": {"dirpath": str(tmp_path / "b")}}}),
        )
        == []
    )
    flipped = moment.clone()
    flipped.view(torch.int32)[1] ^= 1  # the last bit of one value
    other = {
        "optimizer_states": [{"state": {0: {"exp_avg": flipped}}}],
        "loops": {"fit_loop": {"total": {"completed": 5}}},
        "callbacks": run["callbacks"],
    }
    assert _differences((tmp_path, run), (tmp_path, other)) == [
        "/loops/fit_loop/total/completed",
        "/optimizer_states[0]/state/0/exp_avg",
        "/optimizer_states[0]/state/0/step",
    ]


class _ShouldStopInsideAnAccumulationWindow(L.Callback):
    """Sets ``trainer.should_stop``, as ``trainer.max_time``'s Timer does, after the first micro-batch
    of optimizer step ``step + 1``: the stop waits for that step's last micro-batch."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and batch_idx % 2 == 0:
            trainer.should_stop = True


@pytest.mark.slow  # reason: a stopped and a resumed training run (~4 s)
def test_a_max_time_stop_between_validations_resumes_exactly_with_one_more_validation_row(
    tmp_path, uninterrupted
) -> None:
    _train(tmp_path, callbacks=[_ShouldStopInsideAnAccumulationWindow(step=4)])  # not an error: it warns
    assert load_checkpoint(tmp_path / "last.safetensors")["global_step"] == 5
    _train(tmp_path, resume=True)
    run_dir, checkpoint, rows = uninterrupted
    assert (
        _differences((run_dir, checkpoint), (tmp_path, load_checkpoint(tmp_path / "last.safetensors"))) == []
    )
    # docs/training.md: Lightning validates the step a should_stop ends the fit at (Lightning's step
    # column of a validation is one less than the step it scores)
    validation_of_the_stop_step = [r for r in _logged_rows(tmp_path) if r.get("val_step") == "5.0"]
    assert [r["step"] for r in validation_of_the_stop_step] == ["4"]
    assert [r for r in _logged_rows(tmp_path) if r.get("val_step") != "5.0"] == rows


@pytest.mark.slow  # reason: builds the model and reads the data before the refusal (~1 s)
def test_a_resume_of_a_run_stopped_before_its_first_checkpoint_does_not_ask_for_overwrite(tmp_path) -> None:
    # a KeyboardInterrupt (or Ctrl-C) before the first checkpoint removes the config.yaml the run wrote,
    # so a plain new run starts there; --overwrite is needed only where a config.yaml stayed (a kill)
    run, cfg = load_config("tiny", [*TINY, "trainer.max_steps=2", f"out_dir={tmp_path}"])
    with pytest.raises(CheckpointError, match=r"start the run again \(a new run\)$"):
        train(run, cfg, resume=True)
    (tmp_path / "config.yaml").write_text("left by a killed run\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"start the run again with overwrite=True$"):
        train(run, cfg, resume=True)
