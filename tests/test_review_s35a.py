"""Review s35a of the data pipeline: local datasets (data.name=hf), tokenizers, packing, caches."""

from __future__ import annotations

import json
import os

import pytest

from innerloop.data.hf import iter_texts, open_hf_dataset


@pytest.fixture
def local_datasets_cache(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path_factory.getbasetemp() / "hf-datasets-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)


def _texts(paths: list[str]) -> list[str]:
    dataset = open_hf_dataset(paths, "train", streaming=False)
    return [text for _, texts in iter_texts(dataset, "text") for text in texts]


@pytest.mark.slow  # reason: two Arrow builds by datasets' load_dataset (about 0.4 s)
def test_a_data_file_rewritten_with_its_old_modification_time_is_read_again(
    tmp_path, local_datasets_cache
) -> None:
    """``datasets`` keys its Arrow cache of local files on their modification time alone: a file
    rewritten with its time kept (``cp -p``, ``rsync -t``, ``tar x``), even to another length, was read
    from the cache of its old content, silently."""
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": f"old {i}"}) + "\n" for i in range(3)))
    status = path.stat()
    assert _texts([str(path)]) == ["old 0", "old 1", "old 2"]
    path.write_text("".join(json.dumps({"text": f"new {i}"}) + "\n" for i in range(4)))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert _texts([str(path)]) == ["new 0", "new 1", "new 2", "new 3"]


def test_a_tokenizer_rewritten_with_its_old_time_and_size_is_read_again(tmp_path) -> None:
    """``load_tokenizer`` keeps tokenizers by their files' stamps: it kept one by (modification time, size),
    so a tokenizer.json rewritten in place to one of the same size with its time kept (``cp -p``) was
    the old tokenizer within the process. The stamp now has the change time too (``file_stamp``)."""
    from innerloop.data.tokenizer import byte_level_tokenizer_json, load_tokenizer

    path = tmp_path / "tokenizer.json"
    text = byte_level_tokenizer_json()
    path.write_text(text, encoding="utf-8")
    status = path.stat()
    assert load_tokenizer(str(path)).encode("!") == [ord("!")]
    swapped = text.replace('"!": 33', '"!": 99').replace('"c": 99', '"c": 33')  # the same size
    assert swapped != text and len(swapped) == len(text)
    with open(path, "r+", encoding="utf-8") as file:  # in place: the same inode
        file.write(swapped)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert load_tokenizer(str(path)).encode("!") == [99]


def _tiny_module():
    from innerloop.models import ModelConfig, TTTConfig
    from innerloop.train import LanguageModelModule

    config = ModelConfig(
        mixer="ttt",
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        vocab_size=64,
        ttt=TTTConfig(inner_model="linear", inner_loss="reconstruction", mini_batch_size=4),
    )
    return LanguageModelModule(config, lr=1e-3, weight_decay=0.1, warmup_steps=1, max_steps=2)


def test_a_batch_of_int32_ids_trains_as_its_int64_ids() -> None:
    """The model reads int32 ids (numpy token files often are), but their targets came to cross-entropy's
    bare "expected target dtype to be Long or Byte, but got Int"."""
    import torch

    torch.manual_seed(0)
    module = _tiny_module()
    ids = torch.randint(0, 64, (2, 9))
    batch = ids[:, :-1], ids[:, 1:]
    expected = module.training_step(batch, 0)
    got = module.training_step(tuple(t.to(torch.int32) for t in batch), 0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("bad", [64, -5])
def test_a_target_outside_the_vocabulary_is_one_line_naming_targets(bad) -> None:
    """A target id past the model's vocabulary (the last target of a window is in no input, so the inputs'
    check does not see it) was torch's bare "Target 64 is out of bounds" (a device-side assert on a GPU)."""
    import torch

    module = _tiny_module()
    inputs = torch.randint(0, 64, (2, 8))
    targets = torch.roll(inputs, -1, 1)
    targets[:, 0] = -100  # not scored: valid
    targets[1, -1] = bad
    match = rf"targets holds token id {bad}, outside .* vocab_size=64 tokens: valid ids are 0\.\.63, or -100"
    with pytest.raises(ValueError, match=match):
        module.training_step((inputs, targets), 0)
    with pytest.raises(ValueError, match=match):
        module.validation_step((inputs, targets), 0)
    with pytest.raises(TypeError, match="targets must hold integer token ids"):
        module.training_step((inputs, targets.float()), 0)


def test_a_tokenizer_saved_with_truncation_and_padding_on_reads_each_document_whole(tmp_path) -> None:
    """A tokenizer.json saved with truncation or padding on (as many saved by transformers are, e.g.
    max_length 512) cut every document to its first tokens and padded the documents read together with
    pad ids, silently, in the training stream: ``HFTokenizer`` now turns both off."""
    from innerloop.data.text import read_tokens
    from innerloop.data.tokenizer import byte_level_tokenizer_json, load_tokenizer

    document = json.loads(byte_level_tokenizer_json(end_of_text=True))
    document["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    document["padding"] = {
        "strategy": "BatchLongest",
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 256,
        "pad_type_id": 0,
        "pad_token": "<|endoftext|>",
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(document), encoding="utf-8")
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.encode("hello world") == list(b"hello world")
    assert tokenizer.encode_many(["hello world", "a"]) == [list(b"hello world"), [ord("a")]]
    (tmp_path / "a.txt").write_text("a long document\r\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("b", encoding="utf-8")
    tokens = read_tokens([tmp_path / "a.txt", tmp_path / "b.txt"], tokenizer).tolist()
    assert tokens == [*b"a long document\r\n", 256, ord("b"), 256]


def test_a_run_whose_tokenized_text_is_too_short_leaves_no_out_dir(tmp_path) -> None:
    """The config checks count a text's bytes; a tokenizer's token counts are known once the files are
    read, by the DataModule's setup, which ran inside ``trainer.fit`` after the loggers made
    ``logs/version_0``: the refused run left its out_dir (with the lock and an empty log folder) where
    nothing had been, against ``lock_run_dir``'s 'the out_dir is left as it was'."""
    from innerloop.config import load_config
    from innerloop.data.text import DataError
    from innerloop.data.tokenizer import byte_level_tokenizer_json
    from innerloop.train import train

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(
        byte_level_tokenizer_json(end_of_text=True), encoding="utf-8"
    )
    (tmp_path / "a.txt").write_text("too short for the window", encoding="utf-8")
    out_dir = tmp_path / "run"
    overrides = [
        f"data.tokenizer={tmp_path / 'tok'}",
        f"data.paths=[{tmp_path / 'a.txt'}]",
        "data.seq_len=64",
        "trainer.max_steps=1",
        "trainer.progress_bar=false",
        f"out_dir={out_dir}",
    ]
    run, cfg = load_config("tiny", overrides)
    with pytest.raises(
        DataError, match=r"the training text has \d+ tokens, fewer than data.seq_len \+ 1 = 65"
    ):
        train(run, cfg)
    assert not out_dir.exists()


@pytest.mark.slow  # reason: datasets' CSV builder, streaming and not (about 0.3 s)
def test_csv_text_cells_are_read_as_their_text(tmp_path, local_datasets_cache) -> None:
    """pandas read a CSV text column of numbers (``1999``) as numbers, and the cells ``NA``, ``nan``,
    ``null``, ``None`` and an empty one as null: such datasets were refused ('is a float', 'missing or
    null'), though a CSV cell is text. Another column keeps its missing values (``n``'s empty cell)."""
    import datasets

    from innerloop.data.hf import check_hf_dataset

    path = tmp_path / "a.csv"
    path.write_text('\ufefftext,n\n1999,1\n0042,\nNA,3\nnan,4\n"",5\nnull,6\nNone,7\n', encoding="utf-8")
    for streaming in (False, True):
        check_hf_dataset([str(path)], "train", "text", streaming)
        dataset = open_hf_dataset([str(path)], "train", streaming, "text")
        assert [t for _, texts in iter_texts(dataset, "text") for t in texts] == [
            "1999", "0042", "NA", "nan", "", "null", "None",
        ]  # fmt: skip
    loaded = open_hf_dataset([str(path)], "train", False, "text")
    assert isinstance(loaded, datasets.Dataset) and loaded["n"][1] is None  # missing, not the text ''


@pytest.mark.slow  # reason: an Arrow build by datasets' load_dataset (about 0.2 s)
def test_an_empty_slice_of_data_files_is_one_line_saying_it_holds_no_document(
    tmp_path, local_datasets_cache
) -> None:
    """A slice that selects nothing (``train[50%:10%]``) passed the config check (which reads the whole
    split as a stream) and was then refused as 'no document is held out for validation ... the data holds
    fewer', which sends the user to data.val_fraction."""
    from innerloop.data.text import DataError
    from innerloop.train.data import HFDataModule

    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20)))
    module = HFDataModule([str(path)], split="train[50%:10%]", seq_len=4, batch_size=1, val_batches=1)
    with pytest.raises(DataError, match=r"\(split='train\[50%:10%\]'\) holds no document$"):
        module.setup()


