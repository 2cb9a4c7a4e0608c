"""TrainingThroughput: tokens seen and wall time in every metrics.csv row (continued exactly by a
resume), parameter counts printed and logged, and one warning when the CPU is oversubscribed."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from innerloop.config import load_config
from innerloop.train import load_checkpoint, train
from innerloop.train.throughput import (
    REFERENCE_STEPS,
    WARMUP_STEPS,
    CPUOversubscribedWarning,
    TrainingThroughput,
    oversubscription,
)

BATCH, SEQ_LEN = 4, 32
RUN = [
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "model.ttt.mini_batch_size=8",
    f"data.seq_len={SEQ_LEN}",
    f"data.batch_size={BATCH}",
    "data.val_batches=1",
    "trainer.val_every=4",
    "trainer.checkpoint_every=2",
    "trainer.log_every=1",
    "trainer.progress_bar=false",
    "trainer.num_position_buckets=4",
    "trainer.max_steps=8",
]


class _Crash(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 5:
            raise RuntimeError("simulated crash")


def _rows(out: Path, version: int) -> list[dict[str, str]]:
    with open(out / "logs" / f"version_{version}" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow  # ~4 s: two short training runs
def test_tokens_seen_and_wall_time_in_every_row_continue_after_a_resume(tmp_path, capsys) -> None:
    run, cfg = load_config("tiny", [*RUN, f"out_dir={tmp_path}"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(run, cfg, callbacks=[_Crash()])
    saved = load_checkpoint(tmp_path / "last.safetensors")
    assert saved["global_step"] == 4  # the last checkpoint
    (state,) = (v for k, v in saved["callbacks"].items() if k.startswith("TrainingThroughput"))
    assert state["tokens_seen"] == 4 * BATCH * SEQ_LEN and state["wall_seconds"] > 0
    first = _rows(tmp_path, 0)
    train(run, cfg, resume=True)
    printed = capsys.readouterr().out
    assert "model: " in printed and " parameters (embedding 8,192; mixer 2 x " in printed
    assert f"throughput: {8 * BATCH * SEQ_LEN:,} tokens seen" in printed

    rows = _rows(tmp_path, 1)
    assert rows and all(r["tokens_seen"] and r["wall_time"] for r in rows)  # every row has both
    for row in (r for r in rows if r["train_loss"]):  # a training step's row: step s read s + 1 batches
        assert float(row["tokens_seen"]) == (int(row["step"]) + 1) * BATCH * SEQ_LEN
        assert float(row["tokens_per_s"]) > 0
    assert {int(r["step"]) for r in rows if r["train_loss"]} == {4, 5, 6, 7}  # went on from step 4
    # The resumed launch's wall time goes on from the checkpoint's, not from zero.
    assert min(float(r["wall_time"]) for r in rows) > state["wall_seconds"]
    assert all(float(r["wall_time"]) > 0 for r in first)
    final = load_checkpoint(tmp_path / "last.safetensors")
    (state,) = (v for k, v in final["callbacks"].items() if k.startswith("TrainingThroughput"))
    assert state["tokens_seen"] == 8 * BATCH * SEQ_LEN
    hparams = (tmp_path / "logs" / "version_1" / "hparams.yaml").read_text()
    assert "params_total:" in hparams and "params_per_block_mixer:" in hparams


class _Clock:
    """A fake clock: each training step takes ``step_seconds`` (set by the test)."""

    def __init__(self) -> None:
        self.now, self.step_seconds = 0.0, 0.01

    def __call__(self) -> float:
        return self.now


def _drive(callback: TrainingThroughput, clock: _Clock, seconds: list[float]) -> None:
    """Run ``callback``'s hooks for one training step of each duration in ``seconds``."""
    trainer = SimpleNamespace(is_global_zero=True, world_size=1, global_step=0)
    module = SimpleNamespace(log=lambda *args, **kwargs: None)
    batch = (torch.zeros(BATCH, SEQ_LEN, dtype=torch.long), None)
    for duration in seconds:
        callback.on_train_batch_start(trainer, module, batch, 0)
        clock.now += duration
        callback.on_train_batch_end(trainer, module, None, batch, 0)
        trainer.global_step += 1


def _callback(clock: _Clock, status=(1, 2, 0.1)) -> TrainingThroughput:
    callback = TrainingThroughput(clock=clock, cpu_status=lambda: status, echo=lambda line: None)
    callback.on_train_start(SimpleNamespace(is_global_zero=True), None)
    return callback


def test_a_collapse_of_tokens_per_second_warns_once() -> None:
    clock = _Clock()
    callback = _callback(clock)
    steady = WARMUP_STEPS + REFERENCE_STEPS + 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning while the rate holds, or falls only 2x
        _drive(callback, clock, [0.01] * steady + [0.02] * 10)
    callback = _callback(clock)
    with pytest.warns(CPUOversubscribedWarning) as caught:
        _drive(callback, clock, [0.01] * steady + [0.1] * 40)  # 10x slower, for 40 steps
    assert len(caught) == 1  # one warning, not one per step
    message = str(caught[0].message)
    assert "training throughput collapsed at step" in message and "10x below" in message
    assert "torch threads 1, cores available 2, load average 0.1" in message
    assert callback.tokens_per_second() == pytest.approx(BATCH * SEQ_LEN / 0.1)
    assert callback.tokens_seen == (steady + 40) * BATCH * SEQ_LEN


def test_a_loaded_machine_warns_at_the_start_and_only_then() -> None:
    clock = _Clock()
    with pytest.warns(CPUOversubscribedWarning, match="load average is 7.5 on the 2 cores") as caught:
        callback = _callback(clock, status=(2, 2, 7.5))
        _drive(callback, clock, [0.01] * 20 + [0.5] * 10)  # the collapse that follows adds none
    assert len(caught) == 1
    assert "set trainer.threads=1" in str(caught[0].message)


def test_oversubscription_reasons() -> None:
    assert oversubscription(2, 2, 0.3) is None and oversubscription(1, 2, None) is None
    assert "torch uses 8 threads but this process may run on 2 cores" in oversubscription(8, 2, 0.0)
    assert "load average is 2.0 on the 2 cores" in oversubscription(1, 2, 2.0)
    with pytest.raises(ValueError, match="collapse_factor=1 must be > 1"):
        TrainingThroughput(collapse_factor=1)


def test_the_callback_pickles_for_ddp_spawn() -> None:
    import pickle

    copy = pickle.loads(pickle.dumps(TrainingThroughput()))
    assert copy.tokens_seen == 0 and copy.cpu_status()[1] >= 1
