"""Review s22: the numbers `innerloop eval` and `innerloop compare` report, recomputed independently, and
how they treat unusual inputs (/work/notes/review_s22_compare.md has the reproductions with trained runs).

The passing tests pin what was verified right (every number against a float64 recomputation from the
models' logits); each ``xfail(strict=True)`` pins one defect found in the review."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from innerloop.checkpoints import CheckpointError, checkpoint_tokenizer
from innerloop.config.load import ConfigError, load_config, save_config
from innerloop.train.checkpoint import save_checkpoint
from innerloop.train.compare import compare, comparison_csv, write_comparison
from innerloop.train.data import DataError, evaluation_examples
from innerloop.train.metrics import position_buckets
from innerloop.train.module import LanguageModelModule, load_module
from innerloop.train.run import evaluate, evaluation_windows, run_data_record

SEQ_LEN, BATCH, VAL_BATCHES, BUCKETS = 16, 3, 2, 4
MODEL = {"hidden_size": 16, "num_heads": 2, "num_layers": 2, "intermediate_size": 32}
WORDS = "the quick brown fox jumps over a lazy dog while some other words appear here".split()


def _text(seed: int, words: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (words,), generator=g))


def _run(
    folder: Path,
    name: str,
    mixer: str,
    data: list[str],
    seed: int,
    extra: dict | None = None,
    seq_len: int = SEQ_LEN,
) -> Path:
    """A run folder as `innerloop train` leaves it: config.yaml and an (untrained) last.safetensors."""
    out = folder / name
    overrides = [f"model.{k}={v}" for k, v in MODEL.items()] + [
        f"model.mixer={mixer}", "model.ttt.mini_batch_size=4" if mixer == "ttt" else "model.window=4",
        f"data.seq_len={seq_len}", f"data.batch_size={BATCH}", f"data.val_batches={VAL_BATCHES}",
        f"trainer.num_position_buckets={BUCKETS}", f"out_dir={out}", *data,
    ]  # fmt: skip
    run, cfg = load_config("tiny", overrides)
    torch.manual_seed(seed)
    module = LanguageModelModule(model=asdict(run.model), seq_len=seq_len, num_position_buckets=BUCKETS)
    tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}
    save_checkpoint({**tree, **(extra or {})}, out / "last.safetensors")
    save_config(cfg, out / "config.yaml")
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Text files, a TTT run and an SWA run on one corpus file, an hf run on a JSONL file."""
    root = tmp_path_factory.mktemp("s22")
    (root / "data").mkdir()
    (root / "data" / "corpus.txt").write_text(_text(0, 600))
    (root / "data" / "other.txt").write_text(_text(1, 400))
    (root / "data" / "blank.txt").write_text("")
    with open(root / "data" / "docs.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": _text(10 + i, 25)}) + "\n")
    with open(root / "data" / "unseen.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": _text(100 + i, 25)}) + "\n")
    corpus = [f"data.paths=[{root / 'data' / 'corpus.txt'}]"]
    hf = ["data.name=hf", f"data.paths=[{root / 'data' / 'docs.jsonl'}]"]
    return {
        "root": root,
        "ttt": _run(root, "ttt", "ttt", corpus, 0),
        "swa": _run(root, "swa", "swa", corpus, 1),
        "hf": _run(root, "hfrun", "ttt", hf, 2),
    }


