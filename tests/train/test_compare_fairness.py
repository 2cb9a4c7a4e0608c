"""innerloop compare and eval check every model's training data against the windows scored: a model
whose training text the windows are read from is refused (the run's windows) or named (--data), unknown
training data is named for the baseline too, and the recall task's settings count as data. Also the
CLI's --data errors, the table's tok/s note, --baseline under --no-ttt and model names."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from innerloop.cli import main
from innerloop.config.load import ConfigError, load_config, save_config
from innerloop.train import compare as compare_module
from innerloop.train.checkpoint import save_checkpoint
from innerloop.train.compare import compare, format_table, load_compared_model, model_names
from innerloop.train.data import DataError, validation_file_keys
from innerloop.train.module import LanguageModelModule
from innerloop.train.run import evaluate

SEQ_LEN = 16
MODEL = {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 32}


def _text(tag: str) -> str:
    return "".join(f"def {tag}{i}(x):\n    return x * {i}\n" for i in range(40))


def _run(
    out: Path, data: list[str], recorded: dict | None = None, preset: str = "tiny-swa", extra: tuple = ()
) -> Path:
    """A run folder as `innerloop train` leaves it: config.yaml and an untrained last.safetensors that
    records ``recorded`` as its TextDataModule state (held-out files, training digest)."""
    overrides = [f"model.{k}={v}" for k, v in MODEL.items()] + [
        "data.batch_size=2", "data.val_batches=1", "trainer.num_position_buckets=4", f"out_dir={out}", *extra,
    ]  # fmt: skip
    if preset != "recall-ttt":
        overrides += ["model.window=4", f"data.seq_len={SEQ_LEN}"]
    if data:
        overrides.append(f"data.paths=[{','.join(data)}]")
    run, cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    module = LanguageModelModule(model=asdict(run.model), seq_len=run.data.seq_len, num_position_buckets=4)
    tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}
    if recorded is not None:
        tree["TextDataModule"] = recorded
    save_checkpoint(tree, out / "last.safetensors")
    save_config(cfg, out / "config.yaml")
    return out


def _models(*runs: Path) -> list:
    return [load_compared_model(run / "last.safetensors", run.name, False) for run in runs]


@pytest.fixture
def three_files(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for name in "abc":
        (data / f"{name}.txt").write_text(_text(name))
    return data


@pytest.mark.slow  # ~0.4 s: two comparisons through the CLI
def test_a_model_that_trained_on_the_baselines_held_out_file_is_refused_in_either_order(
    tmp_path, three_files
) -> None:
    """The review's case: A held out a.txt of {a,b,c}; a.txt went; B, on the same data.paths, holds out
    c.txt, which A trained on. compare B A scored A on its training text without a word."""
    assert validation_file_keys([str(three_files)], 0.1) == ["a.txt"]
    run_a = _run(tmp_path / "A", [str(three_files)], {"validation_files": ["a.txt"], "training_digest": "1"})
    (three_files / "a.txt").unlink()
    assert validation_file_keys([str(three_files)], 0.1) == ["c.txt"]
    run_b = _run(tmp_path / "B", [str(three_files)], {"validation_files": ["c.txt"], "training_digest": "2"})
    with pytest.raises(ConfigError, match=r"^A was trained on \[.*c\.txt'\], which the windows \(the baseline's held-out text\)"):  # fmt: skip
        compare([run_b, run_a], resamples=10)
    with pytest.raises(DataError, match="split otherwise than when the checkpoint was written"):
        compare([run_a, run_b], resamples=10)  # A's own split check, as before (and as eval)


@pytest.mark.slow  # ~0.6 s: a comparison through the CLI
def test_models_with_the_same_data_settings_but_other_training_text_are_named(tmp_path, three_files) -> None:
    state = {"validation_files": ["a.txt"], "training_digest": "1"}
    first = _run(tmp_path / "first", [str(three_files)], state)
    second = _run(tmp_path / "second", [str(three_files)], state)
    assert compare_module.training_data_notes(_models(first, second), 0) == []
    third = _run(tmp_path / "third", [str(three_files)], {**state, "training_digest": "2"})
    (note,) = compare_module.training_data_notes(_models(first, third), 0)
    assert note.startswith("third was trained on other text than the baseline first, with the same data.*")


@pytest.mark.slow  # reason: ~2.5 s, eval's Lightning validation loop; the compare half alone is fast
def test_data_files_that_a_model_trained_on_are_named_in_compare_and_eval(
    tmp_path, three_files, caplog
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_text("x") * 3)
    single = _run(tmp_path / "single", [str(corpus)], {"training_digest": "1"})
    files = _run(
        tmp_path / "files", [str(three_files)], {"validation_files": ["a.txt"], "training_digest": "2"}
    )
    models = _models(single, files)
    notes = compare_module.training_data_notes(models, 0, [str(corpus), str(three_files / "a.txt")])
    assert notes == [
        f"single was trained on the first 90% of {str(corpus)!r}, which the windows (the paths files) are "
        "read from: its loss on them is not a held-out one"
    ]  # files held a.txt out: nothing to say of it
    (note,) = compare_module.training_data_notes(models, 0, [str(three_files / "b.txt")])
    assert note.startswith(
        f"files was trained on [{str(three_files / 'b.txt')!r}], which the windows (the paths"
    )
    with caplog.at_level(logging.WARNING):
        evaluate(single / "last.safetensors", [str(corpus)], batches=1, progress_bar=False)
    assert (
        f"was trained on the first 90% of {str(corpus)!r} (its run's data.paths), which paths evaluates"
        in caplog.text
    )


@pytest.mark.slow  # ~0.4 s: a comparison through the CLI
def test_a_baseline_with_unknown_training_data_is_named_and_so_are_models_on_other_data(
    tmp_path, three_files
) -> None:
    baseline = _run(tmp_path / "copied", [str(three_files)], {})
    (baseline / "config.yaml").unlink()  # a checkpoint copied without its run
    other = _run(tmp_path / "other", [str(three_files)], {"validation_files": ["a.txt"]})
    unknown, elsewhere = compare_module.training_data_notes(_models(baseline, other), 0)
    assert unknown.startswith(
        "copied (the baseline): its training data is unknown (there is no config.yaml beside"
    )  # the reason eval gives (one text)
    assert unknown.endswith("so whether it trained on the default corpus's held-out split cannot be checked")
    assert elsewhere.startswith("other was trained on other data (data.name='text', data.paths=[")
    assert elsewhere.endswith("than the default corpus's held-out split, which it is scored on")
    # A default-corpus run that held out less than the windows' split trained on some of it: refused.
    less = _run(tmp_path / "less", [], {}, extra=("data.val_fraction=0.05",))
    with pytest.raises(ConfigError, match=r"^less was trained on \[.*the default corpus's held-out split"):
        compare_module.training_data_notes(_models(baseline, less), 0)


@pytest.mark.slow  # ~0.3 s: a comparison through the CLI
def test_recall_runs_of_other_tasks_are_named(tmp_path) -> None:
    def recall(name: str, gap: int) -> Path:
        task = ("data.recall.num_pairs=2", f"data.recall.gap={gap}")
        return _run(tmp_path / name, [], None, preset="recall-ttt", extra=task)

    gap4, same, gap8 = recall("gap4", 4), recall("same", 4), recall("gap8", 8)
    assert compare_module.training_data_notes(_models(gap4, same), 0) == []
    (note,) = compare_module.training_data_notes(_models(gap4, gap8), 0)
    assert note.startswith("gap8 was trained on other data than the baseline gap4: data.recall={'num_pairs': 2, 'gap': 8}")  # fmt: skip
    assert note.endswith("the windows are the baseline's recall task, not the task it trained on")


def test_compare_names_data_that_matches_no_file(tmp_path, three_files, capsys) -> None:
    run = _run(tmp_path / "run", [str(three_files)], {})
    missing = str(tmp_path / "nothing.txt")
    assert main(["compare", str(run), "--data", missing, "--out", str(tmp_path / "out")]) == 2
    assert f"--data {missing!r} matches no file (give files, directories or globs)" in capsys.readouterr().err
    # no paths at all (a glob or variable that expanded to nothing): refused, not the baseline's windows
    assert main(["compare", str(run), "--data", "--out", str(tmp_path / "out")]) == 2
    assert "argument --data: expected at least one argument" in capsys.readouterr().err


def test_the_table_says_what_its_tokens_per_second_measure(tmp_path, three_files, capsys) -> None:
    run = _run(tmp_path / "run", [str(three_files)], {"validation_files": ["a.txt"]})
    table = format_table(compare([run], resamples=10))
    assert table.splitlines()[0].startswith(
        "| model | params | tokens trained | tok/s in training | ppl @16 |"
    )
    assert (
        table.endswith(f"\n\n{compare_module.TOKENS_PER_S_NOTE}\n")
        and "warm-up" in compare_module.TOKENS_PER_S_NOTE
    )


def test_a_baseline_that_records_no_seq_len_is_evaluated_at_128_saying_so(tmp_path, capsys) -> None:
    run = _run(tmp_path / "run", [], None)
    tree = {"state_dict": LanguageModelModule(model=MODEL).state_dict(), "hyper_parameters": {"model": MODEL}}
    save_checkpoint(tree, tmp_path / "converted.safetensors")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_text("y") * 3)
    comparison = compare(
        [tmp_path / "converted.safetensors", run], paths=[str(corpus)], resamples=10, batches=1
    )
    assert comparison.lengths[0].seq_len == 128
    assert "records no training seq_len" in capsys.readouterr().out


def test_the_baseline_is_found_by_the_name_the_table_gives_it_under_no_ttt() -> None:
    names, paths = ["ttt", "swa"], [Path("ttt/last.safetensors"), Path("swa/last.safetensors")]
    assert compare_module._baseline_index("ttt (no TTT)", names, ["ttt", "swa"], paths, no_ttt=True) == 0
    with pytest.raises(ConfigError, match="is none of the models compared"):
        compare_module._baseline_index("ttt (no TTT)", names, ["ttt", "swa"], paths)


def test_run_folders_of_the_same_name_are_told_apart_by_the_folder_above() -> None:
    first, second = Path("exp1/ttt/last.safetensors"), Path("exp2/ttt/last.safetensors")
    assert model_names([first, second, Path("swa/last.safetensors")]) == ["exp1/ttt", "exp2/ttt", "swa"]
    assert model_names([first, first]) == ["exp1/ttt (1)", "exp1/ttt (2)"]


def test_a_file_added_after_a_models_run_is_not_held_against_it(tmp_path, three_files) -> None:
    """The regression review's case: M trained on {a,b,c} holding out a.txt; z1.txt lands in the folder
    afterwards and a newer run N holds it out. M never saw z1.txt: compare N M notes the doubt (its
    split moved) instead of refusing, as it did before the per-model check."""
    old_run = _run(
        tmp_path / "M", [str(three_files)], {"validation_files": ["a.txt"], "training_digest": "1"}
    )
    written = (old_run / "last.safetensors").stat().st_mtime
    os.utime(old_run / "last.safetensors", (written - 60, written - 60))  # M finished a minute ago
    (three_files / "z1.txt").write_text(_text("z"))
    held_now = validation_file_keys([str(three_files)], 0.1)
    assert held_now != ["a.txt"]
    new_run = _run(tmp_path / "N", [str(three_files)], {"validation_files": held_now, "training_digest": "2"})
    notes = compare_module.training_data_notes(_models(new_run, old_run), 0)
    assert any(note.startswith("M may have been trained on") for note in notes), notes


def test_checkpoints_given_relative_to_the_current_folder_are_named_by_their_folder(
    tmp_path, monkeypatch
) -> None:
    (tmp_path / "A").mkdir()
    monkeypatch.chdir(tmp_path / "A")
    assert model_names([Path("last.safetensors"), Path("../B/last.safetensors"), Path("x.safetensors")]) == [
        "A", "B", "A/x",
    ]  # fmt: skip


def test_eval_data_with_an_unreadable_run_config_says_to_repair_it_not_to_give_data(
    tmp_path, three_files
) -> None:
    run = _run(tmp_path / "broken", [str(three_files)], {"validation_files": ["a.txt"]})
    with (run / "config.yaml").open("a") as config:
        config.write("some_future_key: 1\n")
    with pytest.raises(ConfigError) as refused:
        evaluate(run / "last.safetensors", [str(three_files / "a.txt")], batches=1, progress_bar=False)
    message = str(refused.value)
    assert "cannot be used to find its run's data" in message and "give paths" not in message
    assert message.endswith("repair it: it says how to read paths (as text, or a data.name='hf' run's text field), and whether the run trained on those files")  # fmt: skip


@pytest.mark.slow  # reason: ~0.7 s: trains two runs, then compares them
def test_the_same_files_through_a_link_are_the_same_data(tmp_path, three_files) -> None:
    """The regression review's LOW-4: a run on a link to the baseline's data folder (or file) trained on
    the same files; no "other data" note. A run on other files still gets one."""
    state = {"validation_files": ["a.txt"], "training_digest": "1"}
    (tmp_path / "link").symlink_to(three_files, target_is_directory=True)
    baseline = _run(tmp_path / "base", [str(three_files)], state)
    linked = _run(tmp_path / "linked", [str(tmp_path / "link")], state)
    assert compare_module.training_data_notes(_models(baseline, linked), 0) == []
    corpus = tmp_path / "one.txt"
    corpus.write_text(_text("o") * 3)
    (tmp_path / "one_link.txt").symlink_to(corpus)
    single = _run(tmp_path / "single", [str(corpus)], {"training_digest": "2"})
    single_linked = _run(
        tmp_path / "single_linked", [str(tmp_path / "one_link.txt")], {"training_digest": "2"}
    )
    assert compare_module.training_data_notes(_models(single, single_linked), 0) == []
    (note,) = compare_module.training_data_notes(_models(baseline, single), 0)
    assert note.startswith("single was trained on other data than the baseline base: data.paths=")


@pytest.mark.slow  # ~0.3 s: two runs' configs
def test_a_recall_model_against_a_text_baseline_is_named_without_the_tasks_settings(
    tmp_path, three_files
) -> None:
    # review s22 compare (LOW): the note listed data.recall, which a text baseline never reads, and said the
    # windows were text "which it may have trained on", impossible for a recall-task model
    text = _run(tmp_path / "text", [str(three_files)], {"validation_files": ["a.txt"]})
    task = _run(
        tmp_path / "task",
        [],
        None,
        preset="recall-ttt",
        extra=("data.recall.num_pairs=2", "data.recall.gap=8"),
    )
    (note,) = compare_module.training_data_notes(_models(text, task), 0)
    assert note.startswith(
        "task was trained on other data than the baseline text: data.name='recall' (baseline 'text')"
    )
    assert "data.recall" not in note
    assert note.endswith("not text it trained on (its run read the recall task, no text)")
