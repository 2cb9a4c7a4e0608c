"""A checkpoint written but not yet confirmed (``.last.safetensors.pending``) that a killed run left is
not lost: the next launch keeps it when it is whole and later than ``last.safetensors`` (a resume
continues from it, and confirms it as the run that wrote it would have), and removes it, saying why,
when it is truncated, corrupt or not later. A kill between the write and the confirmation (e.g. during
the validation after a checkpoint step) is made here by putting such a file in place."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lm_testing import TINY  # the tiny run of the end-to-end tests

from innerloop.config import load_config
from innerloop.train import TrainingDivergedError, load_checkpoint, train
from innerloop.train.checkpoint import save_checkpoint
from innerloop.train.run_dir import (
    PENDING_CHECKPOINT,
    RunDirError,
    set_aside_previous_run,
    settle_previous_run,
)

FIRST, PENDING, LAST = 4, 6, 8  # steps: last.safetensors, the pending checkpoint, the end of the resume


def _train(out: Path, max_steps: int, resume: bool = False, callbacks=()) -> None:
    source = str(out / "config.yaml") if resume else "tiny"
    base = [] if resume else [*TINY, f"out_dir={out}"]
    run, cfg = load_config(source, [*base, f"trainer.max_steps={max_steps}"])
    train(run, cfg, resume=resume, callbacks=callbacks)


def _copy_run(source: Path, out: Path) -> Path:
    shutil.copytree(source, out)
    config = out / "config.yaml"  # the copy's config names its own out_dir
    config.write_text(config.read_text().replace(f"out_dir: {source}", f"out_dir: {out}"))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """``first``: a run of FIRST steps; ``pending``: it resumed to PENDING steps (the checkpoint a killed
    run of ``first`` would have left pending); ``uninterrupted``: that resumed on to LAST steps."""
    root = tmp_path_factory.mktemp("pending")
    first = root / "first"
    _train(first, FIRST)
    pending = _copy_run(first, root / "pending")
    _train(pending, PENDING, resume=True)
    uninterrupted = _copy_run(pending, root / "uninterrupted")
    _train(uninterrupted, LAST, resume=True)
    return {"first": first, "pending": pending, "uninterrupted": uninterrupted}


class _FirstStep(L.Callback):
    """The global step the run starts training from."""

    step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step


def _killed_with_pending(runs: dict[str, Path], out: Path, pending_bytes: bytes) -> Path:
    """A copy of ``first`` as a run killed after writing ``pending_bytes`` as its pending checkpoint."""
    out = _copy_run(runs["first"], out)
    (out / PENDING_CHECKPOINT).write_bytes(pending_bytes)
    return out


def _messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "innerloop.train.run_dir")


@pytest.mark.slow  # ~1 s: a resumed training run (and the fixture's three)
def test_a_resume_continues_from_a_whole_later_pending_checkpoint_to_the_uninterrupted_weights(
    runs, tmp_path, caplog
) -> None:
    later = (runs["pending"] / "last.safetensors").read_bytes()
    out = _killed_with_pending(runs, tmp_path / "run", later)
    first_step = _FirstStep()
    with caplog.at_level(logging.WARNING, logger="innerloop.train.run_dir"):
        _train(out, LAST, resume=True, callbacks=[first_step])
    said = _messages(caplog)
    assert f"kept {out / PENDING_CHECKPOINT}" in said and f"global_step {PENDING}" in said, said
    assert f"last.safetensors (global_step {FIRST})" in said and "temporary" not in said, said
    assert first_step.step == PENDING  # not FIRST: the pending checkpoint's work is not redone
    assert not (out / PENDING_CHECKPOINT).exists()
    resumed = load_checkpoint(out / "last.safetensors")
    expected = load_checkpoint(runs["uninterrupted"] / "last.safetensors")
    assert resumed["global_step"] == expected["global_step"] == LAST
    assert resumed["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


@pytest.mark.slow  # ~0.5 s: a resumed training run
@pytest.mark.parametrize("kind", ["truncated", "corrupt", "not later"])
def test_a_truncated_corrupt_or_older_pending_checkpoint_is_removed_saying_why(
    runs, tmp_path, caplog, kind
) -> None:
    later = (runs["pending"] / "last.safetensors").read_bytes()
    middle = len(later) // 2
    content = {
        "truncated": later[:middle],
        "corrupt": later[:middle] + bytes([later[middle] ^ 0xFF]) + later[middle + 1 :],
        "not later": (runs["first"] / "last.safetensors").read_bytes(),
    }[kind]
    out = _killed_with_pending(runs, tmp_path / "run", content)
    first_step = _FirstStep()
    with caplog.at_level(logging.WARNING, logger="innerloop.train.run_dir"):
        _train(out, PENDING, resume=True, callbacks=[first_step])
    said = _messages(caplog)
    assert f"removed {out / PENDING_CHECKPOINT}, a checkpoint an interrupted run wrote" in said, said
    why = (
        f"global_step {FIRST}, not later than last.safetensors's {FIRST}" if kind == "not later" else "whole"
    )
    assert why in said, said
    assert first_step.step == FIRST  # from last.safetensors
    assert load_checkpoint(out / "last.safetensors")["global_step"] == PENDING
    assert not (out / PENDING_CHECKPOINT).exists()


@pytest.mark.slow  # ~0.5 s: a resumed training run
def test_a_pending_checkpoint_of_the_last_step_replaces_last_when_a_resume_has_no_step_left(
    runs, tmp_path
) -> None:
    """Killed after writing the final step's checkpoint (during the validation at max_steps): the resume
    has no step to run, and the final weights must still end up in last.safetensors, not stay hidden."""
    final = (runs["pending"] / "last.safetensors").read_bytes()
    out = _killed_with_pending(runs, tmp_path / "run", final)
    _train(out, PENDING, resume=True)
    assert (out / "last.safetensors").read_bytes() == final
    assert not (out / PENDING_CHECKPOINT).exists()


class _NanLoss(L.Callback):
    """Make the weights' loss NaN at the first step (the resumed pending weights' next step)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with torch.no_grad():
            pl_module.model.blocks[0].mlp.down_proj.weight.fill_(float("nan"))


