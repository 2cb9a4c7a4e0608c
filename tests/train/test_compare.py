"""innerloop compare (same windows for every model, the bootstrap band, its files), innerloop eval on
the run's own validation windows, and --no-ttt in both."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from lm_testing import untrained_run

from innerloop.cli import main
from innerloop.config.load import ConfigError, load_config, save_config
from innerloop.train import compare as compare_module
from innerloop.train.bootstrap import expanded_tail
from innerloop.train.checkpoint import save_checkpoint
from innerloop.train.compare import bootstrap_difference, compare, format_table, write_comparison
from innerloop.train.data import TextDataModule
from innerloop.train.module import LanguageModelModule
from innerloop.train.run import evaluate, validation_examples

SEQ_LEN, BATCH, VAL_BATCHES = 16, 3, 2
MODEL = {"hidden_size": 16, "num_heads": 2, "num_layers": 2, "intermediate_size": 32}
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120))


def _run(tmp_path: Path, name: str, mixer: str, seed: int) -> Path:
    """A run folder as `innerloop train` leaves it (config.yaml and an untrained last.safetensors)."""
    corpus = tmp_path / "corpus.py"
    corpus.write_text(TEXT)
    return untrained_run(tmp_path / name, corpus, mixer, seed, SEQ_LEN, BATCH, VAL_BATCHES)


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [_run(tmp_path, "ttt", "ttt", 0), _run(tmp_path, "swa", "swa", 1)]


@pytest.mark.slow  # ~0.5 s: a comparison of three models
def test_every_model_reads_the_same_windows_the_run_validated_on(runs, monkeypatch) -> None:
    seen: list[torch.Tensor] = []
    real = compare_module.token_losses

    def record(module, inputs, targets, batch_size):
        seen.append(inputs.clone())
        return real(module, inputs, targets, batch_size)

    monkeypatch.setattr(compare_module, "token_losses", record)
    comparison = compare(runs, seq_lens=[SEQ_LEN, 24])
    assert len(seen) == 4  # two models at two lengths
    run, _ = load_config(str(runs[0] / "config.yaml"))
    datamodule = TextDataModule(run.data.paths, SEQ_LEN, BATCH, run.data.val_fraction, VAL_BATCHES, run.seed)
    datamodule.setup()
    validation = datamodule.make_val_examples()[0]  # what the run's validation reads
    assert validation.shape == (VAL_BATCHES * BATCH, SEQ_LEN)
    assert torch.equal(seen[0], validation) and torch.equal(seen[1], validation)
    assert torch.equal(seen[2], seen[3]) and seen[2].shape == (VAL_BATCHES * BATCH, 24)
    assert torch.equal(seen[2], validation_examples(run, 24)[0])
    # And eval, by default, on the same windows: the same loss as compare's.
    metrics, _, _ = evaluate(runs[0] / "last.safetensors", progress_bar=False)
    assert metrics["tokens"] == VAL_BATCHES * BATCH * SEQ_LEN
    assert metrics["val_ppl"] == pytest.approx(comparison.lengths[0].perplexity(0), rel=1e-5)


def test_the_bootstrap_band_matches_a_direct_computation() -> None:
    windows, buckets, resamples, seed = 40, 3, 500, 7
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 15, size=(windows, buckets)).astype(float)
    per_token = 0.3 + rng.normal(0, 0.5, size=(windows, buckets))  # known per-window differences
    differences = per_token * counts
    mean, low, high = bootstrap_difference(
        torch.tensor(differences), torch.tensor(counts), resamples, 0.9, seed
    )
    # The same draws, resample by resample, in numpy.
    picks = torch.randint(
        windows, (resamples, windows), generator=torch.Generator().manual_seed(seed)
    ).numpy()
    ratios = np.array([differences[p].sum(0) / counts[p].sum(0) for p in picks])  # [R, K]
    np.testing.assert_allclose(mean.numpy(), differences.sum(0) / counts.sum(0), rtol=1e-12)
    tail = expanded_tail(windows, 0.9)  # below 0.05: the band is widened for a finite sample
    assert 0.04 < tail < 0.05
    np.testing.assert_allclose(low.numpy(), np.quantile(ratios, tail, axis=0), rtol=1e-12)
    np.testing.assert_allclose(high.numpy(), np.quantile(ratios, 1 - tail, axis=0), rtol=1e-12)
    assert (low < mean).all() and (mean < high).all()
    # Identical models differ by exactly zero, with a zero-width band.
    zero = bootstrap_difference(torch.zeros(windows, buckets), torch.tensor(counts))
    assert all(torch.equal(t, torch.zeros(buckets, dtype=torch.float64)) for t in zero)


@pytest.mark.slow  # many bootstrap draws: ~0.35 s
def test_the_bootstrap_band_covers_the_true_difference_about_as_often_as_it_says() -> None:
    rng = np.random.default_rng(1)
    trials, covered = 300, 0
    for trial in range(trials):
        per_window = 0.2 + rng.normal(0, 1.0, size=(30, 1))  # true mean difference 0.2 per token
        _, low, high = bootstrap_difference(torch.tensor(per_window), torch.ones(30, 1), 400, 0.9, seed=trial)
        covered += bool(low[0] <= 0.2 <= high[0])
    assert 0.82 <= covered / trials <= 0.96  # a 90% band (percentile bootstrap runs a little narrow)


def test_bootstrap_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="must both be \\[windows >= 1, buckets\\]"):
        bootstrap_difference(torch.zeros(4, 2), torch.ones(4, 3))
    with pytest.raises(ValueError, match="confidence=1.5"):
        bootstrap_difference(torch.zeros(4, 2), torch.ones(4, 2), confidence=1.5)


@pytest.mark.slow  # ~0.7 s: a comparison through the CLI with its PNG; compare() stays fast above
def test_cli_compare_writes_the_csv_png_and_table(runs, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert (
        main(["compare", *map(str, runs), "--baseline", "swa", "--out", str(out), "--resamples", "50"]) == 0
    )
    printed = capsys.readouterr().out
    assert "2 models on the same 6 windows: the run's validation windows" in printed
    assert "| swa (baseline) |" in printed and "| ttt |" in printed
    files = sorted(p.name for p in out.iterdir())
    assert [Path(f).suffix for f in files] == [".csv", ".md", ".png"]
    with open(out / files[0], newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 * 4  # models x buckets
    baseline_rows = [r for r in rows if r["model"] == "swa"]
    assert all(float(r["diff"]) == float(r["diff_low"]) == float(r["diff_high"]) == 0 for r in baseline_rows)
    ttt = [r for r in rows if r["model"] == "ttt"]
    assert all(float(r["diff_low"]) <= float(r["diff"]) <= float(r["diff_high"]) for r in ttt)
    written = (out / files[1]).read_text()
    table = written[written.index("| model |") : written.index("\nNotes:")]
    assert written.splitlines()[0] in printed and table in printed  # the windows line and table, as printed
    assert "Notes:\n\n- ttt has 9,788 parameters" in written  # the warnings printed, kept with the table
    assert matplotlib.image.imread(out / files[2]).shape[0] > 300


def test_compare_refuses_what_it_cannot_compare(runs, tmp_path) -> None:
    with pytest.raises(
        ConfigError, match=r"baseline='nope' is none of the models compared; their names: \['ttt', 'swa'\]"
    ):
        compare(runs, baseline="nope")
    with pytest.raises(ConfigError, match="is neither a run folder nor a checkpoint file"):
        compare([runs[0], tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is a folder without a checkpoint"):
        compare([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="none of the models compared has test-time training"):
        compare([runs[1]], no_ttt=True)


@pytest.mark.slow  # ~1 s: two compares and two evaluations; compare and eval stay fast above
def test_no_ttt_in_compare_and_eval(runs, tmp_path, capsys) -> None:
    comparison = compare(runs, no_ttt=True, resamples=20)
    assert [m.name for m in comparison.models] == ["ttt (no TTT)", "swa"]  # swa has nothing to switch off
    plain = compare(runs, resamples=20)
    assert comparison.lengths[0].perplexity(0) != plain.lengths[0].perplexity(0)
    assert comparison.lengths[0].perplexity(1) == plain.lengths[0].perplexity(1)
    write_comparison(comparison, tmp_path / "c")
    assert "ttt (no TTT) (baseline)" in format_table(comparison)

    out = tmp_path / "eval"
    assert main(["eval", str(runs[0] / "last.safetensors"), "--no-ttt", "--out", str(out)]) == 0
    assert sorted(p.suffix for p in out.glob("*_no-ttt.*")) == [".csv", ".md", ".png"]
    assert main(["eval", str(runs[1] / "last.safetensors"), "--no-ttt"]) == 2
    assert "has no test-time training to switch off (model.mixer='swa')" in capsys.readouterr().err


@pytest.mark.slow  # ~0.3 s: an evaluation of a recall run
def test_eval_of_a_recall_run_reads_its_recall_validation(tmp_path) -> None:
    out = tmp_path / "recall"
    overrides = [f"model.{k}={v}" for k, v in MODEL.items()] + [
        "data.recall.num_pairs=2", "data.recall.gap=4", "data.batch_size=3", "data.val_batches=2", f"out_dir={out}",
    ]  # fmt: skip
    run, cfg = load_config("recall-ttt", overrides)
    module = LanguageModelModule(model=asdict(run.model), seq_len=11, num_position_buckets=4)
    save_checkpoint(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)},
        out / "last.safetensors",
    )
    save_config(cfg, out / "config.yaml")
    inputs, targets = validation_examples(run)
    metrics, _, _ = evaluate(out / "last.safetensors", progress_bar=False)
    assert inputs.shape == (6, 4 * 2 + 4 - 1)
    assert metrics["tokens"] == (targets >= 0).sum() == 6 * 2  # only the recalled values are scored
    with pytest.raises(ConfigError, match="seq_len=50: the 'recall' task's sequences have a fixed length"):
        evaluate(out / "last.safetensors", seq_len=50, progress_bar=False)


def test_models_with_different_tokenizers_are_refused(runs, monkeypatch) -> None:
    """Token windows mean different text to models with different tokenizers: their losses are not
    comparable, so compare refuses them by name instead of scoring one model's tokens with another."""
    from innerloop.data.tokenizer import ByteTokenizer, HFTokenizer, byte_level_tokenizer_json

    first, second = runs[0], runs[1]
    other = HFTokenizer(byte_level_tokenizer_json(), eos_token=None, source="a test")
    assert other != ByteTokenizer()
    tokenizers = {str(first): ByteTokenizer(), str(second): other}
    monkeypatch.setattr(
        compare_module,
        "checkpoint_tokenizer",
        lambda path: next(t for run, t in tokenizers.items() if str(path).startswith(run)),
    )
    with pytest.raises(ConfigError, match="must share a tokenizer"):
        compare([first, second])
    # two tokenizers whose descriptions read the same: the message says where their tokenizer.json differ
    lowercasing = json.loads(byte_level_tokenizer_json())
    lowercasing["normalizer"] = {"type": "Lowercase"}
    tokenizers[str(first)] = HFTokenizer(json.dumps(lowercasing), eos_token=None, source="a test")
    tokenizers[str(second)] = other
    assert tokenizers[str(first)].describe() == other.describe()
    with pytest.raises(ConfigError, match=r"\(their tokenizer.json differ in normalizer\): compare scores"):
        compare([first, second])


