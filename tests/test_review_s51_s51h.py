"""Review s51h: interrupted training loses no work and resumes exactly."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
from lm_testing import TINY

from innerloop.config import load_config
from innerloop.train import TrainingInterrupted, load_checkpoint, train


class _RaiseKeyboardInterrupt(L.Callback):
    """Raises ``KeyboardInterrupt`` at the end of optimizer step ``at_step`` (as a user's callback, or a
    Ctrl-C landing where another SIGINT handler than Python's turns it into one, would)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise KeyboardInterrupt


@pytest.mark.slow  # ~2 s: a 4-step run stopped by a KeyboardInterrupt
def test_a_keyboard_interrupt_from_a_callback_is_a_training_interrupted(tmp_path) -> None:
    """Lightning turns a KeyboardInterrupt into ``sys.exit(1)`` (a bare ``SystemExit: 1`` out of
    ``train()``, which says nothing and ends a script or notebook cell) and sets SIGINT to be ignored;
    ``train`` raised that SystemExit and, where SIGINT had a handler of its own, left Ctrl-C ignored
    for the rest of the process."""
    run, cfg = load_config("tiny", [*TINY, "trainer.max_steps=4", f"out_dir={tmp_path}"])

    def own_handler(signum, frame):  # a program's own SIGINT handler (innerloop leaves it in place)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGINT, own_handler)
    try:
        with pytest.raises(
            TrainingInterrupted,
            match=r"by a KeyboardInterrupt after 3 of 4 steps; the last checkpoint, .* \(after 2 steps\)",
        ) as stop:
            train(run, cfg, callbacks=[_RaiseKeyboardInterrupt(at_step=3)])
        assert signal.getsignal(signal.SIGINT) is own_handler  # not Lightning's SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert stop.value.exit_code == 130
    assert load_checkpoint(tmp_path / "last.safetensors")["global_step"] == 2  # the periodic checkpoint


def test_a_killed_tensorboard_hparams_write_leaves_no_temporary_file_behind(tmp_path) -> None:
    """The tensorboard logger writes ``logs/version_<n>/tensorboard/hparams.yaml`` atomically; a run
    killed during that write left its temporary file there, which no later launch removed (one more
    per kill): only ``logs/version_<n>/`` itself was cleaned."""
    from innerloop.train.run_dir import remove_stale_temporaries

    board = tmp_path / "logs" / "version_0" / "tensorboard"
    board.mkdir(parents=True)
    stale = board / ".hparams.yaml.k2j4_9xq.tmp"
    stale.write_text("half")
    events = board / "events.out.tfevents.1.host.1.0"  # the logger's own file stays
    events.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and events.exists()


def _previous_run(folder) -> dict[str, str]:
    """Write a previous run's files (a checkpoint, a later pending one, its outputs) into ``folder``."""
    from innerloop.train import run_dir

    previous = {"config.yaml": "seed: 0\n", "last.safetensors": "weights", "loss_by_position.csv": "a,b\n"}
    previous[run_dir.PENDING_CHECKPOINT] = "later weights"
    for name, text in previous.items():
        (folder / name).write_text(text)
    return previous


def _killed_then_relaunched(monkeypatch, folder, renames_done: int, killed, previous: dict) -> None:
    """``killed(folder)`` is killed (KeyboardInterrupt) after ``renames_done`` renames; the next launch
    settles the folder, which then holds exactly the ``previous`` run's files ``{name: text}``."""
    from innerloop.train import run_dir

    _kill_after_renames(monkeypatch, renames_done)
    with pytest.raises(KeyboardInterrupt):
        killed(folder)
    monkeypatch.undo()  # the next launch renames as usual
    run_dir.settle_previous_run(folder)  # the next launch
    assert {p.name: p.read_text() for p in folder.iterdir()} == previous


def _kill_after_renames(monkeypatch, renames_done: int) -> None:
    """Make run_dir's ``os.replace`` end the process (a KeyboardInterrupt standing in for SIGKILL, without
    the clean-up) after ``renames_done`` renames."""
    from innerloop.train import run_dir

    real_replace, done = os.replace, []

    def killed_after_some(source, target):
        if len(done) == renames_done:
            raise KeyboardInterrupt
        done.append(target)
        real_replace(source, target)

    monkeypatch.setattr(run_dir.os, "replace", killed_after_some)


@pytest.mark.parametrize("renames_done", [1, 2, 3])
def test_a_launch_killed_while_setting_the_previous_run_aside_loses_none_of_it(
    tmp_path, monkeypatch, renames_done
) -> None:
    """``--overwrite`` renames the previous run's files one by one; a kill between two renames left
    some set aside and its checkpoint in place, which the next launch took for the new run's checkpoint
    and removed the set-aside files (config.yaml first: the run could not be resumed)."""
    from innerloop.train import run_dir

    previous = _previous_run(tmp_path)
    _killed_then_relaunched(monkeypatch, tmp_path, renames_done, run_dir.set_aside_previous_run, previous)


@pytest.mark.parametrize("renames_done", [1, 2, 3])
def test_a_launch_killed_while_putting_the_previous_run_back_loses_none_of_it(
    tmp_path, monkeypatch, renames_done
) -> None:
    """An ``--overwrite`` run that ended before its first checkpoint puts the previous run's files back one
    by one; a kill between two of those renames left the previous checkpoint back in place, which the next
    launch took for the new run's and removed the rest still set aside (its later pending checkpoint
    counted as the new run's unconfirmed one and went too)."""
    from innerloop.train import run_dir

    previous = _previous_run(tmp_path)
    run_dir.set_aside_previous_run(tmp_path)
    (tmp_path / "config.yaml").write_text("seed: 1\n")  # the new run's, then it stopped without a checkpoint
    (tmp_path / run_dir.PENDING_CHECKPOINT).write_text("the new run's unconfirmed first step")
    _killed_then_relaunched(monkeypatch, tmp_path, renames_done, run_dir.settle_previous_run, previous)


def test_a_metrics_csv_append_that_fails_midway_leaves_the_file_as_it_was(tmp_path, monkeypatch) -> None:
    """Lightning appends each flush of rows to ``metrics.csv`` in place: a full disk (or a kill) partway
    through left a torn last row (a loss cut to its first digits, read back as another number). Each
    flush now replaces the file atomically: a failed one leaves the rows written before, whole."""
    import csv

    from innerloop.train.loggers import _AtomicExperimentWriter

    writer = _AtomicExperimentWriter(log_dir=str(tmp_path))
    writer.log_metrics({"train_loss": 2.0}, step=0)
    writer.save()
    before = (tmp_path / "metrics.csv").read_bytes()
    writer.log_metrics({"train_loss": 1.23456789}, step=1)

    def disk_full_partway(self, rows):  # the first characters of the row reach the file, then ENOSPC
        self.writer.writerow(["1", "1.2"])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", disk_full_partway)
    with pytest.raises(OSError, match="No space left"):
        writer.save()
    assert (tmp_path / "metrics.csv").read_bytes() == before


@pytest.mark.slow  # ~2 s: a 2-step run whose loss-by-position files find the disk full
def test_a_full_disk_at_the_loss_by_position_files_is_one_error_naming_the_checkpoint(
    tmp_path, monkeypatch
) -> None:
    """Every other write of a run that finds the disk full says to free space and that the checkpoint
    holds the steps; the final loss-by-position files raised a bare OSError that said neither."""
    import errno

    from innerloop.train import run as run_module
    from innerloop.train.run_dir import RunDirError

    def disk_full(*args, **kwargs):
        raise OSError(
            errno.ENOSPC, f"writing {str(tmp_path / 'loss_by_position.png')!r} failed: No space left"
        )

    monkeypatch.setattr(run_module, "plot_loss_by_position", disk_full)
    run, cfg = load_config("tiny", [*TINY, "trainer.max_steps=2", f"out_dir={tmp_path}"])
    with pytest.raises(
        RunDirError,
        match=r"No space left; free some space: the checkpoint .* holds all 2 steps: `train\(\*load_config\(",
    ):  # from Python, the call that continues the run (s51a), not the command line's --resume
        train(run, cfg)
    assert load_checkpoint(tmp_path / "last.safetensors")["global_step"] == 2


def test_a_keyboard_interrupt_in_a_validation_after_training_leaves_sigint_as_it_was() -> None:
    """Lightning ends a validation interrupted by a KeyboardInterrupt with SIGINT set to be ignored and
    ``exit(1)``; :func:`ended_by_signals` (around the final validation and ``evaluate``) put SIGINT back
    only where it had taken it, so under a program's own SIGINT handler Ctrl-C stayed ignored after."""
    from innerloop.train.interrupt import ended_by_signals

    def own_handler(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGINT, own_handler)
    try:
        with pytest.raises(SystemExit), ended_by_signals("during the evaluation"):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # what Lightning does on a KeyboardInterrupt
            raise SystemExit(1)
        assert signal.getsignal(signal.SIGINT) is own_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_resume_killed_between_moving_rows_and_rewriting_metrics_csv_moves_no_row_twice(
    tmp_path, monkeypatch
) -> None:
    """:func:`supersede_rows_logged_past` writes the superseded rows, then ``metrics.csv`` without them;
    a kill between the two left them in both, and the next resume appended them to the superseded file
    a second time (each row logged once, read back as two launches' rows)."""
    from innerloop.train import loggers

    version = tmp_path / "logs" / "version_0"
    version.mkdir(parents=True)
    (version / "metrics.csv").write_text("step,train_loss\n0,3.0\n1,2.5\n2,2.25\n3,2.0\n")
    real_write, writes = loggers._write_rows, []

    def killed_after_the_first(path, header, rows):
        if writes:
            raise KeyboardInterrupt  # the process ends here
        writes.append(path)
        real_write(path, header, rows)

    monkeypatch.setattr(loggers, "_write_rows", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        loggers.supersede_rows_logged_past(tmp_path, step=2)
    monkeypatch.setattr(loggers, "_write_rows", real_write)
    loggers.supersede_rows_logged_past(tmp_path, step=2)  # the next resume, from the same checkpoint
    assert (version / loggers.SUPERSEDED_METRICS).read_text().splitlines() == [
        "step,train_loss",
        "2,2.25",
        "3,2.0",
    ]
    assert (version / "metrics.csv").read_text().splitlines() == ["step,train_loss", "0,3.0", "1,2.5"]