def _token_losses(checkpoint: Path, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[W, T] float64 losses from the model's logits, computed in float64 from scratch."""
    module = load_module(checkpoint).double()
    with torch.no_grad():
        logits = module(inputs).double()
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")


# ------------------------------------------------------------------------------------------------------
# Verified right
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # compare and a float64 recomputation at several lengths: ~0.4 s
def test_compare_numbers_equal_a_float64_recomputation_at_every_length(world) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    runs = [world["ttt"], world["swa"]]
    comparison = compare(runs, seq_lens=[1, 7, 37, 7], baseline="swa", resamples=300, seed=3)
    assert [r.seq_len for r in comparison.lengths] == [1, 7, 37]  # duplicates dropped, order kept
    rows = list(csv.DictReader(io.StringIO(comparison_csv(comparison))))
    base = 1
    for result in comparison.lengths:
        checkpoint = runs[base] / "last.safetensors"
        reference = load_module(checkpoint)
        windows = evaluation_windows(
            checkpoint, reference, [], result.seq_len, tokenizer=checkpoint_tokenizer(checkpoint)
        )
        buckets = position_buckets(result.seq_len, BUCKETS)
        assert result.buckets == buckets
        counts = torch.stack([(windows.targets[:, a:b] != -100).double().sum(1) for a, b in buckets], 1)
        sums = [
            torch.stack([l[:, a:b].sum(1) for a, b in buckets], 1)
            for l in (_token_losses(r / "last.safetensors", windows.inputs, windows.targets) for r in runs)
        ]
        W = counts.shape[0]
        for m in range(2):
            ppl = math.exp(float(sums[m].sum() / counts.sum()))
            assert result.perplexity(m) == pytest.approx(ppl, rel=1e-6)
            d = sums[m] - sums[base]
            picks = torch.randint(W, (300, W), generator=torch.Generator().manual_seed(3))
            z = math.sqrt(W / (W - 1)) * scipy_stats.t.ppf(0.975, W - 1)
            tail = float(scipy_stats.norm.cdf(-z))
            whole = d.sum(1)[picks].sum(1) / counts.sum(1)[picks].sum(1)
            mean, low, high = comparison.overall[result.seq_len][m]
            assert mean == pytest.approx(float(d.sum() / counts.sum()), abs=1e-6)
            if m != base:
                assert low == pytest.approx(float(torch.quantile(whole, tail)), abs=1e-6)
                assert high == pytest.approx(float(torch.quantile(whole, 1 - tail)), abs=1e-6)
            mine = [
                x
                for x in rows
                if x["model"] == comparison.models[m].name and int(x["seq_len"]) == result.seq_len
            ]
            curve = sums[m].sum(0) / counts.sum(0)
            diff = d.sum(0) / counts.sum(0)
            for b, row in enumerate(mine):
                assert (int(row["start"]), int(row["end"])) == buckets[b]
                assert float(row["loss"]) == pytest.approx(float(curve[b]), abs=2e-6)
                assert float(row["diff"]) == pytest.approx(float(diff[b]), abs=2e-6)


@pytest.mark.slow  # eval and a float64 recomputation: ~0.3 s
def test_eval_numbers_and_csv_equal_a_float64_recomputation_at_an_odd_length(world, tmp_path) -> None:
    checkpoint = world["ttt"] / "last.safetensors"
    data = [str(world["root"] / "data" / "other.txt")]
    metrics, csv_path, _ = evaluate(
        checkpoint, data, seq_len=37, batch_size=5, batches=3, out_dir=tmp_path, progress_bar=False
    )
    inputs, targets = evaluation_examples(data, 37, 15, tokenizer=checkpoint_tokenizer(checkpoint))
    losses = _token_losses(checkpoint, inputs, targets)
    module = load_module(checkpoint).double()
    with torch.no_grad():
        accuracy = float((module(inputs).argmax(-1) == targets).double().mean())
    assert metrics["val_loss"] == pytest.approx(float(losses.mean()), abs=1e-6)
    assert metrics["val_ppl"] == pytest.approx(math.exp(float(losses.mean())), rel=1e-6)
    assert metrics["val_acc"] == pytest.approx(accuracy, abs=1e-6)
    assert (metrics["tokens"], metrics["windows"]) == (15 * 37, 15)
    rows = list(csv.DictReader(open(csv_path)))
    for row, (a, b) in zip(rows, position_buckets(37, BUCKETS), strict=True):
        assert (int(row["start"]), int(row["end"])) == (a, b)
        assert float(row["loss"]) == pytest.approx(float(losses[:, a:b].mean()), abs=2e-6)


def test_the_same_checkpoint_twice_differs_by_exactly_zero(world) -> None:
    comparison = compare([world["ttt"], world["ttt"] / "last.safetensors"], resamples=50)
    assert [m.name[-4:] for m in comparison.models] == [" (1)", " (2)"]
    assert comparison.overall[SEQ_LEN][1] == (0.0, 0.0, 0.0)


def test_bad_compare_inputs_are_one_error_naming_them(world, tmp_path) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    with pytest.raises(ConfigError, match="neither a run folder nor a checkpoint"):
        compare([world["ttt"], tmp_path / "missing"])
    with pytest.raises(ConfigError, match="baseline='nope' is none of the models"):
        compare([world["ttt"], world["swa"]], baseline="nope")
    with pytest.raises(ConfigError, match="split='test' names a split of paths, and no paths"):
        compare([world["ttt"]], split="test")
    with pytest.raises(ConfigError, match="seq_lens must be one or more integers >= 1"):
        compare([world["ttt"]], seq_lens=[0])
    with pytest.raises(DataError, match="blank.txt': the file is empty"):
        compare([world["ttt"]], paths=[str(world["root"] / "data" / "blank.txt")])
    with pytest.raises(CheckpointError, match="not a readable innerloop checkpoint"):
        compare([world["ttt"], corrupt])


@pytest.mark.slow  # ~0.9 s: over the fast loop's 0.4 s per test
def test_two_comparisons_write_their_own_files_and_a_rerun_rewrites_only_its_own(world, tmp_path) -> None:
    first = write_comparison(compare([world["ttt"], world["swa"]], resamples=20, seed=0), tmp_path)
    before = {p: p.read_bytes() for p in first}
    second = write_comparison(compare([world["ttt"], world["swa"]], resamples=20, seed=1), tmp_path)
    assert {p.name for p in first}.isdisjoint(p.name for p in second)
    assert all(p.read_bytes() == data for p, data in before.items())
    again = write_comparison(compare([world["ttt"], world["swa"]], resamples=20, seed=0), tmp_path)
    assert again == first and not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------------
# Defects
# ------------------------------------------------------------------------------------------------------


def _foreign_checkpoint(world) -> Path:
    """The same model as the ``ttt`` run, trained (by its own record) on a folder holding corpus.txt,
    copied beside the ``ttt`` run's config.yaml (whose only data file is corpus.txt, 10% held out)."""
    folder = world["root"] / "data"
    run, _ = load_config(str(world["ttt"] / "config.yaml"))
    record = {**run_data_record(run), "data.paths": [str(folder)]}  # as a run on the folder records it
    state = {"validation_files": ["unseen.jsonl"], "training_digest": "0" * 64}  # trained on corpus.txt
    target = world["ttt"] / "foreign.safetensors"
    if not target.exists():
        module = LanguageModelModule(model=asdict(run.model), seq_len=SEQ_LEN, num_position_buckets=BUCKETS)
        tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0,
                "innerloop_run": record, "TextDataModule": state}  # fmt: skip
        save_checkpoint(tree, target)
    return target


