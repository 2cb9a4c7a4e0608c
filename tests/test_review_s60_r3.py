"""Session 60, review helper r3 (training, data, metrics, checkpoints on disk): regression tests."""

from __future__ import annotations

import pytest

from innerloop.cli import main
from innerloop.models import ModelConfig, build_model
from innerloop.train.module import save_model_checkpoint
from innerloop.train.run import scored_count


def test_scored_count_says_one_window_and_one_token_in_the_singular() -> None:
    assert scored_count({"tokens": 128.0, "windows": 1.0}) == "128 tokens in 1 window"
    assert scored_count({"tokens": 1.0, "windows": 1.0}) == "1 token in 1 window"
    assert scored_count({"tokens": 4096.0, "windows": 32.0}) == "4096 tokens in 32 windows"


@pytest.mark.slow  # one Lightning validation of a tiny model: ~0.5 s
def test_eval_of_one_window_says_1_window_in_its_line_and_its_record(tmp_path, capsys) -> None:
    """`innerloop eval` of a text that holds one window printed and recorded "128 tokens in 1 windows"."""
    model = build_model(ModelConfig(hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32))
    checkpoint = save_model_checkpoint(model, tmp_path / "m.safetensors")
    (tmp_path / "text.txt").write_text("b" * 40)  # 40 bytes: one window of 32 tokens
    args = [
        "eval",
        str(checkpoint),
        "--data",
        str(tmp_path / "text.txt"),
        "--seq-len",
        "32",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("perplexity:"))
    assert line.endswith("nats/byte, 32 tokens in 1 window)"), line
    (record,) = tmp_path.glob("eval_*.md")
    assert ", 32 tokens in 1 window)" in record.read_text()
