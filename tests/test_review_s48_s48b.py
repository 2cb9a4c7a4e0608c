"""Review s48b: training through Lightning, configs, metrics and the CLI.

Covers: ``trainer.validate`` / ``trainer.test`` with several loaders returned every loader's metrics
in each loader's dict, so Lightning's printed table (which drops the ``/dataloader_idx_<i>`` suffix)
showed the last loader's numbers in every loader's column; an atomic rewrite of a file the user had
made private (``chmod 600``) or read-only gave it the umask's permissions; a recall run's config.yaml
said ``data.seq_len: 128`` (the default) while the run trained on the task's 95 tokens; the CPU kernel's compiled library was renamed into its cache
without an fsync; a SIGTERM while a command starts (reading the data) ended it without a word.
"""

from __future__ import annotations

import os
import stat

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from innerloop.config import load_config
from innerloop.data.atomic import atomic_write_text
from innerloop.models import ModelConfig
from innerloop.train import LanguageModelModule, load_checkpoint, train


def _windows(seed: int, count: int) -> DataLoader:
    """``count`` (inputs, targets) batches of 2 windows of 8 random bytes."""
    ids = torch.randint(0, 256, (count, 2, 9), generator=torch.Generator().manual_seed(seed))
    return DataLoader([(ids[i, :, :-1], ids[i, :, 1:]) for i in range(count)], batch_size=None)


def _small_module() -> LanguageModelModule:
    torch.manual_seed(0)
    config = ModelConfig(
        hidden_size=8, num_heads=1, num_layers=1, intermediate_size=16, ttt={"mini_batch_size": 4}
    )
    return LanguageModelModule(config, num_position_buckets=1, diagnostics_batches=1).eval()


@pytest.mark.slow  # four Trainer evaluations: ~1 s on this loaded machine
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_each_loader_s_dict_holds_its_own_metrics_only(stage, capsys) -> None:
    """Lightning returns one dict per loader; every dict held every loader's metrics (they were logged
    at the evaluation's end, which Lightning adds to every loader's dict), and the printed table, which
    strips the loader suffix, showed loader 1's val_loss in loader 0's column too."""
    module = _small_module()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    evaluate = getattr(trainer, stage)
    prefix = "val_" if stage == "validate" else "test_"
    alone = [
        evaluate(module, dataloaders=_windows(seed, count), verbose=False)[0]
        for seed, count in [(1, 2), (2, 1)]
    ]
    both = evaluate(module, dataloaders=[_windows(1, 2), _windows(2, 1)], verbose=True)
    printed = capsys.readouterr().out
    assert len(both) == 2
    for i, (results, one) in enumerate(zip(both, alone, strict=True)):
        others = [name for name in results if f"dataloader_idx_{1 - i}" in name]
        assert others == [], f"loader {i}'s dict holds loader {1 - i}'s {others}"
        assert results[f"{prefix}loss/dataloader_idx_{i}"] == pytest.approx(one[f"{prefix}loss"], rel=1e-6)
        assert results[f"{prefix}acc/dataloader_idx_{i}"] == pytest.approx(one[f"{prefix}acc"], rel=1e-6)
    assert one[f"{prefix}loss"] != alone[0][f"{prefix}loss"]
    for value in (alone[0][f"{prefix}loss"], alone[1][f"{prefix}loss"]):
        assert f"{value:.6}"[:6] in printed  # each loader's loss in its own column
    logged = trainer.logged_metrics  # the loggers still get every loader's numbers
    assert {f"{prefix}loss/dataloader_idx_0", f"{prefix}loss/dataloader_idx_1"} <= set(logged)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444])
def test_an_atomic_rewrite_keeps_the_file_s_permissions(tmp_path, mode) -> None:
    """A file rewritten atomically (config.yaml by --resume, an eval CSV, a checkpoint) got the umask's
    permissions: a config.yaml made private (chmod 600) became readable by everyone (0644), and a
    read-only one writable. The rewrite keeps the mode of the file it replaces; a new file still gets the
    umask's."""
    path = tmp_path / "config.yaml"
    path.write_text("seed: 0\n")
    os.chmod(path, mode)
    atomic_write_text(path, "seed: 1\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert path.read_text() == "seed: 1\n"
    umask = os.umask(0)
    os.umask(umask)
    fresh = atomic_write_text(tmp_path / "new.yaml", "seed: 2\n")
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o666 & ~umask


RECALL_RUN = [
    "data.name=recall", "data.recall.num_pairs=2", "data.recall.gap=9", "data.batch_size=2",
    "data.val_batches=1", "model.hidden_size=8", "model.num_heads=1", "model.num_layers=1",
    "model.intermediate_size=16", "model.ttt.mini_batch_size=4", "trainer.max_steps=1",
    "trainer.val_every=1", "trainer.progress_bar=false", "trainer.num_position_buckets=1",
]  # fmt: skip


@pytest.mark.slow  # ~2 s: one step of a tiny recall run, and its resume
def test_a_recall_run_s_config_yaml_says_the_length_it_trained_on(tmp_path) -> None:
    """The recall task makes sequences of 4 * num_pairs + gap - 1 tokens (15 here), but config.yaml kept
    data.seq_len at its default 128: the file that says what ran said another length. A new run saves
    the task's length; the run repeats from its config.yaml and resumes."""
    run, cfg = load_config("tiny", [*RECALL_RUN, f"out_dir={tmp_path / 'run'}"])
    result = train(run, cfg)
    saved, _ = load_config(str(result.config), [f"out_dir={tmp_path / 'again'}"])
    assert saved.data.seq_len == 4 * 2 + 9 - 1
    assert load_checkpoint(result.checkpoint)["hyper_parameters"]["seq_len"] == saved.data.seq_len
    resumed, cfg = load_config(str(result.config), ["trainer.max_steps=2"], out_dir=str(tmp_path / "run"))
    assert train(resumed, cfg, resume=True).metrics["val_step"] == 2


def test_the_cpu_kernel_s_library_is_on_disk_before_its_rename(tmp_path, monkeypatch) -> None:
    """The compiled library was renamed into the cache without an fsync: after a power cut a file
    system may keep the rename and not the bytes (XFS shows the unwritten blocks as zeros, at the right
    size), which the truncation check passes and dlopen refuses, leaving the CPU kernels off until the
    file is deleted by hand. The bytes are flushed before the rename, and the folder after it."""
    from innerloop.kernels.cpu import build

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(source, target) -> None:
        events.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(build, "_compile_first_that_loads", lambda compiler, temporary: None)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    build._build_into("c++", tmp_path, tmp_path / "ttt_stack-test.so")
    assert events == ["fsync file", "rename", "fsync folder"]
    assert (tmp_path / "ttt_stack-test.so").exists()


def test_sigterm_before_training_starts_ends_the_command_with_one_line(monkeypatch, capsys) -> None:
    """A SIGTERM while a command starts (the config checks, reading and tokenizing the data: minutes on
    a large corpus), before training's own handler takes it, ended the process by the signal's default
    action: status 143 and not a word, where Ctrl-C there says 'interrupted'. It says so now, with the
    same status, and the handler from before is back after the command."""
    import signal

    from innerloop import cli

    def preparing_data(args) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the SIGTERM did not stop the command")

    monkeypatch.setitem(cli._HANDLERS, "train", preparing_data)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["train"]) == 128 + signal.SIGTERM
    assert "innerloop train: stopped by SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