# review s22 compare (HIGH, fixed): weights beside another run's config.yaml were scored on that run's held-out text
def test_eval_does_not_take_another_runs_config_for_the_checkpoints_own(world) -> None:
    checkpoint = _foreign_checkpoint(world)
    module = load_module(checkpoint)
    windows = evaluation_windows(checkpoint, module, [], SEQ_LEN, tokenizer=checkpoint_tokenizer(checkpoint))
    # its own run's windows, by the data its checkpoint recorded, not the config.yaml's corpus.txt
    assert windows.source.startswith("the run's validation windows")
    assert f"data.paths=[{str(world['root'] / 'data')!r}]" in windows.source, windows.source


# review s22 compare (MED, fixed): compare took such weights' training data from the config beside them
def test_compare_refuses_a_copied_checkpoint_that_trained_on_the_windows(world) -> None:
    checkpoint = _foreign_checkpoint(world)
    with pytest.raises(ConfigError):
        compare([world["ttt"], checkpoint], resamples=20)


# review s22 compare (MED, fixed): an hf model was scored on --data read as the text baseline reads it, unsaid
@pytest.mark.slow  # compare over two models: ~0.35 s
def test_compare_says_when_a_model_reads_the_data_files_otherwise_than_the_windows(world, caplog) -> None:
    data = [str(world["root"] / "data" / "unseen.jsonl")]
    with caplog.at_level(logging.WARNING):
        compare([world["ttt"], world["hf"]], paths=data, resamples=20)
    notes = [r.getMessage() for r in caplog.records if "hfrun" in r.getMessage()]
    assert any("field" in n or "record" in n for n in notes), notes
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # both read files the same way: no such note
        compare([world["ttt"], world["swa"]], paths=data, resamples=20)
    assert not [r for r in caplog.records if "reads its data as" in r.getMessage()]


