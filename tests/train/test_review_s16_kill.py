"""Review s16 (kill campaign): what a killed command leaves is settled by the next one.

Each kill is simulated by writing the files it leaves (no real kill: they are slow and racy):

- F1: an ``--overwrite`` killed before its first checkpoint was confirmed leaves the new run's
  ``config.yaml`` (and maybe its ``.last.safetensors.pending``) beside the previous run's files set aside
  as ``.replaced.*``; the next ``--resume`` must read the previous run's config, not the killed one's.
- F2: a write killed between creating and renaming its temporary file leaves ``.<name>.<8>.tmp``; the
  next ``convert``/``eval --out``/``compare --out`` writing that file removes it, but never the
  temporary file of a write still running (it holds a ``flock`` on it).
- F4: Ctrl-C during ``innerloop eval`` is exit status 130 and one line, with nothing written.
- F5: a new run killed before its first checkpoint leaves only ``config.yaml``: the rerun's refusal says
  so and names ``--overwrite``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from pathlib import Path

import pytest
from lm_testing import TINY  # the tiny run of the end-to-end tests

from innerloop.cli import _resume_config, main
from innerloop.config import load_config
from innerloop.config.load import save_config
from innerloop.data.atomic import atomic_write, remove_stale_temporaries_of, stale_temporaries
from innerloop.train.run_dir import (
    PENDING_CHECKPOINT,
    RunDirError,
    refuse_previous_run,
    set_aside_previous_run,
)

REPO = Path(__file__).resolve().parents[2]
REFERENCE_MODEL = REPO / "tests" / "data" / "models" / "ttt_linear_transformer"


def _save_run_config(out: Path, name: str, seed: int) -> None:
    run, cfg = load_config("tiny", [*TINY, f"seed={seed}", f"out_dir={out}"])
    save_config(cfg, out / name)


def test_resume_after_a_killed_overwrite_reads_the_restored_runs_config(tmp_path, caplog) -> None:
    """F1: the killed ``--overwrite seed=1`` left its config.yaml and a whole unconfirmed checkpoint; the
    previous run (seed 2) is set aside. ``--resume`` with no overrides continues the previous run."""
    out = tmp_path / "run"
    out.mkdir()
    _save_run_config(out, "config.yaml", seed=2)  # the previous run, set aside (and recorded) below
    (out / "last.safetensors").write_bytes(b"the previous run's checkpoint")
    set_aside_previous_run(out)
    _save_run_config(out, "config.yaml", seed=1)  # the killed --overwrite's
    (out / PENDING_CHECKPOINT).write_bytes(b"the killed run's unconfirmed step-1 checkpoint")

    run, _ = _resume_config(None, [f"out_dir={out}"])

    assert run.seed == 2  # the previous run's config, not the killed launch's
    assert (out / "last.safetensors").read_bytes() == b"the previous run's checkpoint"
    assert not (out / PENDING_CHECKPOINT).exists()  # the undone run's checkpoint never pairs with it
    assert not list(out.glob(".replaced.*"))
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "are back in" in messages and PENDING_CHECKPOINT in messages


def test_resume_after_a_killed_overwrite_is_refused_while_another_run_holds_the_out_dir(tmp_path) -> None:
    """F1: the settling takes the out_dir's lock; a live run there is named, nothing is moved."""
    from innerloop.train.run_dir import lock_run_dir

    out = tmp_path / "run"
    out.mkdir()
    _save_run_config(out, "config.yaml", seed=2)
    set_aside_previous_run(out)  # what the killed --overwrite did, then it wrote its own config.yaml
    _save_run_config(out, "config.yaml", seed=1)
    with lock_run_dir(out), pytest.raises(RunDirError, match="in use by another run"):
        _resume_config(None, [f"out_dir={out}"])
    assert (out / ".replaced.config.yaml").is_file()


