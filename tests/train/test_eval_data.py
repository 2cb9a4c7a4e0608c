"""Which data `innerloop eval` and `compare` read: a data.name=hf run's validation windows; a run's
data.paths recorded absolute (and an older config's relative ones read from the current directory,
said); a config.yaml beside the checkpoint that cannot be used is an error, never a silent fallback;
--data files read the way the run read its data; output names that follow the data files' contents;
and a launch that fails before its first checkpoint leaves no run behind."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from lm_testing import TINY, direct_perplexity

from innerloop.cli import main
from innerloop.config.load import ConfigError, load_config, save_config
from innerloop.data.tokenizer import ByteTokenizer
from innerloop.train import train
from innerloop.train.checkpoint import save_checkpoint
from innerloop.train.compare import compare
from innerloop.train.data import DataError, HFDataModule, TextDataModule, spread_windows
from innerloop.train.module import LanguageModelModule
from innerloop.train.run import evaluate
from innerloop.train.run_dir import refuse_previous_run

SEQ_LEN, BATCH, VAL_BATCHES = 16, 3, 2
MODEL = {"hidden_size": 16, "num_heads": 2, "num_layers": 2, "intermediate_size": 32}
DOCUMENTS = [f"Document {i}: the quick brown fox jumps over the lazy dog {i % 7} times." for i in range(80)]
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120))


def _jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCUMENTS)))
    return path


def _run_folder(out: Path, data: list[str], seed: int = 0) -> Path:
    """A run folder as `innerloop train` leaves it (config.yaml as given, an untrained checkpoint); its
    checkpoint's path. The config is saved as loaded: relative data.paths stay relative, as an older
    innerloop saved them."""
    overrides = [f"model.{k}={v}" for k, v in MODEL.items()] + [
        "model.ttt.mini_batch_size=4", f"data.seq_len={SEQ_LEN}", f"data.batch_size={BATCH}",
        f"data.val_batches={VAL_BATCHES}", "trainer.num_position_buckets=4", f"out_dir={out}", *data,
    ]  # fmt: skip
    run, cfg = load_config("tiny", overrides)
    torch.manual_seed(seed)
    module = LanguageModelModule(model=asdict(run.model), seq_len=SEQ_LEN, num_position_buckets=4)
    tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}
    checkpoint = save_checkpoint(tree, out / "last.safetensors")
    save_config(cfg, out / "config.yaml")
    return checkpoint


def _hf_validation(path: Path, seq_len: int, batch_size: int, val_batches: int) -> tuple[torch.Tensor, ...]:
    module = HFDataModule([str(path)], seq_len=seq_len, batch_size=batch_size, val_batches=val_batches)
    module.setup()
    assert module.val_examples is not None
    return module.val_examples


# -- item 1: data.name=hf runs ------------------------------------------------------------------------


@pytest.mark.slow  # reason: ~0.5 s: trains an HF-data run, then evaluates it
def test_eval_of_an_hf_run_scores_its_validation_windows_rewindowed_on_request(tmp_path, capsys) -> None:
    jsonl = _jsonl(tmp_path / "corpus.jsonl")
    checkpoint = _run_folder(tmp_path / "hf", ["data.name=hf", f"data.paths=[{jsonl}]"])
    metrics, csv_path, _ = evaluate(checkpoint, out_dir=tmp_path / "hf", progress_bar=False)
    inputs, targets = _hf_validation(jsonl, SEQ_LEN, BATCH, VAL_BATCHES)
    assert metrics["windows"] == BATCH * VAL_BATCHES == len(inputs)
    assert metrics["val_ppl"] == pytest.approx(direct_perplexity(checkpoint, inputs, targets), rel=1e-5)
    assert csv_path is not None and "_hf-val-" in csv_path.name
    assert "the run's validation windows (data.name='hf'" in capsys.readouterr().out

    metrics = evaluate(checkpoint, seq_len=8, batches=1, progress_bar=False)[0]  # re-windowed
    inputs, targets = _hf_validation(jsonl, 8, BATCH, 1)
    assert metrics["windows"] == BATCH and inputs.shape == (BATCH, 8)
    assert metrics["val_ppl"] == pytest.approx(direct_perplexity(checkpoint, inputs, targets), rel=1e-5)


@pytest.mark.slow  # reason: ~1 s: trains two runs on HF data files, then compares them
def test_compare_of_hf_runs_scores_their_validation_windows(tmp_path, capsys) -> None:
    jsonl = _jsonl(tmp_path / "corpus.jsonl")
    runs = [
        _run_folder(tmp_path / n, ["data.name=hf", f"data.paths=[{jsonl}]"], s) for s, n in enumerate("ab")
    ]
    assert main(["compare", str(runs[0].parent), str(runs[1].parent), "--out", str(tmp_path / "cmp")]) == 0
    assert "the run's validation windows (data.name='hf'" in capsys.readouterr().out
    comparison = compare([r.parent for r in runs])
    inputs, targets = _hf_validation(jsonl, SEQ_LEN, BATCH, VAL_BATCHES)
    for m, checkpoint in enumerate(runs):
        direct = direct_perplexity(checkpoint, inputs, targets)
        assert comparison.lengths[0].perplexity(m) == pytest.approx(direct, rel=1e-5)


@pytest.mark.slow  # trains a tiny data.name=hf run (a few seconds)
def test_eval_of_a_trained_hf_run_equals_its_final_validation_and_a_direct_computation(tmp_path) -> None:
    jsonl = _jsonl(tmp_path / "corpus.jsonl")
    overrides = [*TINY, "data.name=hf", f"data.paths=[{jsonl}]", "data.val_batches=2", "trainer.max_steps=2"]
    run, cfg = load_config("tiny", [*overrides, f"out_dir={tmp_path / 'run'}"])
    result = train(run, cfg)
    metrics = evaluate(result.checkpoint, progress_bar=False)[0]
    assert metrics["val_ppl"] == pytest.approx(result.metrics["val_ppl"], rel=1e-5)
    inputs, targets = _hf_validation(jsonl, run.data.seq_len, run.data.batch_size, 2)
    assert metrics["val_ppl"] == pytest.approx(
        direct_perplexity(result.checkpoint, inputs, targets), rel=1e-5
    )


# -- item 2: where the run's data is, and a config.yaml that cannot be used ---------------------------


@pytest.mark.slow  # trains a tiny run (a few seconds)
def test_a_run_records_its_data_paths_absolute_so_eval_elsewhere_reads_the_same_files(
    tmp_path, monkeypatch, capsys
) -> None:
    project, other = tmp_path / "project", tmp_path / "other"
    for folder, text in ((project, TEXT), (other, TEXT.upper())):  # same names, other text
        (folder / "docs").mkdir(parents=True)
        for i in range(3):
            (folder / "docs" / f"d{i}.py").write_text(text * (i + 1))
    monkeypatch.chdir(project)
    run, cfg = load_config("tiny", [*TINY, "data.paths=[docs/*.py]", "trainer.max_steps=2", "out_dir=../run"])
    result = train(run, cfg)
    saved, _ = load_config(str(result.config))
    assert saved.data.paths == [os.path.join(project, "docs/*.py")]
    for cwd in (other, tmp_path):  # elsewhere the relative glob matches other files, or none
        monkeypatch.chdir(cwd)
        metrics, csv_path, _ = evaluate(tmp_path / "run" / "last.safetensors", out_dir=tmp_path / "run")
        assert metrics["val_ppl"] == pytest.approx(result.metrics["val_ppl"], rel=1e-5)
    assert str(project / "docs") in capsys.readouterr().out


@pytest.mark.slow  # ~0.4 s: an evaluation through the CLI
def test_relative_paths_of_an_older_config_are_read_from_here_and_say_so(
    tmp_path, monkeypatch, capsys
) -> None:
    (tmp_path / "project" / "docs").mkdir(parents=True)
    (tmp_path / "project" / "docs" / "code.py").write_text(TEXT)
    monkeypatch.chdir(tmp_path / "project")
    checkpoint = _run_folder(tmp_path / "run", ["data.paths=[docs/*.py]"])
    metrics = evaluate(checkpoint, progress_bar=False)[0]
    printed = capsys.readouterr().out
    assert "relative data.paths ['docs/*.py'], read from the current directory" in printed
    module = TextDataModule([str(tmp_path / "project/docs/code.py")], SEQ_LEN, BATCH, val_batches=VAL_BATCHES)
    module.setup()
    assert metrics["val_ppl"] == pytest.approx(
        direct_perplexity(checkpoint, *module.make_val_examples()), rel=1e-5
    )

    monkeypatch.chdir(tmp_path)  # the glob matches nothing here: an error, not the default corpus
    with pytest.raises(
        DataError,
        match=r"cannot be read: .*docs/\*.py' matches no file.*relative data.paths \['docs/\*.py'\]",
    ):
        evaluate(checkpoint, progress_bar=False)
    assert main(["compare", str(checkpoint.parent), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "cannot be read" in err and "default corpus" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "text, reason",
    [
        ("data: [1, 2\n", "cannot be read as YAML"),
        ("data:\n  nme: text\n", "nme"),
        ("data:\n  name: wikitext\n", "data.name='wikitext' is not a dataset"),
        ("- a list\n", "not a mapping"),
    ],
)
@pytest.mark.slow  # ~0.9 s in all: three evaluations through the CLI
def test_a_config_beside_the_checkpoint_that_cannot_be_used_is_one_error(
    tmp_path, capsys, text, reason
) -> None:
    checkpoint = _run_folder(tmp_path / "run", [])
    (tmp_path / "run" / "config.yaml").write_text(text)
    for command in (["eval", str(checkpoint)], ["compare", str(checkpoint), "--out", str(tmp_path / "cmp")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert "the config.yaml beside" in err and reason in err and "give --data" in err
    assert not list((tmp_path / "run").glob("eval_*"))


def test_a_config_of_another_model_beside_the_checkpoint_says_which_windows_were_read(
    tmp_path, capsys
) -> None:
    checkpoint = _run_folder(tmp_path / "run", [])
    (tmp_path / "run" / "config.yaml").write_text("model:\n  hidden_size: 64\n")  # another run's
    evaluate(checkpoint, batches=1, progress_bar=False)
    printed = capsys.readouterr().out
    assert "the default corpus's held-out split (the config.yaml beside" in printed
    assert "another model (model.hidden_size 64 != 16" in printed


# -- item 7: --data files read as the run read its data -----------------------------------------------


@pytest.mark.slow  # ~0.8 s: an HF run folder and an evaluation through the CLI
def test_data_files_of_an_hf_run_are_read_as_its_documents_not_their_json(tmp_path, capsys) -> None:
    jsonl = _jsonl(tmp_path / "corpus.jsonl")
    checkpoint = _run_folder(tmp_path / "hf", ["data.name=hf", f"data.paths=[{jsonl}]"])
    metrics = evaluate(checkpoint, [str(jsonl)], batches=1, progress_bar=False)[0]
    assert "the given files' 'text' field, read as this data.name='hf' run" in capsys.readouterr().out
    stream = torch.tensor([t for d in DOCUMENTS for t in (*d.encode(), ByteTokenizer().eos_id)])
    inputs, targets = spread_windows(stream, SEQ_LEN, 16)
    assert not any(b'"text"' in bytes(row.tolist()) for row in inputs)
    assert metrics["val_ppl"] == pytest.approx(direct_perplexity(checkpoint, inputs, targets), rel=1e-5)


def test_dataset_files_for_a_checkpoint_without_its_run_are_refused(tmp_path, capsys) -> None:
    jsonl = _jsonl(tmp_path / "corpus.jsonl")
    checkpoint = _run_folder(tmp_path / "hf", ["data.name=hf", f"data.paths=[{jsonl}]"])
    (tmp_path / "hf" / "config.yaml").unlink()  # a checkpoint copied away from its run
    assert main(["eval", str(checkpoint), "--data", str(jsonl)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "a .jsonl file is read as records" in err
    assert "there is no config.yaml beside" in err and not list((tmp_path / "hf").glob("eval_*"))


def test_data_files_of_a_text_run_are_read_as_text(tmp_path) -> None:
    jsonl = _jsonl(tmp_path / "corpus.jsonl")
    (tmp_path / "code.py").write_text(TEXT)
    checkpoint = _run_folder(tmp_path / "run", [f"data.paths=[{tmp_path / 'code.py'}]"])
    metrics = evaluate(checkpoint, [str(jsonl)], batches=1, progress_bar=False)[0]
    inputs, targets = spread_windows(torch.tensor([*jsonl.read_bytes(), 0]), SEQ_LEN, 16)
    assert metrics["val_ppl"] == pytest.approx(direct_perplexity(checkpoint, inputs, targets), rel=1e-5)


# -- item 11: output names follow the data ------------------------------------------------------------


@pytest.mark.slow  # ~1 s: three evaluations
def test_evaluating_again_after_the_data_changed_never_replaces_the_earlier_result(tmp_path) -> None:
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    checkpoint = _run_folder(tmp_path / "run", [f"data.paths=[{data}]"])
    out = tmp_path / "out"
    out.mkdir()
    for text in (TEXT, TEXT.upper() + "#", TEXT):  # the third is the first again, with a later mtime
        data.write_text(text)
        evaluate(checkpoint, [str(data)], batches=1, out_dir=out, progress_bar=False)  # --data
        evaluate(checkpoint, batches=1, out_dir=out, progress_bar=False)  # the run's validation data
        os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    names = sorted(p.name for p in out.glob("*.csv"))
    assert len(names) == 6, names
    assert sum("_data-" in n for n in names) == 3 and sum("_text-val-" in n for n in names) == 3


# -- item 10: a launch that fails before its first checkpoint -----------------------------------------


def test_a_new_run_failing_in_setup_leaves_no_run_so_the_corrected_one_starts(tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def failing_setup(self, stage=None):
        raise DataError("injected: the data is bad")

    monkeypatch.setattr(TextDataModule, "setup", failing_setup)
    run, cfg = load_config("tiny", [*TINY, "trainer.max_steps=2", f"out_dir={out}"])
    with pytest.raises(DataError, match="injected"):
        train(run, cfg)
    assert not (out / "config.yaml").exists() and not (out / "last.safetensors").exists()
    assert (out / "notes.txt").read_text() == "mine"
    refuse_previous_run(out)  # the corrected launch is not refused as a second run


@pytest.mark.slow  # trains a tiny run, then resumes it (a few seconds)
def test_a_failing_resume_keeps_the_run(tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    run, cfg = load_config("tiny", [*TINY, "trainer.max_steps=2", f"out_dir={out}"])
    train(run, cfg)
    checkpoint = (out / "last.safetensors").read_bytes()

    def failing_setup(self, stage=None):
        raise DataError("injected: the data is bad")

    monkeypatch.setattr(TextDataModule, "setup", failing_setup)
    run, cfg = load_config(str(out / "config.yaml"), ["trainer.max_steps=4"])
    with pytest.raises(DataError, match="injected"):
        train(run, cfg, resume=True)
    assert (out / "config.yaml").is_file()  # (the resume's, with its trainer.max_steps)
    assert (out / "last.safetensors").read_bytes() == checkpoint
    with pytest.raises(ConfigError, match="already holds a run"):
        refuse_previous_run(out)


@pytest.mark.parametrize(
    ("length", "seq_len", "count"), [(1000, 16, 8), (1000, 16, 62), (1000, 16, 500), (17, 16, 3)]
)
def test_windows_never_score_a_token_twice(length, seq_len, count, caplog) -> None:
    """Asking for more windows than the data holds overlapped them: tokens were scored many times and
    compare's bootstrap bands narrowed from the same tokens read again."""
    data = torch.arange(length)
    with caplog.at_level("WARNING"):
        inputs, targets = spread_windows(data, seq_len, count)
    holds = (length - 1) // seq_len
    assert len(targets) == min(count, holds)
    scored = targets.flatten().tolist()
    assert len(scored) == len(set(scored))  # each target position once
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert ("without overlap" in caplog.text) == (count > holds)