# review s22 compare (MED, fixed): the written table did not say which windows it scored, nor the notes
@pytest.mark.slow  # compare, then reads its table: ~0.3 s
def test_the_written_table_says_which_windows_it_scored(world, tmp_path) -> None:
    comparison = compare([world["ttt"], world["swa"]], resamples=20)
    _, _, table = write_comparison(comparison, tmp_path)
    text = table.read_text()
    assert text.startswith(
        f"2 models on the same {comparison.lengths[0].windows} windows: the run's validation windows"
    )
    assert comparison.notes and all(note in text for note in comparison.notes)  # the size note, at least


# review s22 compare (MED, fixed): --batch-size alone changed the number of windows read from files
def test_batch_size_alone_changes_the_window_count_alike_in_every_mode(world) -> None:
    checkpoint = world["ttt"] / "last.safetensors"
    module, tokenizer = load_module(checkpoint), checkpoint_tokenizer(checkpoint)
    data = [str(world["root"] / "data" / "other.txt")]

    def count(paths, batch_size):
        return len(evaluation_windows(checkpoint, module, paths, SEQ_LEN, batch_size, None, tokenizer).inputs)

    run_changes = count([], 2) != count([], None)
    data_changes = count(data, 2) != count(data, None)
    assert run_changes == data_changes, (count([], 2), count([], None), count(data, 2), count(data, None))


# review s22 compare (MED, fixed): compare() did not check batches and batch_size
def test_compare_refuses_bad_window_counts_naming_them(world) -> None:
    with pytest.raises((ConfigError, ValueError), match="batches"):
        compare([world["ttt"]], batches=0)
    with pytest.raises((ConfigError, ValueError), match="batch_size"):
        compare([world["ttt"]], batch_size=0)
    for bad in (2.5, True, -1, "4"):
        with pytest.raises(
            ConfigError, match=rf"batches={re.escape(repr(bad))} must be (an integer )?in \[1, 16777216\]"
        ):
            compare([world["ttt"]], batches=bad)


# review s22 compare (LOW, fixed)
def test_an_empty_data_file_is_called_empty(world) -> None:
    with pytest.raises(DataError, match="empty"):
        evaluation_examples([str(world["root"] / "data" / "blank.txt")], SEQ_LEN, 4)


# review s22 compare (LOW, fixed)
def test_no_ttt_without_ttt_is_refused_before_reading_windows(world, capsys) -> None:
    with pytest.raises(ConfigError, match="no test-time training"):
        evaluate(world["swa"] / "last.safetensors", no_ttt=True, progress_bar=False)
    assert "evaluating" not in capsys.readouterr().out


# review s22 compare (LOW, fixed)
def test_the_same_checkpoint_twice_is_named_in_a_note(world, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        compare([world["ttt"], world["ttt"] / "last.safetensors"], resamples=20)
    assert any("same" in r.getMessage() for r in caplog.records)


# review s22 compare (LOW, fixed)
def test_the_csv_names_checkpoints_by_absolute_paths(world, monkeypatch) -> None:
    monkeypatch.chdir(world["root"])
    comparison = compare(["ttt", "swa"], resamples=20)
    rows = list(csv.DictReader(io.StringIO(comparison_csv(comparison))))
    assert all(Path(row["checkpoint"]).is_absolute() for row in rows)


# review s22 compare (LOW, fixed)
@pytest.mark.slow  # ~1.3 s: two models scored at two lengths; moved out of the fast loop, at its one-minute limit
def test_a_model_trained_at_another_length_is_named_in_a_note(world, caplog) -> None:
    corpus = [f"data.paths=[{world['root'] / 'data' / 'corpus.txt'}]"]
    short = _run(world["root"], "swa4", "swa", corpus, 1, seq_len=4)
    with caplog.at_level(logging.WARNING):
        compare([world["ttt"], short], resamples=20)
    assert any("swa4" in r.getMessage() and "seq_len" in r.getMessage() for r in caplog.records)


# review s22 compare (LOW, fixed)
def test_a_vocabulary_too_small_names_the_model(world) -> None:
    run, _ = load_config(str(world["ttt"] / "config.yaml"))
    model = {**asdict(run.model), "vocab_size": 100}
    module = LanguageModelModule(model=model, seq_len=SEQ_LEN, num_position_buckets=BUCKETS)
    tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}
    save_checkpoint(tree, world["root"] / "small" / "last.safetensors")
    with pytest.raises(DataError, match="small"):
        compare([world["ttt"], world["root"] / "small"], resamples=20)


