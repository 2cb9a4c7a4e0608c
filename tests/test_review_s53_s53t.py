"""Review s53t: a checkpoint copied beside another run's config.yaml is scored on the data its own run
recorded (every ``data.*`` and ``seed`` of :data:`~innerloop.train.run.RUN_DATA_KEY`, not only the keys
that choose the text), and eval says the config.yaml was overruled, naming the keys that differ."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from innerloop.config.load import load_config, save_config
from innerloop.train.checkpoint import save_checkpoint
from innerloop.train.module import LanguageModelModule
from innerloop.train.run import RUN_DATA_KEY, evaluate, run_data_record

MODEL = {"hidden_size": 16, "num_heads": 2, "num_layers": 2, "intermediate_size": 32}
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120))


def _overrides(out: Path, data: Path | None, *extra: str) -> list[str]:
    return [
        *(f"model.{key}={value}" for key, value in MODEL.items()),
        "model.ttt.mini_batch_size=4", "data.seq_len=16", "data.batch_size=3", "data.val_batches=2",
        "trainer.num_position_buckets=4", f"out_dir={out}", *([f"data.paths=[{data}]"] if data else []), *extra,
    ]  # fmt: skip


def _run_folder(out: Path, data: Path | None, *extra: str) -> Path:
    """A run folder as `innerloop train` leaves it: its config.yaml and a checkpoint recording the run's
    data.* and seed (untrained weights); the checkpoint's path."""
    run, config = load_config("tiny", _overrides(out, data, *extra))
    module = LanguageModelModule(model=asdict(run.model), seq_len=16, num_position_buckets=4)
    tree = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "global_step": 0,
        RUN_DATA_KEY: run_data_record(run),
    }
    checkpoint = save_checkpoint(tree, out / "last.safetensors")
    save_config(config, out / "config.yaml")
    return checkpoint


@pytest.mark.slow  # ~1 s: three evaluations of 6 windows
@pytest.mark.parametrize(
    ("other", "key"),
    [
        (["data.val_batches=5"], "data.val_batches"),  # was: 15 windows of the other run's count
        (["data.batch_size=4"], "data.batch_size"),  # was: 8 windows
        (["model.hidden_size=32"], "model.hidden_size"),  # another model: was the default corpus
    ],
)
def test_a_checkpoint_beside_another_runs_config_is_scored_on_its_own_record_and_says_so(
    tmp_path, capsys, other, key
) -> None:
    data = tmp_path / "code.py"
    data.write_text(TEXT)
    own = _run_folder(tmp_path / "a", data)
    _run_folder(tmp_path / "b", data, *other)
    copied = tmp_path / "b" / "a.safetensors"
    shutil.copy(own, copied)
    beside_its_own = evaluate(own, progress_bar=False)[0]
    assert "another run's" not in capsys.readouterr().out  # a config.yaml that agrees is read as it is
    beside_another = evaluate(copied, progress_bar=False)[0]
    printed = capsys.readouterr().out
    assert beside_another == beside_its_own  # the same 6 windows, the same number
    assert beside_another["windows"] == 6
    assert "the config.yaml beside" in printed and "is another run's" in printed, printed
    assert key in printed and "as the checkpoint recorded them" in printed, printed


@pytest.mark.slow  # ~0.5 s: the CLI's checks, refused before any evaluation
def test_an_output_folder_inside_the_data_a_checkpoint_alone_records_is_refused(tmp_path, capsys) -> None:
    from innerloop.cli import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "code.py").write_text(TEXT)
    checkpoint = _run_folder(tmp_path / "run", data)
    alone = tmp_path / "alone" / "last.safetensors"
    alone.parent.mkdir()
    shutil.copy(checkpoint, alone)
    # was: eval read the recorded data and wrote its CSV and PNG into the training data folder
    assert main(["eval", str(alone), "--out", str(data / "results"), "--batches", "1"]) == 2
    assert "lies inside" in capsys.readouterr().err
    assert not (data / "results").exists()


@pytest.mark.slow  # ~1 s: an evaluation through the CLI
def test_a_recall_checkpoint_beside_a_text_runs_config_says_nats_per_token(tmp_path, capsys) -> None:
    from innerloop.cli import main

    data = tmp_path / "code.py"
    data.write_text(TEXT)
    recall = ["data.name=recall", "data.recall.num_pairs=2", "data.recall.gap=9"]  # 4 * 2 + 9 - 1 = 16
    checkpoint = _run_folder(tmp_path / "recall", None, *recall)
    _run_folder(tmp_path / "text", data)
    copied = tmp_path / "text" / "recall.safetensors"
    shutil.copy(checkpoint, copied)
    assert main(["eval", str(copied), "--batches", "1", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "data.name 'text' != 'recall'" in printed, printed  # scored on the recall task it recorded
    line = next(line for line in printed.splitlines() if line.startswith("perplexity"))
    assert "nats/token" in line, line  # was nats/byte: the text config's unit
