"""What the config checks find in the data before a run writes anything in its out_dir: an out_dir
inside the data, a missing optional package (``datasets``, ``tokenizers``), an ``hf`` data file that
cannot be read; and how ``data.split`` picks (and slices) the split of a ``save_to_disk`` folder.
Each is one line naming the setting, the value and what is valid. Tiny local files only."""

from __future__ import annotations

import builtins
import json
import re
import sys
from pathlib import Path

import pytest

from innerloop.cli import main
from innerloop.config import load_config
from innerloop.config.load import ConfigError
from innerloop.data.hf import iter_texts, open_hf_dataset
from innerloop.data.text import DataError
from innerloop.data.tokenizer import TOKENIZER_FILE, TokenizerError, byte_level_tokenizer_json, train_bpe

INSTALL = 'pip install "innerloop[hf]"'


def _records(count: int) -> list[dict]:
    return [{"text": f"document {i}: " + "the quick brown fox " * (1 + i % 3), "id": i} for i in range(count)]


def _jsonl(path: Path, count: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(count)))
    return path


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err  # one line, no traceback, no log lines of datasets
    return lines[0]


# -- out_dir inside data.paths (item 3) -------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.md", "b.md", "sub/c.md"):
        (folder / name).write_text("the quick brown fox jumps over the lazy dog. " * 20)
    return folder


@pytest.mark.parametrize(
    "entry, out, how",
    [
        ("{c}", "{c}/run", "lies inside"),
        ("{c}", "{c}", "lies inside"),
        ("{c}/sub/..", "{c}/run", "lies inside"),  # resolved
        ("{c}/**", "{c}/run", "is reached by"),
        ("{c}/*/*", "{c}/run", "is reached by"),
        ("{c}/**/*.yaml", "{c}/deep/run", "is reached by"),
        ("{c}/run/logs", "{c}/run", "holds"),
        ("{c}/run/*.csv", "{c}/run", "is reached by"),
    ],
)
@pytest.mark.slow  # ~1.1 s in all: eight layouts of data and out_dir
def test_an_out_dir_inside_the_data_is_refused(corpus, entry, out, how) -> None:
    entry, out = entry.format(c=corpus), out.format(c=corpus)
    expected = f"out_dir='{out}'" + r".* " + how + f" data.paths entry '{entry}': the run's own files"
    with pytest.raises(ConfigError, match=re.escape(expected).replace(re.escape(".* "), ".* ")):
        load_config("tiny", [f"data.paths=[{entry}]", f"out_dir={out}", "data.seq_len=16"])


@pytest.mark.parametrize(
    "entry, out",
    [
        ("{c}", "{c}_run"),  # a sibling whose name starts the same
        ("{c}/*.md", "{c}/run"),  # the run writes no .md
        ("{c}/**/*.md", "{c}/run"),
        ("{c}/**", "{c}/.run"),  # a glob reaches no hidden folder
        ("{c}/sub", "{c}"),  # the run writes nothing into sub/
    ],
)
@pytest.mark.slow  # ~0.6 s in all: five layouts, each starting a run
def test_an_out_dir_the_data_never_reads_is_accepted(corpus, entry, out) -> None:
    out = out.format(c=corpus)
    load_config("tiny", [f"data.paths=[{entry.format(c=corpus)}]", f"out_dir={out}", "data.seq_len=16"])


@pytest.mark.slow  # ~0.7 s: a training run set up; moved out of the fast loop, at its one-minute limit
def test_train_refuses_an_out_dir_inside_the_data_before_writing_it(corpus, capsys, monkeypatch) -> None:
    monkeypatch.chdir(corpus.parent)
    assert main(["train", "data.paths=[corpus]", "out_dir=corpus/run"]) == 2
    line = _one_error_line(capsys)
    assert f"out_dir='corpus/run' ('{corpus / 'run'}') lies inside data.paths entry 'corpus'" in line
    assert not (corpus / "run").exists()
    jsonl = _jsonl(corpus / "d.jsonl")  # data.name=hf reads folders too
    with pytest.raises(ConfigError, match="lies inside data.paths entry"):
        load_config("tiny", ["data.name=hf", f"data.paths=[{jsonl.parent}]", f"out_dir={corpus}/run"])


# -- a missing optional package (item 4) ------------------------------------------------------------------


