"""Review s20: the numbers a training or evaluation run reports, against plain-torch recomputations.

- validation metrics (loss, perplexity, accuracy, loss by position) are per scored token: a last partial
  batch, rows that score nothing and ignored targets change nothing but what they should;
- ``innerloop eval``'s numbers and CSV equal a per-token recomputation from the checkpoint over the same
  windows, whatever the batch size (a last partial batch);
- the split of files into training and validation is a pure function of their keys (golden values:
  another hash, e.g. Python's salted ``hash()``, would move files between runs and machines);
- the warm-up and wsd decay lengths are the documented ``fraction x max_steps`` (review s20 LOW: 0.29 of
  100 steps was 28, float rounding);
- ``train_loss`` under gradient accumulation is the loss of the optimizer step (review s20 LOW: it was
  the last micro-batch's only).
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from innerloop.config.schema import RunConfig
from innerloop.data.text import split_by_file
from innerloop.train.data import IGNORE_INDEX, FixedExamples, spread_windows
from innerloop.train.metrics import position_buckets
from innerloop.train.module import LanguageModelModule, load_module, save_model_checkpoint
from innerloop.train.run import evaluate

MODEL = {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 32}
BUCKETS = 4


def _module(seed: int = 0) -> LanguageModelModule:
    torch.manual_seed(seed)
    return LanguageModelModule(model=dict(MODEL), num_position_buckets=BUCKETS, diagnostics_batches=0).eval()


@torch.no_grad()
def _reference(
    module: LanguageModelModule, inputs: torch.Tensor, targets: torch.Tensor, buckets: int = BUCKETS
) -> dict[str, float]:
    """Per-token loss, perplexity, accuracy and loss per position bucket, one window at a time, float64."""
    length = inputs.shape[1]
    total, count, correct = 0.0, 0, 0
    by_position = torch.zeros(length, dtype=torch.float64)
    scored_at = torch.zeros(length, dtype=torch.float64)
    for x, y in zip(inputs, targets, strict=True):
        logits = module(x[None]).double()[0]  # [T, V]
        scored = y != IGNORE_INDEX
        loss = F.cross_entropy(logits, y.clamp(min=0), reduction="none")
        total += float(loss[scored].sum())
        count += int(scored.sum())
        correct += int((logits.argmax(-1) == y)[scored].sum())
        by_position += torch.where(scored, loss, 0.0)
        scored_at += scored.double()
    result = {"val_loss": total / count, "val_ppl": math.exp(total / count), "val_acc": correct / count}
    for b, (start, end) in enumerate(position_buckets(length, buckets)):
        result[f"val_loss_pos/{b}"] = float(by_position[start:end].sum() / scored_at[start:end].sum())
    return result


def _validate(module: LanguageModelModule, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int):
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    loader = DataLoader(FixedExamples(inputs, targets), batch_size=batch_size, shuffle=False)
    return {k: float(v) for k, v in trainer.validate(module, dataloaders=loader, verbose=False)[0].items()}


def test_validation_metrics_weight_tokens_not_batches_with_ignored_targets_and_a_partial_batch() -> None:
    """7 windows in batches of 3 (the last holds one), ignored targets spread unevenly, one row scoring
    nothing: every metric equals the per-token recomputation (a mean of batch means would not)."""
    module = _module()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 256, (7, 12), generator=generator)
    targets = torch.randint(0, 256, (7, 12), generator=generator)
    ignored = torch.rand(7, 12, generator=generator) < torch.linspace(0.0, 0.8, 7)[:, None]
    targets[ignored] = IGNORE_INDEX
    targets[2] = IGNORE_INDEX  # a row that scores nothing (as a rank's padding row)
    targets[6, :3] = torch.tensor([5, 6, 7])  # the partial batch scores a few tokens, early positions
    targets[6, 3:] = IGNORE_INDEX
    got = _validate(module, inputs, targets, batch_size=3)
    expected = _reference(module, inputs, targets)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


@pytest.mark.slow  # evaluates at several batch sizes: ~0.3 s
def test_eval_numbers_and_csv_equal_a_recomputation_whatever_the_batch_size(tmp_path) -> None:
    """``evaluate`` of a checkpoint on a file: 5 windows (fewer than the 6 asked for, the file holds no
    more) in batches of 2 and of 5 give the recomputed numbers, and its CSV the recomputed buckets."""
    module = _module(seed=3)
    checkpoint = save_model_checkpoint(module.model, tmp_path / "model.safetensors")
    text = bytes(random.Random(0).choice(b"abcdef ghij\n") for _ in range(5 * 16 + 3))
    data = tmp_path / "data.txt"
    data.write_bytes(text)
    tokens = torch.frombuffer(bytearray(text + b"\0"), dtype=torch.uint8)
    inputs, targets = spread_windows(tokens, 16, 5)
    assert inputs.shape == (5, 16)
    loaded = load_module(checkpoint)
    buckets = loaded.hparams.num_position_buckets  # a converted model records the default, 16
    expected = _reference(loaded, inputs, targets, buckets)
    for batch_size in (2, 5):
        out = tmp_path / f"b{batch_size}"
        metrics, csv_path, _ = evaluate(
            checkpoint, [str(data)], seq_len=16, batch_size=batch_size, batches=3 if batch_size == 2 else 1,
            out_dir=out, progress_bar=False,
        )  # fmt: skip
        assert metrics["windows"] == 5 and metrics["tokens"] == 5 * 16
        for name in ("val_loss", "val_ppl", "val_acc"):
            assert metrics[name] == pytest.approx(expected[name], rel=1e-5), name
        with open(csv_path, newline="") as file:
            rows = list(csv.DictReader(file))
        assert [(int(r["start"]), int(r["end"])) for r in rows] == position_buckets(16, buckets)
        for b, row in enumerate(rows):
            assert float(row["loss"]) == pytest.approx(expected[f"val_loss_pos/{b}"], abs=2e-6)


def test_the_split_by_file_is_a_fixed_function_of_the_keys() -> None:
    """Golden values: the same keys split the same way in every process and on every machine (a salted
    hash, or a hash of the absolute path, would not)."""
    files = [Path(f"/anywhere/{c}.py") for c in "abcdefghijklmnop"]
    _, val = split_by_file(files, 0.3)
    assert [p.name for p in val] == ["b.py", "d.py", "e.py", "g.py", "i.py", "n.py", "o.py"]
    moved = [Path(f"/elsewhere/deeper/{c}.py") for c in "abcdefghijklmnop"]
    assert [p.name for p in split_by_file(moved, 0.3)[1]] == [p.name for p in val]


def _run(warmup_fraction: float, decay_fraction: float, max_steps: int) -> RunConfig:
    run = RunConfig()
    optim = replace(run.optim, warmup_fraction=warmup_fraction, schedule="wsd", decay_fraction=decay_fraction)
    return replace(run, optim=optim, trainer=replace(run.trainer, max_steps=max_steps))


def test_whole_step_counts_of_warm_up_and_decay_are_as_documented() -> None:
    """Fractions whose product with max_steps is a whole number in floating point stay so (control)."""
    from innerloop.config.load import decay_steps, warmup_steps

    assert warmup_steps(_run(0.1, 0.2, 600)) == 60
    assert decay_steps(_run(0.1, 0.2, 600)) == 120
    assert warmup_steps(_run(0.1, 0.2, 6)) == 0  # 0.6 steps: floor, as int() does


def test_the_warm_up_and_decay_are_fraction_times_max_steps_without_float_rounding() -> None:
    """docs/training.md: ``W = optim.warmup_fraction x trainer.max_steps`` and ``D = optim.decay_fraction x
    N``; 0.29 x 100 is 29 steps, but ``int(0.29 * 100)`` is 28 (0.29 * 100 = 28.999999999999996)."""
    from innerloop.config.load import decay_steps, warmup_steps

    assert warmup_steps(_run(0.29, 0.57, 100)) == 29
    assert decay_steps(_run(0.29, 0.57, 100)) == 57


class _MicroBatchLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []  # (global step, the micro-batch's own loss)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning hands back the loss divided by the accumulation factor
        self.losses.append((trainer.global_step, float(outputs["loss"]) * trainer.accumulate_grad_batches))


@pytest.mark.slow  # a whole 3-step training run through train() (0.2-0.4 s idle, more on a loaded machine)
def test_train_loss_under_accumulation_is_the_loss_of_the_optimizer_step(tmp_path) -> None:
    """With ``trainer.accumulate_grad_batches=2`` each optimizer step is on the mean of its two
    micro-batches' losses (docs/training.md); the ``train_loss`` logged for that step should be that
    mean, but it is the second micro-batch's loss alone."""
    from innerloop.config import load_config
    from innerloop.train import train

    corpus = tmp_path / "corpus.txt"
    rng = random.Random(0)
    corpus.write_text("\n".join(" ".join(rng.choice(["def", "x", "return", "(", ")"]) for _ in range(10))
                      for _ in range(400)))  # fmt: skip
    run, cfg = load_config("tiny", [
        "model.hidden_size=16", "model.num_heads=2", "model.num_layers=1", "model.intermediate_size=32",
        "model.ttt.mini_batch_size=8", "data.seq_len=16", "data.batch_size=2", "data.val_batches=1",
        f"data.paths=[{corpus}]", "trainer.max_steps=3", "trainer.val_every=3", "trainer.log_every=1",
        "trainer.progress_bar=false", "trainer.accumulate_grad_batches=2", f"out_dir={tmp_path / 'run'}",
    ])  # fmt: skip
    recorder = _MicroBatchLosses()
    train(run, cfg, callbacks=[recorder])
    with open(tmp_path / "run" / "logs" / "version_0" / "metrics.csv", newline="") as file:
        logged = {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(file) if r.get("train_loss")}
    # micro-batches 2k and 2k+1 make optimizer step k
    per_step = [recorder.losses[i : i + 2] for i in range(0, len(recorder.losses), 2)]
    assert len(per_step) == 3 and sorted(logged) == [0, 1, 2]
    for step, pair in enumerate(per_step):
        assert logged[step] == pytest.approx(sum(loss for _, loss in pair) / 2, rel=1e-5), step
