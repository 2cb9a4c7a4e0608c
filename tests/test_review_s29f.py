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