@pytest.mark.slow  # ~0.5 s: a comparison through the CLI
def test_a_model_trained_on_other_data_or_unknown_data_is_named(runs, tmp_path) -> None:
    from innerloop.train.compare import load_compared_model, training_data_notes

    def models() -> list:
        return [load_compared_model(run / "last.safetensors", run.name, False) for run in runs]

    assert training_data_notes(models(), 0) == []  # the same data: nothing to say
    config = runs[1] / "config.yaml"
    config.write_text(config.read_text().replace("val_fraction: 0.1", "val_fraction: 0.5"))
    (notes,) = training_data_notes(models(), 0)
    assert notes.startswith("swa was trained on other data than the baseline ttt: data.val_fraction=0.5")
    assert notes.endswith("the windows are the baseline's held-out text, none of which it trained on (by its data.paths, as they find files now)")  # fmt: skip
    # The other way round, the baseline holds out the last half, which swa trained on: refused.
    with pytest.raises(ConfigError, match=r"^ttt was trained on the first 90% of .*, which the windows \(the baseline's held-out text\)"):  # fmt: skip
        training_data_notes(models(), 1)
    config.unlink()
    (notes,) = training_data_notes(models(), 0)
    assert "swa: its training data is unknown" in notes


@pytest.mark.slow  # ~1 s in all: two comparisons through the CLI
@pytest.mark.parametrize("seq_len", [1000, 5000])  # longer than the validation text; than both texts
def test_a_seq_len_longer_than_the_runs_validation_text_names_the_option_given(
    runs, tmp_path, capsys, seq_len
) -> None:
    """It named data.seq_len and the training text, though the user gave --seq-len and the evaluation
    reads the validation text (the corpus: 3.2k bytes of training text, 0.4k held out)."""
    expected = f"has 411 bytes (end-of-text separators included), too few for one window of --seq-len {seq_len}, which needs {seq_len + 1}; give a shorter --seq-len, or other text (--data FILES)"
    out = tmp_path / "results"
    assert (
        main(["eval", str(runs[0] / "last.safetensors"), "--seq-len", str(seq_len), "--out", str(out)]) == 2
    )
    assert main(["compare", *map(str, runs), "--seq-len", str(seq_len), "--out", str(out)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(expected in line and "data.seq_len" not in line for line in errors), (
        errors
    )
    assert not any("cannot be read" in line for line in errors), errors  # read, but too short (s58c)


def test_the_runs_windows_at_another_seq_len_are_its_validation_text_in_windows_of_that_length(runs) -> None:
    run, _ = load_config(str(runs[0] / "config.yaml"))
    for seq_len, count in [(24, None), (40, 5), (8, 100)]:
        windows = count or VAL_BATCHES * BATCH
        datamodule = TextDataModule(run.data.paths, seq_len, windows, run.data.val_fraction, 1, run.seed)
        datamodule.setup()
        expected = datamodule.make_val_examples()
        got = validation_examples(run, seq_len, count)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