def test_a_config_without_a_checkpoint_is_refused_naming_overwrite(tmp_path) -> None:
    """F5: what a new run killed before its first checkpoint leaves: the refusal says what is there and
    that --overwrite starts the run again (not --resume, which has no checkpoint to continue from)."""
    _save_run_config(tmp_path, "config.yaml", seed=1)
    with pytest.raises(RunDirError) as caught:
        refuse_previous_run(tmp_path)
    message = str(caught.value)
    # from Python: overwrite=True (s51a; --overwrite on the command line)
    assert "no checkpoint" in message and "overwrite=True" in message and "resume" not in message
    assert (tmp_path / "config.yaml").is_file()  # never removed: it may be the user's


def test_stale_temporaries_skip_a_write_that_is_still_running(tmp_path) -> None:
    """F2: a temporary file whose writer lives (it holds the flock) is not stale; once the writer is
    gone (its lock released, as the system does for a killed process) it is, and is removed."""
    target = tmp_path / "last.safetensors"
    seen_during_write: list[list[Path]] = []

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(b"new")
        seen_during_write.append(stale_temporaries(tmp_path, [target.name]))

    atomic_write(target, write)
    assert seen_during_write == [[]]
    assert target.read_bytes() == b"new"

    left = tmp_path / ".last.safetensors.abcd1234.tmp"
    left.write_bytes(b"half")
    other = tmp_path / ".other.csv.abcd1234.tmp"  # another file's: not this target's to remove
    other.write_bytes(b"half")
    fd = os.open(left, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer
    try:
        assert remove_stale_temporaries_of([target]) == []
    finally:
        os.close(fd)
    assert remove_stale_temporaries_of([target]) == [left]
    assert not left.exists() and other.exists() and target.read_bytes() == b"new"


def test_without_fcntl_writes_stay_atomic_and_leftovers_are_found(tmp_path, monkeypatch) -> None:
    """Where ``fcntl`` does not exist (not POSIX) a write is still atomic and a leftover temporary is
    still found; only a live writer's cannot be told from a killed one's."""
    import innerloop.data.atomic as atomic

    monkeypatch.setattr(atomic, "fcntl", None)
    target = tmp_path / "results.json"
    atomic_write(target, lambda tmp: Path(tmp).write_text("{}"))
    assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    left = tmp_path / ".results.json.abcd1234.tmp"
    left.write_text("{")
    assert remove_stale_temporaries_of([target]) == [left] and not left.exists()


def test_convert_removes_the_temporary_file_a_killed_convert_left(tmp_path, caplog) -> None:
    """F2: ``innerloop convert ... --overwrite`` after a killed one removes its ``.tmp`` and says so."""
    out = tmp_path / "converted"
    out.mkdir()
    (out / "last.safetensors").write_bytes(b"the earlier conversion")
    left = out / ".last.safetensors.rbq5sm89.tmp"
    left.write_bytes(b"half a checkpoint")
    mine = out / "notes.txt"
    mine.write_text("the user's")

    assert main(["convert", "ttt-lm-pytorch", str(REFERENCE_MODEL), str(out), "--overwrite"]) == 0

    assert not left.exists()
    assert "removed 1 temporary file(s) an interrupted earlier write left" in caplog.text
    assert mine.read_text() == "the user's"
    assert sorted(p.name for p in out.iterdir()) == ["last.safetensors", "notes.txt"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s16kill") / "run"
    assert main(["train", *TINY, "trainer.max_steps=2", f"out_dir={out}"]) == 0
    return out


@pytest.mark.slow  # reason: trains a tiny run (module fixture) and evaluates it twice
def test_eval_out_removes_the_temporary_files_a_killed_eval_left(finished, tmp_path, caplog) -> None:
    """F2: eval --out, rerun after a kill, removes the ``.tmp`` of the files it writes, and only those."""
    results = tmp_path / "results"
    assert main(["eval", str(finished / "last.safetensors"), "--out", str(results)]) == 0
    (csv,) = results.glob("eval_*.csv")
    left = [results / f".{csv.name}.abcd1234.tmp", results / f".{csv.with_suffix('.png').name}.x_y9abcd.tmp"]
    for path in left:
        path.write_bytes(b"half")
    users = results / ".mine.csv.abcd1234.tmp"  # not of a file this eval writes
    users.write_bytes(b"kept")
    caplog.clear()

    assert main(["eval", str(finished / "last.safetensors"), "--out", str(results)]) == 0

    assert not any(p.exists() for p in left) and users.exists()
    assert "interrupted earlier write" in caplog.text


@pytest.mark.slow  # reason: trains a tiny run (module fixture) and compares it twice
def test_compare_out_removes_the_temporary_files_a_killed_compare_left(finished, tmp_path, caplog) -> None:
    """F2: compare --out, rerun after a kill, removes the ``.tmp`` of its CSV, PNG and table."""
    results = tmp_path / "results"
    assert main(["compare", str(finished), "--out", str(results)]) == 0
    names = sorted(p.name for p in results.iterdir())
    left = [results / f".{name}.abcd1234.tmp" for name in names]
    for path in left:
        path.write_bytes(b"half")
    caplog.clear()

    assert main(["compare", str(finished), "--out", str(results)]) == 0

    assert not any(p.exists() for p in left)
    assert sorted(p.name for p in results.iterdir()) == names
    assert "removed 3 temporary file(s) an interrupted earlier write left" in caplog.text


@pytest.mark.slow  # reason: trains a tiny run (module fixture) and starts an evaluation
@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread()
    or signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
    reason="a SIGINT reaches Python's handler only in the main thread, with the default handler installed",
)
def test_ctrl_c_during_eval_exits_130_with_one_line_and_writes_nothing(
    finished, tmp_path, capsys, monkeypatch
) -> None:
    """F4: Lightning turns the KeyboardInterrupt of a validation into a bare ``exit(1)``; eval says it
    stopped, with the shell's status for Ctrl-C."""
    from innerloop.train.module import LanguageModelModule

    def ctrl_c(self, batch, batch_idx):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the SIGINT did not interrupt the evaluation")

    monkeypatch.setattr(LanguageModelModule, "validation_step", ctrl_c)
    results = tmp_path / "results"
    capsys.readouterr()
    assert main(["eval", str(finished / "last.safetensors"), "--out", str(results)]) == 130
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("innerloop eval")]
    assert lines == ["innerloop eval: stopped at Ctrl-C during the evaluation; nothing was written"]
    assert not results.exists() or not list(results.iterdir())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_hparams_yaml_is_replaced_whole_not_truncated_and_rewritten(tmp_path) -> None:
    """F3: each write of ``logs/version_<n>/hparams.yaml`` goes through a temporary file and a rename
    (a new inode), so a kill during it leaves the earlier file whole, not an empty one."""
    import yaml

    from innerloop.train.loggers import _CSVLogger

    writer = _CSVLogger(tmp_path, name="logs").experiment
    writer.log_hparams({"params_total": 1})
    hparams = Path(writer.log_dir) / "hparams.yaml"
    first = hparams.stat().st_ino
    writer.log_hparams({"params_mixer": 2})
    assert hparams.stat().st_ino != first  # replaced, not truncated in place
    assert yaml.safe_load(hparams.read_text()) == {"params_total": 1, "params_mixer": 2}
    assert sorted(p.name for p in Path(writer.log_dir).iterdir()) == ["hparams.yaml"]


def test_a_launch_removes_the_hparams_yaml_temporary_a_killed_launch_left(tmp_path) -> None:
    """F3: the temporary file of a killed ``hparams.yaml`` write is removed at the next launch."""
    from innerloop.train.run_dir import remove_stale_temporaries

    version = tmp_path / "logs" / "version_1"
    version.mkdir(parents=True)
    left = version / ".hparams.yaml.abcd1234.tmp"
    left.write_text("")
    assert remove_stale_temporaries(tmp_path) == [left]
    assert not left.exists()
