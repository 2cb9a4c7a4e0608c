"""The life of a training run loses no work: resume overrides apply exactly or are refused, nothing is
written before a resume is known to work, one run per out_dir, no run replaced by accident, stale
temporaries cleaned, and a diverging run stops saying so with its last finite checkpoint kept."""

from __future__ import annotations

import csv
import hashlib
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from test_train import TINY  # the tiny model and run of the end-to-end tests

from innerloop.cli import main
from innerloop.config import load_config
from innerloop.config.load import ConfigError, save_config
from innerloop.core.wording import counted
from innerloop.data.atomic import atomic_write
from innerloop.train import TrainingDivergedError, load_checkpoint, load_model, save_checkpoint, train
from innerloop.train.module import warmup_cosine
from innerloop.train.run import build_trainer
from innerloop.train.run_dir import LOCK_NAME, lock_run_dir, set_aside_previous_run, settle_previous_run

FINISHED_STEPS = 4


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The out_dir of a finished tiny run of FINISHED_STEPS steps (tests copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run, cfg = load_config("tiny", [*TINY, f"trainer.max_steps={FINISHED_STEPS}", f"out_dir={out}"])
    train(run, cfg)
    return out


def _copy_run(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    config = out / "config.yaml"  # the copy's config names its own out_dir
    config.write_text(config.read_text().replace(f"out_dir: {finished}", f"out_dir: {out}"))
    return out


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (so new, removed and changed files all show)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("innerloop train: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# -- 4. resume overrides: applied exactly and recorded, or refused ------------------------------------


class _RecordOptimizer(L.Callback):
    """The param groups' lr, weight decay and betas that each optimizer step is about to use."""

    def __init__(self):
        self.groups: dict[int, list[tuple[float, float, float, float]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        groups = trainer.optimizers[0].param_groups
        self.groups[trainer.global_step] = [(g["lr"], g["weight_decay"], *g["betas"]) for g in groups]


@pytest.mark.slow  # ~1.2 s: two training runs
def test_resume_applies_optimizer_and_trainer_overrides_exactly_and_records_them(finished, tmp_path) -> None:
    out = _copy_run(finished, tmp_path)
    overrides = ["optim.lr=0.3", "optim.min_lr=0.01", "optim.weight_decay=0.05", "optim.beta1=0.8",
                 "trainer.max_steps=7"]  # fmt: skip
    run, cfg = load_config(str(out / "config.yaml"), overrides)
    record = _RecordOptimizer()
    train(run, cfg, resume=True, callbacks=[record])

    assert sorted(record.groups) == [4, 5, 6]  # it went on from the checkpoint's step to the new max_steps
    warmup = int(0.1 * 7)
    for step, (decay, no_decay) in record.groups.items():
        lr = warmup_cosine(step, warmup, 7, 0.3, 0.01)  # the new schedule, from the step reached
        assert decay == pytest.approx((lr, 0.05, 0.8, 0.95), rel=1e-12)
        assert no_decay == pytest.approx((lr, 0.0, 0.8, 0.95), rel=1e-12)
    saved, _ = load_config(str(out / "config.yaml"))
    assert (saved.optim.lr, saved.optim.min_lr, saved.optim.weight_decay, saved.optim.beta1) == (
        0.3,
        0.01,
        0.05,
        0.8,
    )
    assert saved.trainer.max_steps == 7
    checkpoint = load_checkpoint(out / "last.safetensors")
    assert checkpoint["global_step"] == 7 and checkpoint["hyper_parameters"]["lr"] == 0.3
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.05


@pytest.mark.slow  # three training runs (~3 s); the applied-overrides resume test stays fast
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["model.hidden_size=16"], ["model.hidden_size (32 -> 16)"]),
        (["model.ttt.base_lr=0.5", "data.seq_len=16"], ["model.ttt.base_lr", "data.seq_len (32 -> 16)"]),
        (["seed=7"], ["seed (0 -> 7)"]),
    ],
)
def test_resume_refuses_model_data_and_seed_changes_before_writing_anything(
    finished, tmp_path, capsys, overrides, named
) -> None:
    out = _copy_run(finished, tmp_path)
    before = _hashes(out)
    assert main(["train", "--resume", f"out_dir={out}", *overrides]) == 2
    err = _one_error_line(capsys)
    assert "--resume cannot change" in err and all(key in err for key in named), err
    assert _hashes(out) == before
    # and the run still resumes as it was
    assert main(["train", "--resume", f"out_dir={out}", f"trainer.max_steps={FINISHED_STEPS + 1}"]) == 0
    assert load_checkpoint(out / "last.safetensors")["global_step"] == FINISHED_STEPS + 1


@pytest.mark.slow  # two resumes of a tiny run (~1 s)
def test_a_resume_may_change_the_kernel_which_changes_how_not_what_the_model_computes(
    finished, tmp_path
) -> None:
    # model.ttt.kernel is the one model key a resume may change (a run moved to a machine whose fast path
    # differs); the checkpoint's own record of it is not held against the resume either
    resumed = {}
    for kernel in ("auto", "torch"):
        out = _copy_run(finished, tmp_path / kernel)
        checkpoint = load_checkpoint(out / "last.safetensors")
        checkpoint["hyper_parameters"]["model"]["ttt"]["kernel"] = "auto"
        save_checkpoint(checkpoint, out / "last.safetensors")
        steps = f"trainer.max_steps={FINISHED_STEPS + 1}"
        assert main(["train", "--resume", f"out_dir={out}", steps, f"model.ttt.kernel={kernel}"]) == 0
        assert load_config(str(out / "config.yaml"))[0].model.ttt.kernel == kernel
        resumed[kernel] = load_checkpoint(out / "last.safetensors")
        assert resumed[kernel]["global_step"] == FINISHED_STEPS + 1
    for name, weight in resumed["auto"]["state_dict"].items():
        torch.testing.assert_close(
            resumed["torch"]["state_dict"][name], weight, rtol=1e-4, atol=1e-6, msg=name
        )


def test_named_kernel_refusal_says_why_a_named_kernel_cannot_run_and_nothing_for_those_that_can() -> None:
    from innerloop import TTTLayer
    from innerloop.kernels.dispatch import named_kernel_refusal

    def refusal(kernel: str, requires_grad: bool = True) -> str | None:
        layer = TTTLayer(32, 2, mini_batch_size=4, kernel=kernel)
        cpu = torch.device("cpu")
        return named_kernel_refusal(
            layer.update_rule,
            layer.inner_task(),
            device=cpu,
            dtype=torch.float32,
            head_dim=16,
            requires_grad=requires_grad,
        )

    assert refusal("auto") is None and refusal("torch") is None and refusal("cpu_ttt_linear") is None
    reason = refusal("triton_ttt_linear")  # not on a CPU outside the interpreter
    assert reason is not None and "triton_ttt_linear" in reason and "cannot run here" not in reason, reason


def test_a_kernel_that_cannot_train_here_is_refused_before_the_run_writes_anything(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = ["train", *TINY, "trainer.max_steps=1", "trainer.accelerator=cpu", f"out_dir={out}"]
    assert main([*args, "model.ttt.kernel=triton_ttt_linear"]) == 2
    err = _one_error_line(capsys)
    assert (
        "model.ttt.kernel='triton_ttt_linear' cannot train this run on cpu (32-true): triton_ttt_linear"
        in err
    )
    assert "model.ttt.kernel=auto" in err
    assert not out.exists()


@pytest.mark.slow  # a model restored and evaluated (~1 s)
def test_a_checkpoint_trained_on_a_kernel_that_cannot_run_here_runs_on_auto_saying_so(
    finished, tmp_path
) -> None:
    from innerloop import TTTLayer

    out = _copy_run(finished, tmp_path)
    checkpoint = load_checkpoint(out / "last.safetensors")
    checkpoint["hyper_parameters"]["model"]["ttt"]["kernel"] = "triton_ttt_linear"  # as trained on a GPU
    save_checkpoint(checkpoint, out / "last.safetensors")
    with pytest.warns(
        UserWarning, match=r"trained with model.ttt.kernel='triton_ttt_linear', which cannot run here"
    ):
        model = load_model(out / "last.safetensors")
    layers = [m for m in model.modules() if isinstance(m, TTTLayer)]
    assert layers and all(layer.kernel == "auto" for layer in layers)
    tokens = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        logits, _ = model(tokens)
    with torch.no_grad():
        reference, _ = load_model(finished / "last.safetensors")(tokens)
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)  # the same weights on the same path
    with pytest.warns(UserWarning, match="which cannot run here"):
        assert main(["eval", str(out / "last.safetensors"), "--batches", "1"]) == 0


@pytest.mark.slow  # a model restored (~0.5 s)
def test_a_checkpoint_trained_on_a_kernel_no_plugin_registers_here_loads_on_auto_saying_so(
    finished, tmp_path
) -> None:
    from innerloop import TTTLayer
    from innerloop.train import load_module

    out = _copy_run(finished, tmp_path)
    checkpoint = load_checkpoint(out / "last.safetensors")
    checkpoint["hyper_parameters"]["model"]["ttt"]["kernel"] = (
        "my_plugins_kernel"  # its package not installed
    )
    save_checkpoint(checkpoint, out / "last.safetensors")
    for load in (load_model, load_module):
        with pytest.warns(
            UserWarning, match=r"model.ttt.kernel='my_plugins_kernel', which no plugin registers here"
        ):
            model = load(out / "last.safetensors")
        layers = [m for m in model.modules() if isinstance(m, TTTLayer)]
        assert layers and all(layer.kernel == "auto" for layer in layers)


@pytest.mark.slow  # ~0.5 s: a training run, then a resume
def test_resume_refuses_a_max_steps_behind_the_checkpoint(finished, tmp_path, capsys) -> None:
    out = _copy_run(finished, tmp_path)
    before = _hashes(out)
    assert main(["train", "--resume", f"out_dir={out}", "trainer.max_steps=2"]) == 2
    err = _one_error_line(capsys)
    assert "trainer.max_steps=2" in err and f"the checkpoint's step {FINISHED_STEPS}" in err
    assert _hashes(out) == before


# -- 9. a failed resume writes nothing ---------------------------------------------------------------


def test_resume_from_a_checkpoint_of_another_model_fails_before_writing_anything(
    finished, tmp_path, capsys
) -> None:
    out = _copy_run(finished, tmp_path)
    checkpoint = load_checkpoint(out / "last.safetensors")
    checkpoint["hyper_parameters"]["model"]["num_heads"] = 4  # same weight shapes, another model
    save_checkpoint(checkpoint, out / "last.safetensors")
    before = _hashes(out)
    assert main(["train", "--resume", f"out_dir={out}", "trainer.max_steps=6"]) == 2
    err = _one_error_line(capsys)
    assert "holds another model" in err and "model.num_heads (4 -> 2)" in err
    assert _hashes(out) == before


def test_resume_from_weights_of_other_shapes_fails_before_writing_anything(
    finished, tmp_path, capsys
) -> None:
    out = _copy_run(finished, tmp_path)
    checkpoint = load_checkpoint(out / "last.safetensors")
    checkpoint["state_dict"]["model.norm.weight"] = torch.ones(16)
    save_checkpoint(checkpoint, out / "last.safetensors")
    before = _hashes(out)
    assert main(["train", "--resume", f"out_dir={out}", "trainer.max_steps=6"]) == 2
    err = _one_error_line(capsys)
    assert "does not fit this run's model" in err and "model.norm.weight" in err
    assert _hashes(out) == before


@pytest.mark.parametrize("flag", ["resume", "overwrite"])
def test_a_run_whose_trainer_cannot_be_built_leaves_the_out_dir_as_it_was(finished, tmp_path, flag) -> None:
    out = _copy_run(finished, tmp_path)
    before = _hashes(out)
    run, cfg = load_config(str(out / "config.yaml"), ["trainer.max_steps=6"])
    run.trainer.accelerator = "mps"  # no MPS on this machine: Lightning refuses to build the Trainer
    with pytest.raises((MisconfigurationException, ConfigError), match="MPS|mps"):
        train(run, cfg, **{flag: True})
    assert _hashes(out) == before


# -- 7. no run replaced by accident ------------------------------------------------------------------


@pytest.mark.slow  # ~0.5 s: a second training run, with --overwrite
def test_training_into_an_out_dir_that_holds_a_run_is_refused_unless_overwrite(
    finished, tmp_path, capsys
) -> None:
    out = _copy_run(finished, tmp_path)
    before = _hashes(out)
    new_run = ["train", *TINY, "model.hidden_size=16", "trainer.max_steps=2", f"out_dir={out}"]
    assert main(new_run) == 2
    err = _one_error_line(capsys)
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert _hashes(out) == before

    assert main([*new_run, "--overwrite"]) == 0
    assert load_checkpoint(out / "last.safetensors")["global_step"] == 2
    assert load_model(out / "last.safetensors").config.hidden_size == 16
    assert load_config(str(out / "config.yaml"))[0].model.hidden_size == 16


# -- 8. one run per out_dir --------------------------------------------------------------------------

# The lock as any process takes it (raw fcntl, so the holder starts at once without importing torch).
_HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow  # ~0.4 s: a lock-holding subprocess and a training run
def test_a_second_run_into_a_locked_out_dir_fails_at_once_naming_the_first(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".last.safetensors.abcd1234.tmp"  # may be a live write of the running run: kept
    stale.write_bytes(b"partial")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out / LOCK_NAME)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _hashes(out)
        assert main(["train", *TINY, "trainer.max_steps=1", f"out_dir={out}"]) == 2
        err = _one_error_line(capsys)
        assert f"in use by another run (pid {holder.pid}" in err
        assert _hashes(out) == before
    finally:
        holder.kill()  # a crash: the operating system releases the lock
        holder.wait()
    assert main(["train", *TINY, "trainer.max_steps=1", f"out_dir={out}"]) == 0
    assert not stale.exists()


# -- 12. stale temporaries of a killed run -----------------------------------------------------------


def _leftover_of_a_killed_write(target: Path) -> str:
    """Leave in ``target``'s folder the temporary file that :func:`atomic_write` was writing when its
    process was killed (same name: the write runs, then the file is put back as a kill would leave it)."""
    names = []
    atomic_write(target, lambda tmp: (names.append(Path(tmp).name), Path(tmp).write_bytes(b"half written")))
    (target.parent / names[0]).write_bytes(b"half written")
    return names[0]


@pytest.mark.slow  # ~0.4 s: a resumed training run
def test_a_run_removes_the_temporaries_a_killed_run_left_and_only_those(finished, tmp_path, caplog) -> None:
    out = _copy_run(finished, tmp_path)
    # the checkpoint, the pending checkpoint (before it is confirmed) and the config
    names = ("last.safetensors", ".last.safetensors.pending", "config.yaml")
    left = [_leftover_of_a_killed_write(tmp_path / name) for name in names]
    left.append(_leftover_of_a_killed_write(tmp_path / "loss_by_position.png"))
    for name in left:
        shutil.move(tmp_path / name, out / name)
    logs = next((out / "logs").glob("version_*"))
    left_in_logs = _leftover_of_a_killed_write(tmp_path / "metrics.csv")
    shutil.move(tmp_path / left_in_logs, logs / left_in_logs)
    assert all(name.startswith(".") and name.endswith(".tmp") for name in left)
    users = [".notes.txt.abcdefgh.tmp", ".last.safetensors.tmp", "last.safetensors.abcdefgh.tmp", "data.tmp"]
    for name in users:
        (out / name).write_text("the user's")

    with caplog.at_level(logging.WARNING, logger="innerloop.train.run_dir"):
        assert main(["train", "--resume", f"out_dir={out}", f"trainer.max_steps={FINISHED_STEPS + 1}"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == sorted(users)
    assert not (logs / left_in_logs).exists()
    removed = [r.getMessage() for r in caplog.records if "temporary file" in r.getMessage()]
    assert len(removed) == 1 and all(name in removed[0] for name in [*left, left_in_logs]), removed


# -- 13. a diverging run says so and keeps its last finite checkpoint ------------------------------


def _assert_finite_checkpoint(path: Path, step: int) -> None:
    assert load_checkpoint(path)["global_step"] == step
    assert all(torch.isfinite(p).all() for p in load_model(path).parameters())


@pytest.mark.slow  # ~5 s: a real diverging run, then a resume (non-finite weights are also tested fast below)
def test_a_diverging_run_stops_with_one_line_and_keeps_a_checkpoint_it_can_resume_from(
    tmp_path, capsys
) -> None:
    out = tmp_path / "run"
    # no weight decay: lr * weight_decay must be < 1 (8ea04ee); without it Adam's steps of about lr each
    # take 7 steps to overflow here (lr 1000 had diverged through the decay, weights times 1 - 100)
    args = ["train", *TINY, "optim.lr=3e6", "optim.weight_decay=0", "optim.grad_clip=0", "trainer.checkpoint_every=1",
            "trainer.max_steps=20", f"out_dir={out}"]  # fmt: skip
    assert main(args) == 2
    err = _one_error_line(capsys)
    assert "training diverged" in err and "optim.lr (now 3e+06;" in err and "last finite training loss" in err
    assert "non_finite" not in err and "--resume" in err
    # the loss turns NaN, or the weights turn non-finite first (which one depends on float rounding)
    diverged_at = int(re.search(r"(?:is nan|hold NaN or inf) after (\d+) optimizer steps?\b", err).group(1))
    # the checkpoint of the step whose weights gave NaN was never kept: the one before is
    _assert_finite_checkpoint(out / "last.safetensors", diverged_at - 1)
    assert f"after {counted(diverged_at - 1, 'step')}), is kept" in err  # "1 step" in the singular
    assert not list(out.glob(".*pending*")) and not list(out.glob(".*.tmp"))
    # and a resume with a lower lr goes on from it
    resume = ["train", "--resume", f"out_dir={out}", "optim.lr=1e-9", "optim.min_lr=0",
              f"trainer.max_steps={diverged_at}"]  # fmt: skip
    capsys.readouterr()
    if main(resume) == 0:
        assert load_checkpoint(out / "last.safetensors")["global_step"] == diverged_at
    else:
        # After lr 3e6 the kept weights can be so large that even a tiny step's gradient overflows
        # (whether they are depends on float rounding: the compiled TTT-Linear scan reads one step
        # further than the fused torch path did): then the resume must say so the same way and keep
        # the checkpoint it started from, untouched.
        err = _one_error_line(capsys)
        assert "training diverged" in err and "optim.lr (now 1e-09;" in err
        _assert_finite_checkpoint(out / "last.safetensors", diverged_at - 1)


class _Corrupt(L.Callback):
    """At step ``at``, set block 0's MLP output weights to ``value``: with inf, block 1's TTT layer sees
    a non-finite input in the middle of the forward."""

    def __init__(self, at: int, hook: str = "on_train_batch_start", value: float = float("inf")):
        self.at, self.value = at, value
        setattr(self, hook, self._corrupt)

    def _corrupt(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.model.blocks[0].mlp.down_proj.weight.fill_(self.value)


@pytest.mark.slow  # ~0.3 s: a training run that diverges
def test_nan_in_the_middle_of_the_forward_is_reported_as_divergence_not_bad_input(tmp_path) -> None:
    run, cfg = load_config("tiny", [*TINY, "trainer.max_steps=8", f"out_dir={tmp_path}"])
    with pytest.raises(TrainingDivergedError, match=r"training diverged: the training loss is nan after 3 "):
        train(run, cfg, callbacks=[_Corrupt(at=3)])
    _assert_finite_checkpoint(tmp_path / "last.safetensors", 2)
    assert not list(tmp_path.glob(".*pending*"))


@pytest.mark.slow  # reason: ~1 s: trains a run until its weights turn non-finite
def test_non_finite_weights_are_never_checkpointed(tmp_path) -> None:
    run, cfg = load_config("tiny", [*TINY, "trainer.max_steps=8", f"out_dir={tmp_path}"])
    corrupt_after_step_4 = _Corrupt(at=4, hook="on_train_batch_end", value=float("nan"))
    with pytest.raises(
        TrainingDivergedError, match=r"the weights or optimizer state hold NaN or inf after 4 "
    ):
        train(run, cfg, callbacks=[corrupt_after_step_4])  # 4 is a checkpoint step (checkpoint_every=2)
    _assert_finite_checkpoint(tmp_path / "last.safetensors", 2)


@pytest.mark.slow  # ~0.3 s: a training run; the checkpoint-step case stays fast
def test_non_finite_weights_at_a_validation_step_are_reported_as_divergence(tmp_path) -> None:
    run, cfg = load_config(
        "tiny", [*TINY, "trainer.max_steps=8", "trainer.checkpoint_every=3", f"out_dir={tmp_path}"]
    )
    corrupt_after_step_4 = _Corrupt(at=4, hook="on_train_batch_end", value=float("nan"))  # val_every=4
    with pytest.raises(
        TrainingDivergedError, match=r"the validation loss is not finite after 4 optimizer steps"
    ):
        train(run, cfg, callbacks=[corrupt_after_step_4])
    _assert_finite_checkpoint(tmp_path / "last.safetensors", 3)


# -- what else a run writes ------------------------------------------------------------------------


def test_resume_of_a_run_killed_before_its_first_checkpoint_says_what_to_do(tmp_path, capsys) -> None:
    run, _ = load_config("tiny", [*TINY, f"out_dir={tmp_path}"])
    save_config(run, tmp_path / "config.yaml")  # what a run killed before its first checkpoint leaves,
    (tmp_path / LOCK_NAME).touch()  # with its lock file (released by the kill)
    before = _hashes(tmp_path)
    assert main(["train", "--resume", f"out_dir={tmp_path}"]) == 2
    err = _one_error_line(capsys)
    assert "there is no checkpoint" in err and "--overwrite" in err
    assert _hashes(tmp_path) == before


def test_a_crash_while_the_metrics_log_gets_new_columns_keeps_the_log(tmp_path, monkeypatch) -> None:
    run, _ = load_config("tiny", [*TINY, f"out_dir={tmp_path}"])
    log = build_trainer(run).logger.experiment  # writes logs/version_0/metrics.csv
    log.log_metrics({"train_loss": 5.0}, step=1)
    log.save()
    written = Path(log.metrics_file_path).read_bytes()

    def killed(self, rows):
        raise KeyboardInterrupt("killed while writing")

    log.log_metrics({"train_loss": 4.0, "val_loss": 4.5}, step=2)  # a new column: the file is rewritten
    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        log.save()
    assert Path(log.metrics_file_path).read_bytes() == written


@pytest.mark.slow  # a training run (~1 s) for the DDP launcher case
def test_a_ddp_worker_process_trains_in_the_out_dir_its_rank_0_holds(tmp_path, monkeypatch) -> None:
    """Lightning's DDP launcher re-runs the command for ranks > 0 (LOCAL_RANK set); they must not
    take the lock or refuse the out_dir that rank 0 holds and has written its config to."""
    run, cfg = load_config("tiny", [*TINY, "trainer.max_steps=1", f"out_dir={tmp_path}"])
    with lock_run_dir(tmp_path):  # rank 0
        save_config(cfg, tmp_path / "config.yaml")
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert train(run, cfg).metrics["val_step"] == 1


@pytest.mark.slow  # a training run (~1 s) for the DDP launcher case
def test_a_ddp_worker_process_prints_no_summary_of_its_own(tmp_path, monkeypatch, capsys) -> None:
    # review s15 metrics, LOW: every rank's copy of the command printed the run's summary
    overrides = [*TINY, "trainer.max_steps=1", f"out_dir={tmp_path}"]
    _, cfg = load_config("tiny", overrides)
    with lock_run_dir(tmp_path):  # rank 0
        save_config(cfg, tmp_path / "config.yaml")
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert main(["train", *overrides]) == 0
    assert "validation perplexity" not in capsys.readouterr().out


# -- --overwrite keeps the previous run until the new one has a checkpoint ---------------------------


def _run_files(out: Path) -> dict[str, str]:
    return {name: sha for name, sha in _hashes(out).items() if not name.startswith("logs")}


@pytest.mark.slow  # ~3 s: a launch that fails on its data
def test_an_overwrite_that_fails_before_its_first_checkpoint_leaves_the_previous_run(
    finished, tmp_path, capsys
):
    out = _copy_run(finished, tmp_path)
    before = _run_files(out)
    args = ["train", "--overwrite", *TINY, "data.seq_len=100000000", f"out_dir={out}"]
    assert main(args) == 2  # the data is read (and refused) inside the fit, after the old run was set aside
    assert "fewer than data.seq_len" in capsys.readouterr().err
    assert _run_files(out) == before


def test_an_overwrite_killed_before_its_first_checkpoint_is_undone_at_the_next_launch(finished, tmp_path):
    out = _copy_run(finished, tmp_path)
    before = _run_files(out)
    set_aside_previous_run(out)  # what the killed launch did, then it wrote its own config.yaml
    (out / "config.yaml").write_text("out_dir: somewhere else\n")
    assert settle_previous_run(out) == [
        "config.yaml",
        "last.safetensors",
        "loss_by_position.csv",
        "loss_by_position.png",
    ]
    assert _run_files(out) == before


# -- a run that ends before max_steps, or never finishes its inner-lr warm-up, says so -----------------


@pytest.mark.slow  # ~3 s: a run stopped by trainer.max_time
def test_a_run_stopped_by_max_time_says_where_it_stopped(tmp_path, caplog) -> None:
    args = ["train", *TINY, "trainer.max_steps=10000", "trainer.max_time=00:00:00:01", f"out_dir={tmp_path}"]
    with caplog.at_level(logging.WARNING, logger="innerloop.train.run"):
        assert main(args) == 0
    stopped = [r.getMessage() for r in caplog.records if "stopped at step" in r.getMessage()]
    assert len(stopped) == 1 and "of trainer.max_steps=10000" in stopped[0] and "--resume" in stopped[0]


@pytest.mark.slow  # ~2 s: a two-step run
def test_an_inner_lr_warm_up_longer_than_the_run_is_a_warning(tmp_path, caplog) -> None:
    args = ["train", *TINY, "trainer.max_steps=2", "optim.ttt_base_lr_warmup=50", f"out_dir={tmp_path}"]
    with caplog.at_level(logging.WARNING, logger="innerloop.train.run"):
        assert main(args) == 0
    assert any("optim.ttt_base_lr_warmup=50 is longer than the run" in r.getMessage() for r in caplog.records)
