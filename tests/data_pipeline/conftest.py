"""The data-pipeline tests keep the ``datasets`` library's Arrow cache in a temporary folder (never the
user's ~/.cache) and never reach the network."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _local_datasets_cache(tmp_path_factory, monkeypatch) -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = tmp_path_factory.getbasetemp() / "hf-datasets-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))  # for subprocesses
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