@pytest.mark.slow  # ~0.5 s: a resumed training run
def test_a_kept_pending_checkpoint_replaces_last_only_once_its_next_loss_is_finite(runs, tmp_path) -> None:
    later = (runs["pending"] / "last.safetensors").read_bytes()
    out = _killed_with_pending(runs, tmp_path / "run", later)
    last_before = (out / "last.safetensors").read_bytes()
    with pytest.raises(TrainingDivergedError, match=f"after {PENDING + 1} optimizer steps|after {PENDING} "):
        _train(out, LAST, resume=True, callbacks=[_NanLoss()])
    # as in the run that wrote it: a checkpoint whose next loss is NaN never replaces last.safetensors
    assert (out / "last.safetensors").read_bytes() == last_before
    assert not (out / PENDING_CHECKPOINT).exists()


@pytest.mark.slow  # ~1 s: three training runs
def test_a_new_run_refused_in_an_out_dir_with_a_pending_checkpoint_leaves_it_for_resume(
    runs, tmp_path
) -> None:
    later = (runs["pending"] / "last.safetensors").read_bytes()
    out = _killed_with_pending(runs, tmp_path / "run", later)
    with pytest.raises(RunDirError, match="already holds a run .*resume=True"):
        _train(out, LAST)
    assert (out / PENDING_CHECKPOINT).read_bytes() == later


def test_overwrite_sets_a_pending_checkpoint_aside_and_puts_it_back_with_its_run(tmp_path) -> None:
    for name, text in [
        ("config.yaml", "old config"),
        ("last.safetensors", "old"),
        (PENDING_CHECKPOINT, "old+"),
    ]:
        (tmp_path / name).write_text(text)
    assert PENDING_CHECKPOINT in set_aside_previous_run(tmp_path)
    assert not (tmp_path / PENDING_CHECKPOINT).exists()
    (tmp_path / PENDING_CHECKPOINT).write_text("new")  # the replacing run, killed before it confirmed one
    settle_previous_run(tmp_path)  # it ended without last.safetensors: the previous run comes back whole
    assert (tmp_path / PENDING_CHECKPOINT).read_text() == "old+"
    assert (tmp_path / "last.safetensors").read_text() == "old"


@pytest.mark.slow  # ~0.5 s: a resumed training run
def test_a_pending_checkpoint_with_non_finite_weights_is_removed(runs, tmp_path, caplog) -> None:
    tree = load_checkpoint(runs["pending"] / "last.safetensors")
    key = next(iter(tree["state_dict"]))
    tree["state_dict"][key] = torch.full_like(tree["state_dict"][key], float("nan"))
    poisoned = save_checkpoint(tree, tmp_path / "poisoned.safetensors")  # whole, with its checksum
    out = _killed_with_pending(runs, tmp_path / "run", poisoned.read_bytes())
    first_step = _FirstStep()
    with caplog.at_level(logging.WARNING, logger="innerloop.train.run_dir"):
        _train(out, PENDING, resume=True, callbacks=[first_step])
    assert "NaN/infinite value(s)" in _messages(caplog)  # the loader checks the weights
    assert first_step.step == FIRST  # from last.safetensors
