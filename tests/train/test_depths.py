"""Models of every depth, and every size-1 dimension (batch, heads, position buckets, a sequence of
one mini-batch), train with validation and evaluate.

torchmetrics squeezes a one-element metric result to a 0-d tensor; a 1-layer model (one inner-loss
diagnostic) or one position bucket used to crash at the first validation.
"""

from __future__ import annotations

import pytest
import torch

from innerloop.cli import main
from innerloop.models import E2EConfig, ModelConfig, TTTConfig, build_model
from innerloop.testing import FLOAT64_TOLERANCE
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


# one layer of TTT (the depth that used to crash) in the fast loop; the other mixers and deeper ones in
# CI (~0.4-0.7 s each; the fast loop trains E2E in tests/models/test_e2e.py and runs every mixer's
# model in tests/models)
@pytest.mark.parametrize(
    ("mixer", "num_layers"),
    [
        pytest.param(mixer, num_layers, marks=() if (mixer, num_layers) == ("ttt", 1) else pytest.mark.slow)
        for num_layers in (1, 2, 3)
        for mixer in MIXERS
    ],
    ids=lambda value: str(value),
)
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


@pytest.mark.slow  # ~0.8 s: a training run and an evaluation
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


MODEL_CASES = [
    (mixer, num_layers, length, window)
    for mixer in ("ttt", "attention", "swa", "e2e")
    for num_layers in (1, 2)
    for length in (1, 8)
    for window in ((1, 8) if mixer in ("swa", "e2e") else (8,))
]


# a model in training mode warns that E2E trains nothing within one chunk: what these sizes are
@pytest.mark.filterwarnings("ignore::innerloop.models.e2e.OneChunkTrainingWarning")
@pytest.mark.parametrize(("mixer", "num_layers", "length", "window"), MODEL_CASES)
def test_size_one_models_keep_their_shapes_and_continue_any_split(mixer, num_layers, length, window) -> None:
    """One head, batch 1, one layer, one token, a window of one, a sequence of exactly one mini-batch
    (TTT) or one chunk (E2E): logits keep ``[B, T, V]`` and one token then the rest = the whole."""
    config = ModelConfig(
        mixer=mixer,
        hidden_size=8,
        num_heads=1,
        num_layers=num_layers,
        intermediate_size=16,
        window=window,
        ttt=TTTConfig(mini_batch_size=8),
        e2e=E2EConfig(chunk_size=8),
    )
    torch.manual_seed(0)
    model = build_model(config).double()
    ids = torch.randint(0, config.vocab_size, (1, length))
    logits, _ = model(ids)  # [1, T, V]
    assert logits.shape == (1, length, config.vocab_size)
    first, state = model(ids[:, :1])
    rest = [model(ids[:, 1:], state)[0]] if length > 1 else []
    assert (torch.cat([first, *rest], dim=1) - logits).abs().max().item() <= FLOAT64_TOLERANCE