def test_hf_data_without_datasets_is_one_line_before_out_dir_is_written(tmp_path, capsys, monkeypatch):
    jsonl = _jsonl(tmp_path / "d.jsonl")
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets when not installed
    message = f"data.name='hf' needs the 'datasets' package, which is not installed here: {INSTALL}"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", ["data.name=hf", f"data.paths=[{jsonl}]", f"out_dir={tmp_path / 'run'}"])
    assert main(["train", "data.name=hf", f"data.paths=[{jsonl}]", f"out_dir={tmp_path / 'run'}"]) == 2
    assert _one_error_line(capsys) == f"innerloop train: error: {message}"
    assert not (tmp_path / "run").exists()


def test_a_datasets_that_cannot_be_imported_names_why(tmp_path, monkeypatch) -> None:
    jsonl = _jsonl(tmp_path / "d.jsonl")
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'pyarrow'", name="pyarrow")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    expected = "needs the 'datasets' package, which cannot be imported here (No module named 'pyarrow')"
    with pytest.raises(ConfigError, match=re.escape(f"{expected}: {INSTALL}")):
        load_config("tiny", ["data.name=hf", f"data.paths=[{jsonl}]", f"out_dir={tmp_path / 'run'}"])


def test_a_bpe_tokenizer_without_tokenizers_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / TOKENIZER_FILE).write_text(byte_level_tokenizer_json(end_of_text=True))
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox. " * 40)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    message = (
        f"data.tokenizer='{folder}' needs the 'tokenizers' package, which is not installed here: {INSTALL}"
    )
    run = ["train", f"data.tokenizer={folder}", f"data.paths=[{text}]", f"out_dir={tmp_path / 'run'}"]
    assert main(run) == 2
    assert _one_error_line(capsys) == f"innerloop train: error: {message}"
    assert not (tmp_path / "run").exists()
    with pytest.raises(TokenizerError, match="training a BPE tokenizer needs the 'tokenizers' package"):
        train_bpe(["some text"], 300)
    assert (
        main(["tokenizer", "train", "--vocab-size", "300", "--out", str(tmp_path / "tok2"), str(text)]) == 2
    )
    assert f"needs the 'tokenizers' package, which is not installed here: {INSTALL}" in _one_error_line(
        capsys
    )
    assert not (tmp_path / "tok2").exists()


# -- hf data files that cannot be read (item 5) -----------------------------------------------------------


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a file datasets cannot read, the cause the error gives)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jsonl").write_text("")
    bad = _jsonl(folder / "bad.jsonl", 8)
    lines = bad.read_text().splitlines()
    bad.write_text("\n".join([*lines[:3], '{"text": broken', *lines[3:]]) + "\n")
    (folder / "bad.parquet").write_text("this is not a parquet file at all")
    return {
        "empty": (folder / "empty.jsonl", "has the empty file"),
        "malformed line": (bad, "JSON parse error: Invalid value. in row 3 (ArrowInvalid)"),
        "not parquet": (folder / "bad.parquet", "(ArrowInvalid)"),
    }


@pytest.mark.parametrize("streaming", [False, True], ids=["arrow", "streaming"])
@pytest.mark.parametrize("case", ["empty", "malformed line", "not parquet"])
def test_an_unreadable_hf_file_is_one_line_at_config_time(tmp_path, capsys, case, streaming) -> None:
    path, cause = _bad_files(tmp_path / "data")[case]
    out = tmp_path / "run"
    args = ["data.name=hf", f"data.paths=[{path}]", f"data.streaming={streaming}", f"out_dir={out}"]
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", args)
    message = str(raised.value)
    assert "data.paths" in message and str(path) in message and cause in message, message
    assert "\n" not in message
    assert main(["train", *args]) == 2
    assert _one_error_line(capsys) == f"innerloop train: error: {message}"
    assert not out.exists()


@pytest.mark.parametrize("streaming", [False, True], ids=["arrow", "streaming"])
def test_a_bad_file_found_only_when_read_is_one_error_naming_it(tmp_path, streaming, capsys) -> None:
    """The config checks read only the start of the first file; a later bad file is found when the run
    reads it, and is the same one error (naming data.paths, the file and the cause)."""
    _jsonl(tmp_path / "a.jsonl", 200)  # more documents than the config checks read
    bad = _bad_files(tmp_path / "b")["malformed line"][0]
    bad.rename(tmp_path / "b.jsonl")
    paths = [str(tmp_path / "*.jsonl")]
    load_config("tiny", ["data.name=hf", f"data.paths={paths}", f"out_dir={tmp_path / 'run'}"])
    capsys.readouterr()
    with pytest.raises(DataError) as raised:
        for _ in iter_texts(open_hf_dataset(paths, "train", streaming), "text"):
            pass
    assert str(raised.value) == (
        f"data.paths={paths!r} (data.split='train'): cannot read '{tmp_path / 'b.jsonl'}': JSON parse "
        "error: Invalid value. in row 3 (ArrowInvalid)"
    )
    assert "Failed to" not in capsys.readouterr().err  # datasets' own log line is not printed too


