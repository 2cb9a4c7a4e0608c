"""The family's tiny presets train: the loss falls, the checkpoint reloads to the same validation loss,
and greedy generation (prompt then one token at a time with the state) picks the tokens the whole
sequence's logits pick."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from innerloop.config import load_config
from innerloop.models.generate import generate
from innerloop.train import evaluate, load_model, train

FAMILY_PRESETS = {
    "linear-attention-tiny": "linear_attention",
    "deltanet-tiny": "deltanet",
    "gated-deltanet-tiny": "gated_deltanet",
    "titans-tiny": "titans",
}
# The preset's model, narrower, on short windows: a few seconds on a CPU.
SMALL = [
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "data.seq_len=32",
    "data.batch_size=8",
    "data.val_batches=2",
    "optim.lr=0.01",
    "trainer.max_steps=12",
    "trainer.val_every=12",
    "trainer.checkpoint_every=12",
    "trainer.progress_bar=false",
    "trainer.num_position_buckets=4",
]


@pytest.mark.slow  # ~3 s of Lightning training, evaluation and generation per preset (8-11 s on a loaded machine)
@pytest.mark.parametrize("preset", list(FAMILY_PRESETS))
def test_a_family_preset_trains_reloads_and_generates(preset, tmp_path) -> None:
    run, cfg = load_config(preset, [*SMALL, f"out_dir={tmp_path}"])
    assert run.model.mixer == FAMILY_PRESETS[preset]
    result = train(run, cfg)
    # An untrained model predicts bytes about uniformly (loss ln 256 = 5.55); twelve steps learn the
    # byte frequencies at least.
    assert result.metrics["val_loss"] < math.log(256) - 0.5, result.metrics["val_loss"]

    metrics, _, _ = evaluate(result.checkpoint, progress_bar=False)  # the run's validation windows
    assert metrics["val_loss"] == pytest.approx(result.metrics["val_loss"], rel=1e-5)

    model = load_model(result.checkpoint).eval()
    assert model.config.mixer == FAMILY_PRESETS[preset]
    prompt = torch.tensor([list(b"def main(")])
    with torch.no_grad():
        tokens = [token for token, _ in generate(model, prompt, 6, temperature=0.0)]
        sequence = torch.cat([prompt, torch.stack(tokens, dim=1)], dim=1)
        whole, _ = model(sequence)
    assert torch.equal(whole[:, prompt.shape[1] - 1 : -1].argmax(-1), sequence[:, prompt.shape[1] :])


@pytest.mark.slow  # two presets trained twice each through Lightning (~10 s); the full --quick trains eight
def test_the_family_benchmark_runs_quick(tmp_path, capsys) -> None:
    import runpy

    benchmark = runpy.run_path(str(Path(__file__).parents[2] / "benchmarks" / "family.py"))
    benchmark["main"](["--quick", "--only", "tiny", "deltanet-tiny", "--out", str(tmp_path)])
    table = (tmp_path / "family.md").read_text(encoding="utf-8")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| tiny", "| deltanet-tiny"]
    assert all(len(row.split(" | ")) == 10 for row in rows)  # every column filled
    assert len(list(tmp_path.glob("compare-*.png"))) == 1 and table in capsys.readouterr().out
