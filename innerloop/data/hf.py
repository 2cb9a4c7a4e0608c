"""Local datasets read with the Hugging Face ``datasets`` library (``data.name: hf``).

``data.paths`` is either data files (json/jsonl, text, parquet, csv or arrow, all of one format;
files, folders or globs) or one folder written by ``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk``. ``data.split`` picks the split (data files form the split ``train``;
non-streaming, slices such as ``train[:90%]`` work), ``data.text_field`` the column holding the text,
and ``data.streaming`` reads the data as a stream instead of building an Arrow table first.

Nothing is downloaded: only local paths are accepted (a name such as ``wikitext`` is refused) and
``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` are set before ``datasets`` is imported. ``datasets`` is
imported only here, when such a dataset is opened.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from innerloop.data.text import DataError, resolve_files

FORMATS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".text": "text",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
"""The ``datasets`` builder of each data-file suffix."""

_READ_CHUNK = 64  # documents read (and tokenized) at a time


def _saved_dataset_folder(paths: Sequence[str]) -> Path | None:
    """The folder, when ``paths`` is one folder written by ``save_to_disk`` (a Dataset's has
    ``state.json``, a DatasetDict's ``dataset_dict.json``)."""
    if len(paths) != 1:
        return None
    folder = Path(paths[0]).expanduser()
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
        return folder
    return None


def check_hf_source(paths: Sequence[str]) -> tuple[str, list[str]]:
    """``("saved", [folder])`` or ``(builder, files)`` for ``data.paths``, from the paths alone (nothing
    is imported or read). Raises :class:`DataError` naming ``data.paths`` for a missing path (e.g. a
    hub name), an unknown suffix or files of several formats."""
    if not paths:
        raise DataError(
            "data.name='hf' needs data.paths: local data files (json/jsonl, text, parquet, csv, arrow) or "
            "a folder written by save_to_disk"
        )
    saved = _saved_dataset_folder(paths)
    if saved is not None:
        return "saved", [str(saved)]
    for pattern in paths:
        if not Path(pattern).expanduser().exists() and not any(c in pattern for c in "*?["):
            raise DataError(
                f"data.paths entry {pattern!r} is not a local file or folder: data.name='hf' reads local "
                "files only (nothing is downloaded); download a hub dataset yourself and give its files "
                "or its save_to_disk folder"
            )
    files = resolve_files(paths)
    builders = {FORMATS.get(f.suffix.lower()) for f in files}
    if None in builders:
        unknown = next(f for f in files if f.suffix.lower() not in FORMATS)
        raise DataError(
            f"data.paths has {str(unknown)!r}, whose suffix {unknown.suffix!r} is not a data format "
            f"data.name='hf' reads; valid suffixes: {sorted(FORMATS)}"
        )
    if len(builders) > 1:
        raise DataError(f"data.paths mixes formats {sorted(builders)}: give files of one format")
    return builders.pop(), [str(f) for f in files]


def open_hf_dataset(paths: Sequence[str], split: str, streaming: bool) -> Any:
    """The ``datasets`` Dataset (or IterableDataset when ``streaming``) of ``data.paths``' split."""
    kind, files = check_hf_source(paths)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    try:
        if kind != "saved":
            return datasets.load_dataset(kind, data_files=files, split=split, streaming=streaming)
        loaded = datasets.load_from_disk(files[0])
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(
                    f"data.split={split!r} is not a split of {files[0]!r}; its splits: {sorted(loaded)}"
                )
            loaded = loaded[split]
        return loaded.to_iterable_dataset() if streaming else loaded
    except DataError:
        raise
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise DataError(f"data.paths={list(paths)!r}, data.split={split!r}: {_one_line(err)}") from None


def _one_line(err: object) -> str:
    return " ".join(str(err).split())


def _check_text(value: Any, text_field: str, index: int) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"data.text_field={text_field!r} of document {index} is a {type(value).__name__}, not text"
        )
    return value


def _missing_field(text_field: str, fields: Any) -> DataError:
    return DataError(
        f"data.text_field={text_field!r} is not a field of the dataset; its fields: {sorted(fields)}"
    )


def iter_texts(dataset: Any, text_field: str, first: int = 0) -> Iterator[tuple[int, list[str]]]:
    """``(number of the first, texts)`` of chunks of documents from document ``first`` on, in order.
    Raises :class:`DataError` naming ``data.text_field`` when a document has no text there."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):  # a Dataset: read by slices
        if text_field not in dataset.column_names:
            raise _missing_field(text_field, dataset.column_names)
        for start in range(first, len(dataset), _READ_CHUNK):
            texts = dataset[start : start + _READ_CHUNK][text_field]
            yield start, [_check_text(t, text_field, start + i) for i, t in enumerate(texts)]
        return
    chunk: list[str] = []  # an IterableDataset: skip (read past) the first documents, then read on
    index = first
    for record in dataset.skip(first) if first else dataset:
        if text_field not in record:
            raise _missing_field(text_field, record)
        chunk.append(_check_text(record[text_field], text_field, index + len(chunk)))
        if len(chunk) == _READ_CHUNK:
            yield index, chunk
            index, chunk = index + len(chunk), []
    if chunk:
        yield index, chunk
