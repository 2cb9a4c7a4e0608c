"""Review s53b: leftovers of training, evaluation and resume.

- ``trainer.max_time``: Lightning's Timer reads a mapping as ``timedelta(**mapping)``, so
  ``{hours: 1.5}`` is 90 minutes, though its annotation says ``dict[str, int]``, by which innerloop
  refused it; one rule now for every form (the parts' sum positive and one ``timedelta`` holds; a part
  no finite number or no unit refused by name).
- ``--resume`` hands the checkpoint it read and checked to Lightning's load; the stamp that tells
  whether the file changed since was taken after the read, so a same-size rewrite between the read and
  the stamp gave Lightning the older, checked bytes (the docstring says a changed file is read again).
  The stamp is now taken before the read, and holds the change time (a rewrite whose modification time
  was set back).
- A sibling: ``load_checkpoint``'s tensors were views of safetensors' map of the file, so the weights
  checked (checksum, finite) changed when the file was rewritten in place afterwards (measured: a
  flipped last byte turned a checked 1.0 into -4.0 in the dict already returned; the resume above
  then trained from it and diverged). They are copies now.
- ``innerloop eval`` of a checkpoint without its config.yaml (moved or copied alone) scored the default
  corpus (measured: perplexity 163.331 on 128 default-corpus windows against 168.388 on the run's own 4
  validation windows), though the checkpoint records its run's ``data.*`` and seed. It scores what they
  name now, refuses (naming the record and ``--data``) where that data is gone, and ``--data`` wins.
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from innerloop.config import ConfigError
from innerloop.config.load import load_config
from innerloop.config.trainer_args import check_lightning_arguments
from tests.test_review_s21_cli import _corpus, _tiny  # the s21 run helpers (one copy)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ({"hours": 1.5}, 5400),
        ({"minutes": 0.5, "seconds": 15}, 45),
        ({"days": -1, "hours": 25}, 3600),
        ({"weeks": 1}, 604800),
        ("00:25:00:00", 90000),
        ({"milliseconds": 1500.0}, 1.5),
    ],
)
def test_a_time_limit_of_fractional_parts_is_kept_as_lightning_reads_it(value, seconds) -> None:
    from lightning.pytorch.callbacks import Timer

    arguments = {"max_time": value}
    check_lightning_arguments(arguments, ConfigError)
    assert arguments == {"max_time": value}  # passed to lightning.Trainer as given
    assert Timer(duration=value)._duration == pytest.approx(seconds)  # the installed Lightning's reading


def test_a_fractional_time_limit_loads_from_an_override(tmp_path) -> None:
    run, _ = load_config("tiny", ["trainer.max_time={hours: 1.5}", f"out_dir={tmp_path / 'run'}"])
    assert run.trainer.lightning["max_time"] == {"hours": 1.5}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"hours": float("nan")}, r"hours=nan \(float\) is not a finite number"),
        ({"hours": float("inf")}, r"hours=inf \(float\) is not a finite number"),
        ({"hours": True}, r"hours=True \(bool\) is not a finite number"),
        ({"hours": "1"}, r"hours='1' \(str\) is not a finite number"),
        ({"hour": 1}, r"'hour' is not a unit of time; .*keys \['weeks', 'days', 'hours'"),
        ({"hours": -1.5}, r"is -5400 s: a time limit must be positive"),
        ({"minutes": 1, "seconds": -60}, r"is 0 s: a time limit must be positive"),
        ({"weeks": 1e10}, r"longer than a timedelta holds"),
        ("1.5:00:00:00", r"is not a time limit: give DD:HH:MM:SS"),
        ("-1:00:00:00", r"is not a time limit: give DD:HH:MM:SS"),
        (3600, r"3600 \(int\) is not a time limit"),
    ],
)
def test_a_time_limit_that_is_no_time_limit_is_refused_naming_the_part(value, message) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.max_time=.*" + message):
        check_lightning_arguments({"max_time": value}, ConfigError)


def test_a_timedelta_time_limit_is_kept_and_one_of_no_time_refused() -> None:
    check_lightning_arguments({"max_time": timedelta(minutes=3)}, ConfigError)
    with pytest.raises(ConfigError, match=r"is 0 s: a time limit must be positive"):
        check_lightning_arguments({"max_time": timedelta(0)}, ConfigError)


def _rewrite_in_place_keeping_its_times(path: Path) -> None:
    """Flip the file's last byte (a tensor's: its checksum no longer matches), the size and the
    modification time as they were (``touch -r``): only the change time tells."""
    before = os.stat(path)
    with open(path, "r+b") as file:
        file.seek(-1, os.SEEK_END)
        last = file.read(1)
        file.seek(-1, os.SEEK_END)
        file.write(bytes([last[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size


def test_a_checkpoint_rewritten_after_the_read_is_read_again_not_handed_over(tmp_path) -> None:
    import torch

    from innerloop.checkpoints import CheckpointError, load_checkpoint
    from innerloop.train import save_checkpoint
    from innerloop.train.checkpoint import SafetensorsCheckpointIO, checkpoint_stamp

    path = tmp_path / "last.safetensors"
    save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 4}, path)
    stamp = checkpoint_stamp(path)
    checked = load_checkpoint(path)
    _rewrite_in_place_keeping_its_times(path)  # between the checked read and the hand-over
    io = SafetensorsCheckpointIO()
    io.hand_over(path, checked, stamp)
    with pytest.raises(CheckpointError, match="checksum"):
        io.load_checkpoint(path)  # the file as it is now, not the older bytes checked


def test_the_weights_read_do_not_change_when_the_file_is_rewritten_in_place(tmp_path) -> None:
    import torch

    from innerloop.checkpoints import load_checkpoint
    from innerloop.train import save_checkpoint

    path = tmp_path / "last.safetensors"
    save_checkpoint({"state_dict": {"w": torch.ones(4)}, "global_step": 4}, path)
    checked = load_checkpoint(path)
    _rewrite_in_place_keeping_its_times(path)
    assert torch.equal(checked["state_dict"]["w"], torch.ones(4))  # was [1, 1, 1, -4]: the file's pages


@pytest.mark.slow  # trains: a tiny run of 2 steps, then a resume refused at Lightning's load (about 4 s)
def test_a_resume_whose_checkpoint_is_rewritten_after_its_checks_reads_the_new_bytes(
    tmp_path, monkeypatch, capsys
) -> None:
    import innerloop.train.run as run_module
    from innerloop.cli import main

    data, out = _corpus(tmp_path), tmp_path / "run"
    assert main(["train", *_tiny(data, out, "trainer.max_steps=2")]) == 0
    checked_read = run_module.load_training_checkpoint

    def read_then_rewritten(path, *args, **kwargs):
        checkpoint = checked_read(path, *args, **kwargs)
        _rewrite_in_place_keeping_its_times(Path(path))  # another process writes it, the same size
        return checkpoint

    monkeypatch.setattr(run_module, "load_training_checkpoint", read_then_rewritten)
    status = main(["train", "--resume", f"out_dir={out}", "trainer.max_steps=4"])
    err = capsys.readouterr().err
    # the file as it is now is corrupt: Lightning's load reads it and says so, not train from the older bytes
    assert status != 0 and "checksum" in err, (status, err)


@pytest.mark.slow  # trains: a tiny run of 2 steps, then four evaluations of its 4 windows (about 4 s)
def test_eval_of_a_checkpoint_moved_alone_scores_the_data_it_recorded(tmp_path) -> None:
    from innerloop.cli import main
    from innerloop.train.data import DataError
    from innerloop.train.run import evaluate

    data, out = _corpus(tmp_path), tmp_path / "run"
    assert main(["train", *_tiny(data, out, "trainer.max_steps=2")]) == 0
    beside, _, _ = evaluate(out / "last.safetensors", progress_bar=False)
    moved = tmp_path / "moved" / "last.safetensors"
    moved.parent.mkdir()
    shutil.copy(out / "last.safetensors", moved)
    alone, _, _ = evaluate(moved, progress_bar=False)
    assert alone == beside  # was the default corpus's 128 windows: another number on other data
    away = data.rename(tmp_path / "away")
    with pytest.raises(
        DataError, match=r"as '.*moved/last.safetensors' recorded them, no config.yaml beside"
    ):
        evaluate(moved, progress_bar=False)  # never the default corpus in its place
    given, _, _ = evaluate(moved, [str(away)], progress_bar=False)  # explicit data wins
    assert given["windows"] == 128 and given["val_loss"] != alone["val_loss"]