def test_a_parquet_file_without_rows_is_named(tmp_path) -> None:
    """A parquet file with no rows (a schema alone) failed to read with pyarrow's 'BatchSize must be
    greater than 0, got 0', which says neither that the file is empty nor what to do."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from innerloop.data.hf import check_hf_source
    from innerloop.data.text import DataError

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["some text"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"parquet file '.*a\.parquet', which holds no row .* remove it"):
        check_hf_source([str(tmp_path)])
    (tmp_path / "a.parquet").unlink()
    assert check_hf_source([str(tmp_path)]) == ("parquet", [str((tmp_path / "b.parquet").resolve())])


@pytest.mark.slow  # reads a jsonl file with datasets (its Arrow cache made): ~1 s warm, 4 s as a process's first
def test_a_resume_on_hf_data_edited_since_the_checkpoint_is_warned_about(tmp_path, caplog):
    # An edit that keeps the recorded stream position readable resumed on other data without a word.
    from innerloop.train.data import HFDataModule

    path = tmp_path / "d.jsonl"
    path.write_text("".join(f'{{"text": "document number {i}"}}\n' for i in range(40)), encoding="utf-8")

    def resumed_from(state):
        caplog.clear()
        with caplog.at_level("WARNING"):
            HFDataModule([str(path)], seq_len=8, batch_size=2, val_batches=1).load_state_dict(state)
        return caplog.text

    module = HFDataModule([str(path)], seq_len=8, batch_size=2, val_batches=1)
    module.setup()
    state = json.loads(json.dumps(module.state_dict()))  # as the checkpoint's JSON tree holds it
    assert "differ" not in resumed_from(state)
    path.write_text(path.read_text(encoding="utf-8").replace("number 3", "number 33"), encoding="utf-8")
    assert "the data files differ from those the checkpoint was trained on" in resumed_from(state)
    del state["files"]  # a checkpoint written before runs recorded their files: nothing to compare
    assert "differ" not in resumed_from(state)


def test_a_parquet_footer_is_read_once_until_the_file_changes(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from innerloop.data.hf import check_hf_source
    from innerloop.data.text import DataError

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), path)
    reads = []
    read_metadata = pq.read_metadata
    monkeypatch.setattr(pq, "read_metadata", lambda f: reads.append(f) or read_metadata(f))
    for _ in range(3):
        check_hf_source([str(path)])
    assert len(reads) == 1
    pq.write_table(
        pa.table({"text": []}, schema=pa.schema([("text", pa.string())])), path
    )  # rewritten: empty
    with pytest.raises(DataError, match="holds no row"):
        check_hf_source([str(path)])
    assert len(reads) == 2