@pytest.mark.slow  # ~2.4 s in all: six eval/compare runs; an out_dir inside the data stays in the fast loop (test_data_checks.py)
@pytest.mark.parametrize("command", ["eval", "compare"])
@pytest.mark.parametrize("where", ["run data", "--data", "--data glob"])
def test_an_output_folder_inside_the_evaluated_data_is_refused(tmp_path, capsys, command, where) -> None:
    """eval/compare --out inside the data wrote results that the next evaluation read as data: the same
    command gave perplexity 91.7, then 226.7."""
    from innerloop.cli import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "code.py").write_text(TEXT)
    checkpoint = _run_folder(tmp_path / "run", [f"data.paths=[{data}]"])
    given = {"run data": [], "--data": ["--data", str(data)], "--data glob": ["--data", str(data / "**")]}[
        where
    ]
    target = [str(checkpoint)] if command == "eval" else [str(checkpoint.parent)]
    out = data / "results"
    assert main([command, *target, *given, "--out", str(out), "--batches", "1"]) == 2
    error = capsys.readouterr().err
    assert (
        "--out" in error
        and ("lies inside" in error or "is reached by" in error)
        and "outside the data" in error
    )
    assert not out.exists() or not any(out.iterdir())  # nothing written
    assert main([command, *target, *given, "--out", str(tmp_path / "elsewhere"), "--batches", "1"]) == 0


