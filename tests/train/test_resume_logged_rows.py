"""A resumed run logs the rows an uninterrupted run logs: the same ``step`` column (the x axis of every
logger), the same ``train_loss`` at the same steps (the ``trainer.log_every`` cadence), the same
validations, epoch and tokens seen, whatever checkpoint it resumed from: the one a Ctrl-C or SIGTERM stop
writes, the one at the end of a run later extended with ``--resume trainer.max_steps=...``, or a
periodic one after a crash."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import lightning as L
import pytest
from lm_testing import TINY

from innerloop.config import load_config
from innerloop.train import TrainingInterrupted, load_checkpoint, train

STEPS = 8
ROWS = [
    *TINY,
    "trainer.val_every=3",  # validations after steps 3 and 6, and the final one after 8
    "trainer.checkpoint_every=4",  # a stop at 5 or 6 is not a periodic checkpoint's step
    "trainer.log_every=1",  # every step's train_loss in a row: a shift shows at once
    "optim.schedule=constant",  # the lr does not depend on max_steps: an extended run can be compared
    "optim.warmup_fraction=0",
]
TIMING_COLUMNS = {"wall_time", "tokens_per_s"}  # they differ between any two runs


def _train(out_dir: Path, steps: int = STEPS, resume: bool = False, callbacks=()) -> None:
    run, cfg = load_config("tiny", [*ROWS, f"trainer.max_steps={steps}", f"out_dir={out_dir}"])
    train(run, cfg, resume=resume, callbacks=list(callbacks))


def _logged_rows(out_dir: Path) -> list[dict[str, str]]:
    """Every row of every launch's metrics.csv, in launch order, without the timing columns and the
    empty cells."""
    rows = []
    for launch in sorted((out_dir / "logs").glob("version_*"), key=lambda d: int(d.name.split("_")[1])):
        with open(launch / "metrics.csv", newline="", encoding="utf-8") as file:
            for row in csv.DictReader(file):
                rows.append({k: v for k, v in row.items() if v != "" and k not in TIMING_COLUMNS})
    return rows


class _Signal(L.Callback):
    """Sends this process ``signum`` after optimizer step ``after`` (the stop callback sees it after the
    next step: it runs before this one)."""

    def __init__(self, signum: int, after: int):
        self.signum, self.after = signum, after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.after:
            os.kill(os.getpid(), self.signum)


class _Crash(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 5:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict[str, str]]:
    out = tmp_path_factory.mktemp("straight")
    _train(out)
    rows = _logged_rows(out)
    assert [r["step"] for r in rows if "train_loss" in r] == [str(s) for s in range(STEPS)]
    return rows


@pytest.mark.slow  # reason: a stopped and a resumed training run (~10 s on a busy 2-core machine)
@pytest.mark.parametrize(
    ("signum", "stop_after"),
    [(signal.SIGINT, 6), (signal.SIGTERM, 5)],
    ids=["ctrl-c-at-a-validation-step", "sigterm-between-validations"],
)
def test_a_run_stopped_by_a_signal_and_resumed_logs_the_uninterrupted_rows(
    tmp_path, uninterrupted, signum, stop_after
) -> None:
    with pytest.raises(TrainingInterrupted, match=rf"after {stop_after} of {STEPS} steps"):
        _train(tmp_path, callbacks=[_Signal(signum, after=stop_after - 1)])
    assert load_checkpoint(tmp_path / "last.safetensors")["global_step"] == stop_after
    _train(tmp_path, resume=True)
    assert _logged_rows(tmp_path) == uninterrupted


class _CtrlCInValidation(L.Callback):
    """Sends this process SIGINT inside the validation after optimizer step ``after``, before its batch
    is scored."""

    def __init__(self, after: int):
        self.after = after

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.global_step == self.after and trainer.state.fn == "fit":
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow  # reason: a stopped and a resumed training run (~10 s on a busy 2-core machine)
def test_a_ctrl_c_inside_a_validation_resumes_to_the_uninterrupted_rows(tmp_path, uninterrupted) -> None:
    # the validation after step 3 finishes and is logged, the next step (4) is the last one: measured
    # (s55f) with 2 validation batches too, the resumed weights equal the uninterrupted run's bitwise
    with pytest.raises(TrainingInterrupted, match=rf"after 4 of {STEPS} steps"):
        _train(tmp_path, callbacks=[_CtrlCInValidation(after=3)])
    assert load_checkpoint(tmp_path / "last.safetensors")["global_step"] == 4
    _train(tmp_path, resume=True)
    assert _logged_rows(tmp_path) == uninterrupted


@pytest.mark.slow  # reason: two short training runs (~10 s on a busy 2-core machine)
def test_a_finished_run_extended_with_resume_logs_the_uninterrupted_rows(tmp_path, uninterrupted) -> None:
    _train(tmp_path, steps=5)  # its checkpoint is the end-of-run one (checkpoint_every=4)
    assert load_checkpoint(tmp_path / "last.safetensors")["global_step"] == 5
    _train(tmp_path, resume=True)
    rows = _logged_rows(tmp_path)
    # the 5-step run's own final validation is a row the 8-step run has no reason to log
    final_of_the_first_launch = {"step": "4", "val_step": "5.0"}
    assert [r for r in rows if final_of_the_first_launch.items() <= r.items()] != []
    assert [r for r in rows if not final_of_the_first_launch.items() <= r.items()] == uninterrupted


@pytest.mark.slow  # reason: two short training runs (~10 s on a busy 2-core machine)
def test_a_crashed_run_resumed_from_its_periodic_checkpoint_logs_the_uninterrupted_rows(
    tmp_path, uninterrupted
) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(tmp_path, callbacks=[_Crash()])
    assert load_checkpoint(tmp_path / "last.safetensors")["global_step"] == 4
    _train(tmp_path, resume=True)
    assert _logged_rows(tmp_path) == uninterrupted  # the crash came before step 5's row was logged


class _StopAt(L.Callback):
    """Asks the fit to stop after optimizer step ``step``, as ``trainer.max_time`` does
    (``trainer.should_stop``)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _validations(rows: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(row["step"], row["val_step"]) for row in rows if "val_loss" in row]


@pytest.mark.slow  # reason: uses the uninterrupted run (module fixture, ~4 s)
def test_the_final_validation_is_logged_as_every_validation_inside_the_fit(uninterrupted) -> None:
    # Lightning's step column of a validation inside the fit is one less than the step it scores
    assert _validations(uninterrupted) == [("2", "3.0"), ("5", "6.0"), ("7", "8.0")]


@pytest.mark.slow  # reason: a training run (~3 s)
def test_a_fit_a_callback_stopped_is_validated_once_at_its_last_step(tmp_path) -> None:
    _train(tmp_path, callbacks=[_StopAt(5)])
    assert _validations(_logged_rows(tmp_path)) == [("2", "3.0"), ("4", "5.0")]
