"""Review s29f of the data pipeline: local datasets (data.name=hf), packing, recall, resume."""

from __future__ import annotations

import pytest

from innerloop.data.hf import check_hf_dataset, saved_splits
from innerloop.data.text import DataError
from innerloop.train.data import HFDataModule


@pytest.fixture(autouse=True)
def _local_datasets_cache(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path_factory.getbasetemp() / "hf-datasets-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)


def test_a_saved_dataset_dict_with_an_empty_split_reads_its_other_splits(tmp_path) -> None:
    """``Dataset.from_dict({"text": []}).save_to_disk`` writes no data file, which ``load_from_disk``
    cannot read (IndexError): a DatasetDict with such a split could not be read at all, even its
    non-empty ``train``, and an empty saved Dataset was 'list index out of range'."""
    import datasets

    train = datasets.Dataset.from_dict({"text": [f"document {i} " * 4 for i in range(40)]})
    datasets.DatasetDict({"train": train, "test": datasets.Dataset.from_dict({"text": []})}).save_to_disk(
        tmp_path / "dd"
    )
    paths = [str(tmp_path / "dd")]
    assert saved_splits(paths) == ["test", "train"]
    check_hf_dataset(paths, "train", "text", streaming=False)
    module = HFDataModule(paths, seq_len=8, batch_size=2, val_batches=1)
    module.setup()
    inputs, _ = next(iter(module.train_dataloader()))
    assert bytes(inputs[0].tolist()) == b"document"
    with pytest.raises(DataError, match=r"data.split='test'\) holds no document"):
        check_hf_dataset(paths, "test", "text", streaming=False)

    datasets.Dataset.from_dict({"text": []}).save_to_disk(tmp_path / "empty")
    with pytest.raises(DataError, match="holds no document"):
        check_hf_dataset([str(tmp_path / "empty")], "train", "text", streaming=True)


@pytest.mark.parametrize("gap", [2**30, 10**12, 2**63])
def test_a_recall_gap_too_long_to_hold_is_refused_naming_it(gap) -> None:
    """data.seq_len is at most 2**30 (a window held in memory), but data.recall.gap, which makes the
    recall task's sequences 4 * num_pairs + gap - 1 tokens long, had no bound: 10**12 passed the config
    checks and failed at the first batch in torch's allocator, naming no setting."""
    from innerloop.config import load_config
    from innerloop.config.load import ConfigError
    from innerloop.train.data import RecallDataModule

    with pytest.raises(ConfigError, match=rf"data.recall.gap={gap} must be in \[0, "):
        load_config("recall-ttt", [f"data.recall.gap={gap}"])
    with pytest.raises(ValueError, match=rf"gap={gap} must be in \[0, "):
        RecallDataModule(gap=gap)
    load_config("recall-ttt", [f"data.recall.gap={2**30 - 255}", "data.recall.num_pairs=64"])


@pytest.mark.parametrize(
    ("module", "argument", "value"),
    [
        ("hf", "streaming", "false"),
        ("hf", "split", None),
        ("hf", "text_field", 3),
        ("hf", "tokenizer", "bytes"),
        ("text", "tokenizer", "bytes"),
    ],
)
def test_the_data_modules_refuse_arguments_of_the_wrong_type_naming_them(tmp_path, module, argument, value):
    """HFDataModule took streaming='false' as true (a stream, silently), split=None and tokenizer='bytes'
    failed in setup with AttributeErrors ('NoneType' object has no attribute 'split', 'str' object has
    no attribute 'eos_id'); TextDataModule took tokenizer='bytes' to the same AttributeError."""
    from innerloop.train.data import TextDataModule

    (tmp_path / "a.jsonl").write_text('{"text": "abc"}\n')
    with pytest.raises((TypeError, ValueError), match=rf"{argument}={value!r} "):
        if module == "hf":
            HFDataModule([str(tmp_path / "a.jsonl")], **{argument: value})
        else:
            TextDataModule(**{argument: value})


def test_a_resume_position_past_the_last_document_is_refused_not_wrapped_to_the_next_epoch() -> None:
    """A checkpoint's stream position (epoch, document, offset) at a document the data no longer holds
    (the dataset shrank since) silently restarted the stream at the next epoch's first document, where
    an offset past a document's end was already refused as 'the data changed'."""
    from itertools import islice

    from innerloop.data.packing import packed_windows

    def reader(count: int):
        def read(epoch: int, first: int):
            for number in range(first, count):
                yield number, [number % 251 + 1] * 7

        return read

    seq_len = 4
    position = list(islice(packed_windows(reader(20), seq_len), 25))[-1][1]
    assert position.epoch == 0 and position.document > 10
    resumed = list(islice(packed_windows(reader(20), seq_len, position), 3))  # the same data: fine
    assert len(resumed) == 3
    with pytest.raises(DataError, match="the data changed since the checkpoint was written"):
        next(packed_windows(reader(10), seq_len, position))
