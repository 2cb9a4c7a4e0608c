"""Review s15 (data): data.val_fraction=0 is refused for a new run whatever the number of files, while a
run saved so still reads its data (L3 and its regression review), the last file
held out when the split by file hash holds out none is named in one logged line (L3), and a JSON file
that is not a tokenizer.json is called that, not a JSON syntax error (L7)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from innerloop.checkpoints import CheckpointError
from innerloop.config.load import ConfigError, load_config
from innerloop.data.text import DataError, check_text_lengths, split_by_file, split_keys
from innerloop.data.tokenizer import TokenizerError, byte_level_tokenizer_json, load_tokenizer
from innerloop.train.data import TextDataModule
from innerloop.train.run import train

LONG = "the quick brown fox jumps over the lazy dog. " * 40
NOTICE = "is held out instead"


def _folder(tmp_path: Path, names: tuple[str, ...]) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in names:
        (folder / name).write_text(LONG)
    return folder


# -- L3: data.val_fraction=0 holds out nothing, whatever the number of files -------------------------------


def test_val_fraction_0_is_refused_for_a_new_run_before_anything_is_written(tmp_path) -> None:
    folder = _folder(tmp_path, ("a.txt", "b.txt", "c.txt"))
    out_dir = tmp_path / "r"
    overrides = [f"data.paths=[{folder}]", "data.val_fraction=0", "data.seq_len=16", f"out_dir={out_dir}"]
    run, _ = load_config("tiny", overrides)
    with pytest.raises(ConfigError, match=r"^data.val_fraction=0 holds out no validation text.*e.g. 0.1"):
        train(run)
    assert not out_dir.exists()


def test_a_run_saved_at_val_fraction_0_with_several_files_still_reads_its_data(tmp_path, caplog) -> None:
    # review s15 regressions, MED: such runs (made before the refusal) must still resume and evaluate
    folder = _folder(tmp_path, ("a.txt", "b.txt", "c.txt"))
    check_text_lengths(1000, 1000, 3, 16, 0.0)
    data = TextDataModule([str(folder)], seq_len=16, val_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        data.setup()
    assert any("c.txt" in notice for notice in _notices(caplog))
    assert data.val_bytes.numel() == len(LONG) + 1  # one file and its document separator
    with pytest.raises(CheckpointError, match="no checkpoint"):  # past the new-run check, to the checkpoint
        train(load_config("tiny", [f"data.paths=[{folder}]", "data.val_fraction=0", "data.seq_len=16",
                                   f"out_dir={tmp_path / 'r'}"])[0], resume=True)  # fmt: skip


def test_val_fraction_0_with_one_file_keeps_its_message() -> None:
    with pytest.raises(
        DataError,
        match=r"with a single file its last val_fraction of bytes is held out; set data.val_fraction > 0",
    ) as refused:
        check_text_lengths(1000, 0, 1, 16, 0.0)
    assert "more files" not in str(refused.value)  # a new run with several files refuses 0 too


# -- L3: the file held out by the fallback is named, once --------------------------------------------------


def _notices(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "innerloop.data.text" and NOTICE in r.getMessage()
    ]


def test_the_file_held_out_by_the_fallback_is_named_in_one_warning(tmp_path, caplog) -> None:
    folder = _folder(tmp_path, ("b.txt", "c.txt"))  # both hash to the training side at 0.1
    keys = split_keys([str(folder)])
    assert split_by_file(sorted(keys), 0.1, keys)[1] == []  # the premise: the hash holds out neither
    caplog.set_level(logging.WARNING, logger="innerloop.data.text")
    overrides = [f"data.paths=[{folder}]", "data.seq_len=16", f"out_dir={tmp_path / 'run'}"]
    load_config("tiny", overrides)  # the config's check: not announced there (the data module's setup does)
    assert _notices(caplog) == []
    data = TextDataModule([str(folder)], seq_len=16, val_fraction=0.1)
    data.setup()
    data.setup()  # set up once
    (notice,) = _notices(caplog)
    held_out = str((folder / "c.txt").resolve())
    assert f"the last file in sorted order, {held_out!r}, is held out instead" in notice
    assert "data.val_fraction=0.1 put all 2 files on one side" in notice


def test_a_split_by_hash_that_holds_out_files_is_not_announced(tmp_path, caplog) -> None:
    folder = _folder(tmp_path, ("b.txt", "c.txt"))
    keys = split_keys([str(folder)])
    assert split_by_file(sorted(keys), 0.5, keys)[1] != []  # the premise: 0.5 holds out c.txt by hash
    caplog.set_level(logging.WARNING, logger="innerloop.data.text")
    TextDataModule([str(folder)], seq_len=16, val_fraction=0.5).setup()
    assert _notices(caplog) == []


# -- L7: a JSON file that is not a tokenizer.json --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', "is JSON but not a tokenizer.json: it has no key 'model'; its keys ['a'] are not keys"),
        (
            "[1, 2]",
            "is JSON (list) but not a tokenizer.json: a tokenizer.json is a JSON object with the key 'model'",
        ),
        ('{"a": ', "is not a valid tokenizer.json: it is not valid JSON (Expecting value"),
    ],
)
def test_a_json_file_that_is_not_a_tokenizer_json_says_what_it_lacks(tmp_path, text, expected) -> None:
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(TokenizerError) as caught:
        load_tokenizer(str(path))
    message = str(caught.value)
    assert message.startswith(f"data.tokenizer={str(path)!r} ") and expected in message
    if text.startswith('{"a": 1'):
        assert "expected `,`" not in message  # the library's wording, which reads as a syntax error


def test_a_tokenizer_json_with_a_foreign_key_names_it(tmp_path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({**json.loads(byte_level_tokenizer_json()), "extra": 1}))
    with pytest.raises(
        TokenizerError, match=r"is JSON but not a tokenizer.json: its keys \['extra'\] are not"
    ):
        load_tokenizer(str(path))
    path.write_text(json.dumps({"model": 1}))  # the keys of one: the library's reason is the one to give
    with pytest.raises(TokenizerError, match=r"is not a valid tokenizer.json: data did not match"):
        load_tokenizer(str(path))
