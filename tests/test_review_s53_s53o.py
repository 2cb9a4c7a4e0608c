"""Review s53o: the docs, ``--help`` texts and messages kept true to the day's changes.

- A checkpoint moved or copied alone (no config.yaml beside it) is evaluated on its run's data as its
  checkpoint records it (4ebef83). docs/training.md still said that such a checkpoint's ``--data`` dataset
  file (``.jsonl``...) is refused and that compare calls its training data unknown; compare's
  ``--batch-size``/``--batches`` help said "without its config.yaml", and ``--held-out test`` of a
  checkpoint that records no run said it needs "the run's config.yaml", though the record serves too.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from innerloop.cli import main
from innerloop.config.load import ConfigError, load_config
from innerloop.train.checkpoint import save_checkpoint
from innerloop.train.compare import ComparedModel, training_data_notes
from innerloop.train.module import LanguageModelModule, load_module
from innerloop.train.run import RUN_DATA_KEY, evaluation_windows, run_data_record

SEQ_LEN = 16


def _checkpoint_alone(folder: Path, data: Path, record: bool) -> Path:
    """An untrained checkpoint with no config.yaml beside it, recording its run's ``data.*`` and seed
    (as one moved out of its run folder does) when ``record``, else no run (as a converted model)."""
    run, _ = load_config(
        "tiny",
        ["model.hidden_size=16", "model.num_heads=2", "model.num_layers=1", "model.intermediate_size=32",
         "model.ttt.mini_batch_size=4", f"data.seq_len={SEQ_LEN}", "data.batch_size=2", "data.val_batches=1",
         f"data.paths=[{data}]", "data.test_fraction=0.2", f"out_dir={folder}"],
    )  # fmt: skip
    module = LanguageModelModule(model=asdict(run.model), seq_len=SEQ_LEN, num_position_buckets=4)
    tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}
    if record:
        tree[RUN_DATA_KEY] = run_data_record(run)
    return save_checkpoint(tree, folder / "last.safetensors")


def _corpus(folder: Path) -> Path:
    text = folder / "corpus.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    return text


@pytest.mark.slow  # four window readings of an untrained 1-layer model: ~0.4 s
def test_a_checkpoint_alone_reads_its_recorded_run_as_the_docs_say(tmp_path) -> None:
    data = _corpus(tmp_path)
    alone = _checkpoint_alone(tmp_path / "alone", data, record=True)
    module = load_module(alone)
    records = tmp_path / "x.jsonl"
    records.write_text('{"text": "hello there"}\n' * 300)
    # docs/training.md: a dataset --data file is refused only where the run is unknown; the record says
    # this run read raw text, so the file is read as text
    windows = evaluation_windows(alone, module, [str(records)], SEQ_LEN)
    assert "read as text" in windows.source, windows.source
    # --held-out test reads the recorded run's test windows
    test = evaluation_windows(alone, module, [], SEQ_LEN, held_out="test")
    assert "test windows" in test.source and "recorded them" in test.source, test.source
    # compare: its training data is known (no 'no config.yaml beside' note)
    model = ComparedModel("alone", alone, module, parameters=0, tokens_trained=None, tokens_per_s=None)
    notes = training_data_notes([model], 0)
    assert not [n for n in notes if "unknown" in n or "no config.yaml" in n], notes


@pytest.mark.slow  # one checkpoint written and refused: ~0.2 s
def test_held_out_test_of_a_checkpoint_that_records_no_run_names_both_sources(tmp_path) -> None:
    data = _corpus(tmp_path)
    unknown = _checkpoint_alone(tmp_path / "converted", data, record=False)
    module = load_module(unknown)
    with pytest.raises(ConfigError) as caught:
        evaluation_windows(unknown, module, [], SEQ_LEN, held_out="test")
    message = str(caught.value)
    # was: "needs the run's config.yaml beside the checkpoint", though the checkpoint's record serves too
    assert "its config.yaml beside it, or the data.* its checkpoint records" in message, message
    assert "records no run's data" in message, message


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_help_of_batch_defaults_names_an_unknown_run_not_a_missing_config(command, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # a checkpoint alone reads its recorded run's number of windows: 128 only where the run is unknown
    assert "without its config.yaml" not in text and "without the run's config.yaml" not in text
    assert "whose run is unknown" in text