def test_a_missing_text_field_or_no_document_is_found_at_config_time(tmp_path) -> None:
    jsonl = _jsonl(tmp_path / "d.jsonl")
    with pytest.raises(ConfigError, match=r"data.text_field='body' is not a field.*\['id', 'text'\]"):
        load_config("tiny", ["data.name=hf", f"data.paths=[{jsonl}]", "data.text_field=body"])
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(
        ConfigError, match=r"data.paths=\[.*e.txt'\] \(data.split='train'\) holds no document"
    ):
        load_config("tiny", ["data.name=hf", f"data.paths=[{tmp_path / 'e.txt'}]"])


# -- data.split of a save_to_disk folder (item 6) ---------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    import datasets

    folder = tmp_path_factory.mktemp("saved")
    train = datasets.Dataset.from_list(_records(40))
    train.save_to_disk(str(folder / "dataset"))
    datasets.Dataset.from_list(_records(10), split="test").save_to_disk(str(folder / "test-dataset"))
    test = datasets.Dataset.from_list(_records(10)[::-1])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(folder / "dict"))
    return {name: str(folder / name) for name in ("dataset", "test-dataset", "dict")}


def _ids(path: str, split: str, streaming: bool) -> list[int]:
    return [r["id"] for r in open_hf_dataset([path], split, streaming)]


@pytest.mark.parametrize("streaming", [False, True], ids=["arrow", "streaming"])
def test_the_split_and_its_slice_apply_to_a_saved_folder(saved, streaming) -> None:
    everything = list(range(40))
    assert _ids(saved["dataset"], "train", streaming) == everything
    assert _ids(saved["dataset"], "train[:10%]", streaming) == everything[:4]
    assert _ids(saved["dataset"], "train[-3:]", streaming) == everything[-3:]
    assert _ids(saved["dataset"], "train[:2]+train[50%:52%]", streaming) == [0, 1, 20]
    assert _ids(saved["test-dataset"], "test[:3]", streaming) == [0, 1, 2]
    assert _ids(saved["dict"], "train[:25%]", streaming) == everything[:10]
    assert _ids(saved["dict"], "test[:2]+train[-1:]", streaming) == [9, 8, 39]


def test_a_split_a_saved_folder_does_not_hold_is_one_line(saved, tmp_path) -> None:
    cases = {
        (saved["dataset"], "test"): f"is not the split of the saved Dataset '{saved['dataset']}', which "
        "holds the one split 'train'",
        (saved["dataset"], "nonsense[:10%]"): "which holds the one split 'train'",
        (saved["test-dataset"], "train"): "which holds the one split 'test'",
        (saved["dict"], "validation[:10%]"): f"is not a split of '{saved['dict']}'; its splits: ['test', "
        "'train']",
        (saved["dict"], "train[:abc]"): "is not a split name, or a slice of one such as 'train[:90%]'",
    }
    for (path, split), message in cases.items():
        expected = re.escape(f"data.split={split!r} ") + ".*" + re.escape(message)
        with pytest.raises(DataError, match=expected):
            open_hf_dataset([path], split, False)
        with pytest.raises(ConfigError, match=expected):
            load_config("tiny", ["data.name=hf", f"data.paths=[{path}]", f"data.split={split}"])


def test_a_slice_of_data_files_needs_streaming_off(tmp_path) -> None:
    jsonl = str(_jsonl(tmp_path / "d.jsonl"))
    assert len(open_hf_dataset([jsonl], "train[:25%]", False)) == 10
    load_config("tiny", ["data.name=hf", f"data.paths=[{jsonl}]", "data.split=train[:50%]"])
    with pytest.raises(ConfigError, match=r"data.split='train\[:50%\]' is a slice, which data files read "):
        load_config(
            "tiny", ["data.name=hf", f"data.paths=[{jsonl}]", "data.split=train[:50%]", "data.streaming=true"]
        )
    with pytest.raises(
        ConfigError, match="data.split='test' is not a split of data.paths=.*form the one split"
    ):
        load_config("tiny", ["data.name=hf", f"data.paths=[{jsonl}]", "data.split=test"])