@pytest.mark.slow  # ~0.6 s: an evaluation through the CLI
def test_the_loss_of_a_recall_run_is_per_token_not_per_byte(tmp_path, capsys) -> None:
    checkpoint = _run_folder(
        tmp_path / "run",
        ["data.name=recall", "data.recall.num_pairs=2", "data.recall.gap=9"],  # 4 * 2 + 9 - 1 = SEQ_LEN
    )
    assert main(["eval", str(checkpoint), "--batches", "1"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("perplexity"))
    assert "nats/token" in line, line


@pytest.mark.slow  # reason: ~1 s: trains an HF-data run, then evaluates it
def test_an_hf_run_asked_for_more_windows_than_its_held_out_documents_hold_says_so(tmp_path, caplog) -> None:
    jsonl = _jsonl(tmp_path / "corpus.jsonl")
    checkpoint = _run_folder(tmp_path / "hf", ["data.name=hf", f"data.paths=[{jsonl}]"])
    with caplog.at_level("WARNING"):
        metrics = evaluate(checkpoint, batches=1000, progress_bar=False)[0]
    assert metrics["windows"] < 1000 * BATCH
    assert f"hold {int(metrics['windows'])} windows of seq_len={SEQ_LEN}; scoring those" in caplog.text
    assert f"not the {1000 * BATCH} of batches x batch size" in caplog.text


@pytest.mark.slow  # ~0.4 s: an evaluation through the CLI
def test_a_link_to_a_runs_checkpoint_evaluates_on_that_runs_windows(tmp_path) -> None:
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    checkpoint = _run_folder(tmp_path / "run", [f"data.paths=[{data}]"])
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "model.safetensors"
    link.symlink_to(checkpoint)
    direct = evaluate(checkpoint, batches=1, progress_bar=False)[0]
    linked = evaluate(link, batches=1, progress_bar=False)[0]  # was: the default corpus
    assert linked == direct


@pytest.mark.slow  # 0.5 s
def test_an_output_folder_inside_the_data_of_a_linked_runs_checkpoint_is_refused(tmp_path, capsys) -> None:
    """The --out check and the unit read the config beside the link's target, as the evaluation does."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "code.py").write_text(TEXT)
    checkpoint = _run_folder(tmp_path / "run", [f"data.paths=[{data}]"])
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "model.safetensors"
    link.symlink_to(checkpoint)
    assert main(["eval", str(link), "--out", str(data / "results"), "--batches", "1"]) == 2
    assert "lies inside" in capsys.readouterr().err


def test_data_counts_as_moved_only_when_no_recorded_path_finds_anything(tmp_path) -> None:
    from innerloop.train.run import _data_moved

    kept = tmp_path / "kept.txt"
    kept.write_text("x")
    gone = str(tmp_path / "gone" / "*.txt")
    # every recorded path, not the first alone, decides: one that still finds files means not moved
    assert not _data_moved(["data.paths"], {"data.paths": [gone, str(kept)]})
    assert not _data_moved(["data.paths"], {"data.paths": [str(kept), gone]})
    assert _data_moved(["data.paths"], {"data.paths": [gone, str(tmp_path / "also-gone.txt")]})
    # another differing key: weights copied beside another run's config, not a move
    assert not _data_moved(["data.paths", "data.seq_len"], {"data.paths": [gone]})
    assert _data_moved(["data.paths"], {"data.paths": "not a list"})  # an unreadable record finds nothing