# review s22 compare (LOW, fixed): a model that trained on a byte-identical copy of the windows' file elsewhere
# was counted as trained on "none of" them (the checks compared paths only)
def test_a_copy_of_a_training_file_counts_as_trained_on(tmp_path) -> None:
    from innerloop.train.run import RunFiles

    texts = {"a.txt": "held out by the baseline", "b.txt": "trained on by both", "empty.txt": ""}
    for folder in ("baseline", "model"):
        (tmp_path / folder).mkdir()
        for name, text in texts.items():
            (tmp_path / folder / name).write_text(text)
    model = RunFiles(
        training=frozenset({tmp_path / "model" / "a.txt", tmp_path / "model" / "empty.txt"}),
        held_out=frozenset({tmp_path / "model" / "b.txt"}),
    )
    windows = [tmp_path / "baseline" / name for name in ("a.txt", "empty.txt")]
    # the copy of a.txt is trained on; an empty file is no text, the same as any other empty file or not
    assert model.trained_on(windows) == [tmp_path / "baseline" / "a.txt"]
    (tmp_path / "baseline" / "a.txt").write_text("held out by the baseline, edited")
    assert model.trained_on(windows) == []
    # a file the model held out itself is held out, also where a copy of its bytes was trained on
    (tmp_path / "baseline" / "a.txt").write_text(texts["a.txt"])
    both = RunFiles(training=frozenset({tmp_path / "model" / "a.txt"}), held_out=frozenset(windows))
    assert both.trained_on(windows) == []


# review s47 (s47j's find): --resamples 1 gave a "95% band" of no width that need not hold the mean
def test_a_band_from_too_few_resamples_is_named_in_a_note(world, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        rough = compare([world["ttt"], world["swa"]], resamples=20)
    assert any("use resamples=400 or more" in note for note in rough.notes)  # from Python (s51a)
    assert any("20 bootstrap resamples" in r.getMessage() for r in caplog.records)


def test_the_resamples_note_of_a_comparison_counts_its_windows(world) -> None:
    # (split from the test above, s50d: each compare() reads three run configs, ~0.1 s of CPU; the three
    # calls together took 0.31 s, over the fast tests' 0.3 s)
    # over the 6 windows of `world` the band's ends are its 0.24% quantiles: 4113 resamples leave 10 beyond each
    # (review s49f: 400, enough at the plain 2.5%, leave 0.97 there and are named too)
    assert not [n for n in compare([world["ttt"], world["swa"]], resamples=4113).notes if "resample" in n]
    assert [n for n in compare([world["ttt"], world["swa"]], resamples=4112).notes if "resample" in n]


def test_the_resamples_note_counts_the_resamples_beyond_each_end() -> None:
    from innerloop.train.bootstrap import few_resamples_note

    assert few_resamples_note(1000, 0.95) is None and few_resamples_note(400, 0.95) is None
    assert "1 bootstrap resample leaves 0.025" in few_resamples_note(1, 0.95)
    assert few_resamples_note(399, 0.95) is not None and few_resamples_note(100, 0.8) is None
    assert "use resamples=100 or more" in few_resamples_note(99, 0.8)  # from Python (s51a)
