"""Models of every depth, and every size-1 dimension (batch, heads, position buckets, a sequence of
one mini-batch), train with validation and evaluate.

torchmetrics squeezes a one-element metric result to a 0-d tensor; a 1-layer model (one inner-loss
diagnostic) or one position bucket used to crash at the first validation.
"""

from __future__ import annotations

import pytest

from innerloop.cli import main
from innerloop.train import load_checkpoint
from innerloop.train.plots import read_loss_by_position_csv

# Small enough for about a second per run on a CPU; a validation at step 2 and at the end (step 3).
SMALL = [
    "model.hidden_size=16",
    "model.num_heads=2",
    "model.intermediate_size=32",
    "data.seq_len=16",
    "data.batch_size=2",
    "data.val_batches=1",
    "trainer.max_steps=3",
    "trainer.val_every=2",
    "trainer.checkpoint_every=3",
    "trainer.progress_bar=false",
    "trainer.num_position_buckets=2",
]
MIXERS = {
    "ttt": ["--config", "tiny", "model.ttt.mini_batch_size=8", "trainer.diagnostics_batches=1"],
    "attention": ["--config", "tiny-attention"],
    "e2e": ["--config", "e2e-tiny", "model.window=8", "model.e2e.chunk_size=8"],
}


def _train(out, *overrides: str) -> None:
    assert main(["train", *overrides, f"out_dir={out}"]) == 0
    assert load_checkpoint(out / "last.safetensors")["global_step"] == 3


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("mixer", list(MIXERS))
def test_every_depth_trains_and_validates(tmp_path, capsys, mixer, num_layers) -> None:
    out = tmp_path / "run"
    _train(out, *MIXERS[mixer], *SMALL, f"model.num_layers={num_layers}")
    printed = capsys.readouterr().out
    assert "validation perplexity:" in printed
    metrics = (out / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    if mixer == "ttt":  # one inner-loss diagnostic per layer, each logged under its own name
        assert {f"inner_loss_before/{i}" for i in range(num_layers)} <= set(metrics)
        assert f"inner_loss_before/{num_layers}" not in metrics
    assert {"val_loss_pos/0", "val_loss_pos/1"} <= set(metrics)


def test_size_one_dimensions_train_validate_and_evaluate(tmp_path, capsys) -> None:
    """Batch 1, one head, one layer, one position bucket, a sequence of exactly one mini-batch; then an
    evaluation of length 1 (one position) with batch 1."""
    out = tmp_path / "run"
    _train(
        out,
        *MIXERS["ttt"],
        *SMALL,
        "model.num_layers=1",
        "model.num_heads=1",
        "model.ttt.mini_batch_size=16",  # = data.seq_len
        "data.batch_size=1",
        "trainer.num_position_buckets=1",
    )
    buckets, losses = read_loss_by_position_csv(out / "loss_by_position.csv")
    assert buckets == [(0, 16)] and len(losses) == 1 and 0 < losses[0] < 10
    capsys.readouterr()
    evaluated = tmp_path / "eval"
    args = ["eval", str(out / "last.safetensors"), "--seq-len", "1", "--batches", "1", "--batch-size", "1"]
    assert main([*args, "--out", str(evaluated)]) == 0
    assert "perplexity:" in capsys.readouterr().out
    assert read_loss_by_position_csv(next(evaluated.glob("*.csv")))[0] == [(0, 1)]
