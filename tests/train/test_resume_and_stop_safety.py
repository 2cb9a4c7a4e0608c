"""Training runs as a user meets them (end to end, short runs): a run moved to another
machine resumes, a signal during the final validation is no success, a stopped ``--overwrite`` run
gives the previous run back, a hand-edited config.yaml cannot change the data of a resume, and a
failed resume leaves config.yaml as it was."""

from __future__ import annotations

import os
import shutil
import signal
import warnings
from pathlib import Path

import lightning as L
import pytest
from lm_testing import TINY, PressCtrlC

from innerloop.cli import main
from innerloop.config import load_config
from innerloop.config.load import ConfigError
from innerloop.train import TrainingInterrupted, load_checkpoint, train

STEPS = 4


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints every 2 steps); tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run, cfg = load_config(
        "tiny", [*TINY, f"trainer.max_steps={STEPS}", "trainer.threads=1", f"out_dir={out}"]
    )
    train(run, cfg)
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _edit(config: Path, old: str, new: str) -> None:
    text = config.read_text()
    assert old in text, text
    config.write_text(text.replace(old, new))


# reason: a 4-step training run (the shared fixture) and a resume of 2 steps: ~6 s
@pytest.mark.slow
def test_a_run_moved_from_another_machine_resumes_with_the_overrides_that_adapt_it(
    finished_run, tmp_path, capsys
) -> None:
    moved = _copy(finished_run, tmp_path / "moved")
    _edit(moved / "config.yaml", "accelerator: cpu", "accelerator: cuda")  # trained on a GPU
    _edit(moved / "config.yaml", f"out_dir: {finished_run}", "out_dir: /nonexistent/old_machine_run")
    arguments = ["train", "--resume", f"out_dir={moved}", "trainer.max_steps=6", "trainer.accelerator=cpu"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(arguments) == 0, capsys.readouterr().err
    # Lightning's "The dirpath has changed ... won't be reloaded" is about best-model scores innerloop keeps none of
    assert not [str(w.message) for w in caught if "dirpath has changed" in str(w.message)]
    assert load_checkpoint(moved / "last.safetensors")["global_step"] == 6
    assert f"out_dir: {moved}" in (moved / "config.yaml").read_text()  # the folder it now is in


class _SignalInFinalValidation(L.Callback):
    """Sends ``signum`` at the first batch of the validation of the last step (``trainer.max_steps``)."""

    def __init__(self, signum: int, last_step: int):
        self.signum, self.last_step = signum, last_step

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.global_step == self.last_step and batch_idx == 0:
            os.kill(os.getpid(), self.signum)


# reason: two short training runs (~3 s each)
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_final_validation_is_reported_with_its_status(tmp_path, signum) -> None:
    """Lightning ended the final validation with exit status 0 at SIGTERM (a scheduler's stop looked
    like success) and 1 at Ctrl-C, silently and without the loss_by_position files. (The validation of
    the last step is inside the fit: a stop asked for during it waits for its end, as during any
    validation, and the run ends before the files are written.)"""
    overrides = [*TINY, "trainer.max_steps=2", "trainer.val_every=1000", "data.val_batches=3"]
    run, cfg = load_config("tiny", [*overrides, "trainer.threads=1", f"out_dir={tmp_path}"])
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(
        TrainingInterrupted, match=r"after 2 of 2 steps, after their final validation, before loss_by_pos"
    ) as stopped:
        train(run, cfg, callbacks=[_SignalInFinalValidation(signum, last_step=2)])
    assert stopped.value.exit_code == 128 + signum
    assert "resume=True" in str(stopped.value)  # from Python (s51a: the call that continues it)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert load_checkpoint(tmp_path / "last.safetensors")["global_step"] == 2
    assert not (tmp_path / "loss_by_position.csv").exists()
    result = train(run, cfg, resume=True)  # runs the final validation
    assert result.csv.exists()


# reason: the shared 4-step fixture and a replacing run stopped after one step (~5 s)
@pytest.mark.slow
def test_ctrl_c_before_the_first_checkpoint_of_an_overwrite_run_keeps_the_previous_run(
    finished_run, tmp_path
) -> None:
    previous = _copy(finished_run, tmp_path / "ow")
    files = {name: (previous / name).read_bytes() for name in ("config.yaml", "last.safetensors")}
    run, cfg = load_config(
        "tiny", [*TINY, "trainer.max_steps=100", "trainer.threads=1", f"out_dir={previous}"]
    )
    with pytest.raises(
        TrainingInterrupted, match=r"before this run's first checkpoint: nothing of it is kept"
    ):
        train(run, cfg, overwrite=True, callbacks=[PressCtrlC(at_step=1)])  # checkpoints at step 2
    assert {name: (previous / name).read_bytes() for name in files} == files
    assert not list(previous.glob(".replaced.*"))


# reason: the shared 4-step fixture (~4 s); the refused resume itself is fast
@pytest.mark.slow
def test_data_settings_edited_in_config_yaml_are_refused_on_resume(finished_run, tmp_path, capsys) -> None:
    edited = _copy(finished_run, tmp_path / "he")
    _edit(edited / "config.yaml", "seq_len: 32", "seq_len: 16")
    _edit(edited / "config.yaml", "seed: 0", "seed: 7")
    before = (edited / "last.safetensors").read_bytes()
    assert main(["train", "--resume", f"out_dir={edited}", "trainer.max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert "data.seq_len (32 -> 16)" in err and "seed (0 -> 7)" in err
    assert (edited / "last.safetensors").read_bytes() == before


class _FailAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        raise RuntimeError("the data cannot be read")


# reason: the shared 4-step fixture (~4 s); the failing resume itself is fast
@pytest.mark.slow
def test_a_failed_resume_leaves_config_yaml_as_it_was(finished_run, tmp_path) -> None:
    failed = _copy(finished_run, tmp_path / "fr")
    before = (failed / "config.yaml").read_text()
    overrides = [f"out_dir={failed}", "optim.lr=0.5", "trainer.max_steps=6"]  # config.yaml names the original
    run, cfg = load_config(str(failed / "config.yaml"), overrides)
    with pytest.raises(RuntimeError, match="the data cannot be read"):
        train(run, cfg, resume=True, callbacks=[_FailAtStart()])
    assert (failed / "config.yaml").read_text() == before  # not lr 0.5, which no step ran with
    with pytest.raises(ConfigError, match="trainer.max_steps=3 is below the checkpoint's step 4"):
        train(
            *load_config(str(failed / "config.yaml"), [f"out_dir={failed}", "trainer.max_steps=3"]),
            resume=True,
        )
    assert (failed / "config.yaml").read_text() == before
