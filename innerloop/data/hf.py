"""Local datasets read with the Hugging Face ``datasets`` library (``data.name: hf``).

``data.paths`` is either data files (json/jsonl, text, parquet, csv or arrow, all of one format;
files, folders or globs; json, text and csv also compressed, ``train.jsonl.gz`` or ``.zst``) or one folder written by ``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk``. ``data.split`` picks the split (data files form the split ``train``, and
non-streaming, slices such as ``train[:90%]`` work; a saved DatasetDict has its splits, a saved Dataset
its own one, and slices of them work streaming or not), ``data.text_field`` the column holding the
text, and ``data.streaming`` reads the data as a stream instead of building an Arrow table first.
:func:`check_hf_dataset` (the config checks) opens the data and reads its first documents.

Nothing is downloaded: only local paths are accepted (a name such as ``wikitext`` is refused) and
``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` are set before ``datasets`` is imported. ``datasets`` is
imported only here, when such a dataset is opened.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import glob
import gzip
import hashlib
import itertools
import json
import logging
import lzma
import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from innerloop.core.functional import user_path
from innerloop.core.wording import a_type
from innerloop.data.atomic import file_stamp
from innerloop.data.text import COMPRESSIONS, DataError, path_entries, split_keys
from innerloop.data.tokenizer import UTF8_BYTE_ORDER_MARK, missing_package

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

_COMPRESSIBLE = ("json", "text", "csv")


def data_suffix(name: str | os.PathLike[str]) -> str:
    """The suffix of the file ``name`` that says its format, lower-cased: the last one (``'.jsonl'``,
    ``''`` for none), with the one before it under a compression suffix (``'.jsonl.gz'``)."""
    path = PurePosixPath(os.fspath(name))
    suffix = path.suffix.lower()
    return PurePosixPath(path.stem).suffix.lower() + suffix if suffix in COMPRESSIONS else suffix


def data_format(name: str | os.PathLike[str]) -> str | None:
    """The ``datasets`` builder that reads the data file ``name`` by its suffix (:data:`FORMATS`), also
    under a compression suffix (:data:`COMPRESSIONS`: ``a.jsonl.gz`` is ``json``); None for another file."""
    suffix = data_suffix(name)
    for compression in COMPRESSIONS:
        if suffix.endswith(compression):
            inner = FORMATS.get(suffix.removesuffix(compression))
            return inner if inner in _COMPRESSIBLE else None
    return FORMATS.get(suffix)


_READ_CHUNK = 64  # documents read (and tokenized) at a time


def _saved_dataset_folder(paths: Sequence[str]) -> Path | None:
    """The folder, when ``paths`` is one folder written by ``save_to_disk`` (a Dataset's has
    ``state.json``, a DatasetDict's ``dataset_dict.json``)."""
    if len(paths) != 1:
        return None
    folder = user_path(paths[0])
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
        return folder
    return None


def check_hf_source(paths: Sequence[str]) -> tuple[str, list[str]]:
    """``("saved", [folder])`` or ``(builder, files)`` for ``data.paths``, from the paths alone (nothing
    is imported or read). Raises :class:`DataError` naming ``data.paths`` for a missing path (e.g. a
    hub name), an unknown suffix or files of several formats."""
    paths = path_entries(paths)  # an empty entry would be the current directory (a save_to_disk folder?)
    if not paths:
        raise DataError(
            "data.name='hf' needs data.paths: local data files (json/jsonl, text, parquet, csv, arrow) or "
            "a folder written by save_to_disk"
        )
    saved = _saved_dataset_folder(paths)
    if saved is not None:
        refuse_chained_url_syntax([saved])
        return "saved", [str(saved)]
    for pattern in paths:
        path = user_path(pattern)  # a link to nothing is split_keys' to name (a hub cache's deleted blob)
        if not path.exists() and not path.is_symlink() and not any(c in pattern for c in "*?["):
            raise DataError(
                f"data.paths entry {pattern!r} is not a local file or folder: data.name='hf' reads local "
                "files only (nothing is downloaded); download a hub dataset yourself and give its files "
                "or its save_to_disk folder"
            )
    # The files in the order of their names as found, each read by its suffix as found: a link's
    # target may have none (the Hugging Face hub cache keeps snapshots/<rev>/train.jsonl -> blobs/<hash>).
    keys = split_keys(paths)  # resolved file -> its path as found, relative to the entries' folder
    files = sorted(keys, key=lambda f: keys[f])
    builders = {data_format(keys[f]) for f in files}
    if None in builders:
        unknown = next(f for f in files if data_format(keys[f]) is None)
        raise DataError(
            f"data.paths has {keys[unknown]!r}, whose suffix {data_suffix(keys[unknown])!r} is not a data format "
            f"data.name='hf' reads; valid suffixes: {sorted(FORMATS)}, json/jsonl/txt/text/csv ones also "
            f"compressed ({', '.join(COMPRESSIONS)})"
        )
    if len(builders) > 1:
        raise DataError(f"data.paths mixes formats {sorted(builders)}: give files of one format")
    builder = builders.pop()
    empty = [f for f in files if f.stat().st_size == 0]
    if empty and builder != "text":  # a text file may hold no line; the other formats fail to read
        raise DataError(
            f"data.paths has the empty file {str(empty[0])!r} ({len(empty)} empty in all), which "
            f"data.name='hf' cannot read as {builder}: remove it from data.paths"
        )
    refuse_chained_url_syntax(files)
    if builder == "parquet":
        _check_parquet_rows(files)
    zstd_files = [f for f in files if PurePosixPath(keys[f]).suffix.lower() == ".zst"]
    if zstd_files:
        _check_zstandard(keys[zstd_files[0]])
    for f in zstd_files:
        _refuse_truncated_zstd(f)
    return builder, [str(f) for f in files]


def refuse_chained_url_syntax(paths: Sequence[Path]) -> None:
    """Refuse, naming ``data.paths``, a path holding ``::``, which ``datasets`` reads as its chained-URL
    syntax (``zip://x.jsonl::archive.zip``): the file ``a::b/d.jsonl`` was "not found", and a saved
    dataset in ``a::b`` was looked for in ``a``."""
    for path in paths:
        if "::" in str(path):
            raise DataError(
                f"data.paths has {str(path)!r}, which holds '::': the datasets library reads '::' as its "
                "chained-URL syntax (zip://x.jsonl::archive.zip) and cannot find such a local path (a link is read "
                "at its target); rename the folder or file so that its path holds no '::'"
            )


def source_files(paths: Sequence[str]) -> list[Path]:
    """The files ``data.paths`` has ``data.name='hf'`` read: the data files, or every file of a folder
    ``save_to_disk`` wrote (:func:`check_hf_source`'s errors for a bad source)."""
    kind, found = check_hf_source(paths)
    if kind == "saved":
        return sorted(p for p in Path(found[0]).rglob("*") if p.is_file())
    return [Path(f) for f in found]


def files_record(files: Sequence[Path]) -> list[list[Any]]:
    """``[name, size, modification time (ns)]`` of each of ``files``: what a checkpoint records of the data
    it was trained on, so that a resume can say the data changed. Paths, inodes and change times are left
    out: the data moved to another folder or machine (``cp -p``, ``rsync -a``) is the same data."""
    return [[f.name, (stat := f.stat()).st_size, stat.st_mtime_ns] for f in files]


def _check_parquet_rows(files: Sequence[Path]) -> None:
    """:class:`DataError` naming the first of ``files`` that holds no row (``datasets`` fails on it with
    pyarrow's "BatchSize must be greater than 0, got 0"); each file's footer alone is read."""
    for file in files:
        rows = _parquet_rows(file)
        if rows == 0:
            raise DataError(
                f"data.paths has the parquet file {str(file)!r}, which holds no row and which data.name='hf' "
                "cannot read: remove it from data.paths"
            )


_PARQUET_ROWS: dict[tuple[Path, Any], int | None] = {}
"""Row counts of the parquet files read so far, by path and :func:`~innerloop.data.atomic.file_stamp`:
the source is checked several times a run (config, data module, evaluation names), and a dataset of
thousands of shards would read every footer each time."""


def _parquet_rows(file: Path) -> int | None:
    """The rows ``file``'s parquet footer declares; None when it is not a parquet file (the reader names
    it and why when it reads it)."""
    import pyarrow.parquet as pq

    key = (file, file_stamp(file))
    if key not in _PARQUET_ROWS:
        try:
            _PARQUET_ROWS[key] = pq.read_metadata(file).num_rows
        except Exception:
            _PARQUET_ROWS[key] = None
    return _PARQUET_ROWS[key]


_EMPTY_CHUNKS = 8
"""Chunks of documents :func:`check_hf_dataset` reads past a first chunk of empty texts before it
gives up looking for text (the whole dataset when it is shorter)."""


def check_hf_dataset(paths: Sequence[str], split: str, text_field: str, streaming: bool) -> None:
    """Open ``data.paths``' split and read its first documents, as the run will (data files as a
    stream, which reads only the start of the first file; a ``save_to_disk`` folder is memory-mapped):
    a missing package, a split or slice that is not there, a first file that cannot be read and a
    ``data.text_field`` that is not there are :class:`DataError` now, before a run writes anything.
    What only a full read can find (e.g. a malformed line further on) is one error when it is read."""
    kind, _ = check_hf_source(paths)
    if kind != "saved" and not streaming and set(_split_names(import_datasets(), split)) == {"train"}:
        split, streaming = "train", True  # the slice is checked here, and cut when the run opens the data
    chunks = iter_texts(open_hf_dataset(paths, split, streaming, text_field), text_field)
    first = next(chunks, None)
    if first is None:
        raise DataError(f"data.paths={list(paths)!r} (data.split={split!r}) holds no document")
    if not any(first[1]) and not any(any(texts) for _, texts in itertools.islice(chunks, _EMPTY_CHUNKS)):
        raise DataError(
            f"data.text_field={text_field!r} is empty in every document of data.paths={list(paths)!r} "
            f"(data.split={split!r}) read so far: a run would train on end-of-text tokens alone"
        )


def import_datasets() -> Any:
    """The ``datasets`` module, imported offline (``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` set first);
    :class:`DataError` naming ``data.name='hf'`` and the install command when it cannot be imported."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError as err:
        raise DataError(missing_package("data.name='hf'", "datasets", err)) from None
    datasets.disable_progress_bars()
    return datasets


class _HeldLog(logging.Handler):
    """The records ``datasets`` logs while it reads, held instead of printed: its own handler would print
    e.g. ``Failed to load JSON from file ...`` above the one-line error; they name the file at fault."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _reading(paths: Sequence[str], split: str, files: Sequence[str]) -> Iterator[None]:
    """Turn what ``datasets``/``pyarrow``/``pandas`` raise while opening or reading ``data.paths`` (an
    empty or malformed file, a file that is not of its format) into one :class:`DataError` naming
    ``data.paths``, the file (where it is known) and the cause. The logs of a read that succeeds are
    passed on to ``datasets``' handlers."""
    logger = logging.getLogger("datasets")
    held = _HeldLog()
    handlers, logger.handlers = logger.handlers, [held]
    try:
        yield
    except DataError:
        raise
    except Exception as err:  # datasets, pyarrow, pandas and fsspec each raise their own types
        raise _read_error(paths, split, files, err, held.records) from None
    finally:
        logger.handlers = handlers
    for record in held.records:
        for handler in handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def _read_error(
    paths: Sequence[str], split: str, files: Sequence[str], err: BaseException, logs: list[logging.LogRecord]
) -> DataError:
    """The :class:`DataError` of ``err``: its first cause with a message (not datasets' wrapper), and the
    file a log record or the error names."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    # datasets wraps the reader's error in DatasetGenerationError ("An error occurred while generating ...")
    named = [e for e in chain if str(e).strip() and type(e).__name__ != "DatasetGenerationError"]
    cause = named[0] if named else err
    reason = f"{_one_line(cause)} ({type(cause).__name__})" if str(cause).strip() else type(cause).__name__
    if isinstance(cause, StopIteration):
        reason = "no record could be read (StopIteration): is a file empty?"
    said = " ".join([*(r.getMessage() for r in logs), *(str(e) for e in chain)])
    named_files = [f for f in files if f in said] or (list(files) if len(files) == 1 else [])
    where = (  # the longest: 'd.json' is in a message that names 'd.jsonl' too
        f"cannot read {max(named_files, key=len)!r}"
        if named_files
        else f"cannot read one of its {len(files)} files"
    )
    return DataError(f"data.paths={list(paths)!r} (data.split={split!r}): {where}: {reason}")


def open_hf_dataset(paths: Sequence[str], split: str, streaming: bool, text_field: str | None = None) -> Any:
    """The ``datasets`` Dataset (or IterableDataset when ``streaming``) of ``data.paths``' split (or slice
    of it). Raises :class:`DataError` naming ``data.paths``/``data.split`` for anything it cannot open.

    CSV cells are text: ``text_field``'s cells are read as the strings they are (pandas read a column of
    numbers such as ``1999`` as integers, and the cells ``NA``, ``nan``, ``null``, ``None`` and an empty
    one, its missing values, as null: each refused as no text); an empty cell is ``""``."""
    kind, files = check_hf_source(paths)
    datasets = import_datasets()
    names = _split_names(datasets, split)
    if kind != "saved" and set(names) != {"train"}:
        raise DataError(
            f"data.split={split!r} is not a split of data.paths={list(paths)!r}: data files form the one "
            "split 'train' (without streaming, slices such as 'train[:90%]' work too)"
        )
    if kind != "saved" and streaming and "[" in split:
        raise DataError(
            f"data.split={split!r} is a slice, which data files read with data.streaming=true cannot "
            "take (a stream has no length); set data.streaming=false, or give the whole split 'train'"
        )
    with _reading(paths, split, files):
        if kind != "saved":
            options = _csv_options(files, text_field) if kind == "csv" else {}
            loaded = datasets.load_dataset(
                kind,
                # datasets reads data_files as glob patterns: the file 'x[1].jsonl' read 'x1.jsonl'
                data_files=[glob.escape(file) for file in files],
                split=split,
                streaming=streaming,
                description=_files_stamp(files),
                **options,
            )
        else:
            loaded = _saved_split(datasets, load_saved(datasets, files[0]), split, files[0])
            # an empty one stays a Dataset: to_iterable_dataset refuses to shard 0 rows
            loaded = loaded.to_iterable_dataset() if streaming and len(loaded) else loaded
    if isinstance(loaded, datasets.Dataset) and len(loaded) == 0:  # e.g. the slice 'train[50%:10%]'
        raise DataError(f"data.paths={list(paths)!r} (data.split={split!r}) holds no document")
    with contextlib.suppress(AttributeError):  # iter_texts names them when reading a stream fails
        loaded._innerloop_source = (list(paths), split, files)
        loaded._innerloop_lines = kind == "text"  # iter_texts drops their byte-order marks
    return loaded


_PANDAS_MISSING = (
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
    "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
)  # fmt: skip
"""The cells pandas reads as missing by default (``read_csv``'s ``na_values``)."""


def _zstd_open(file: str, mode: str, **options: Any) -> Any:
    """``zstandard.open``: a ``.zst`` file, decompressed as read (``zstandard`` is checked by
    :func:`check_hf_source` first)."""
    import zstandard

    return zstandard.open(file, mode, **options)


_DECOMPRESSED: dict[str, Any] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": _zstd_open}
"""The opener of a file under each of :data:`COMPRESSIONS`."""


def _check_zstandard(zst: str) -> None:
    """:class:`DataError` naming ``zst``, a ``.zst`` data file, and saying how to install ``zstandard`` when
    it cannot be imported (``datasets`` reads such files through it, and said only that the format was
    not supported)."""
    try:
        import zstandard  # noqa: F401
    except ImportError as err:
        raise DataError(
            missing_package(f"data.paths file {zst!r} (zstd-compressed)", "zstandard", err)
        ) from None


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_FRAME_CONTENT_SIZE_BYTES = (0, 2, 4, 8)  # by the frame header's two top bits (0: 1 in a single segment)
_DICTIONARY_ID_BYTES = (0, 1, 2, 4)


def _refuse_truncated_zstd(file: Path) -> None:
    """:class:`DataError` naming ``file``, a ``.zst`` file, when it ends inside a zstd frame (a download
    that did not finish): zstd's stream readers, ``datasets``' too, stop at the end of the bytes without a
    word, so its documents up to the cut were read as the whole file (a cut gzip file fails as it is
    read). Walks the frames' and blocks' headers only (3 bytes per block of up to 128 KiB, nothing
    decompressed); a file that is not zstd at all is left to the read, which names it."""
    size = file.stat().st_size
    try:
        with file.open("rb", buffering=0) as handle:  # a few bytes a block: no 8 KiB buffer filled
            at = 0
            while at < size:
                handle.seek(at)
                magic = handle.read(4)
                if magic == _ZSTD_MAGIC:
                    at = _zstd_frame_end(handle, at + 4)
                elif len(magic) == 4 and magic[0] & 0xF0 == 0x50 and magic[1:] == b"\x2a\x4d\x18":
                    at += 8 + int.from_bytes(handle.read(4).ljust(4, b"\xff"), "little")  # a skippable frame
                else:
                    return
    except OSError:
        return  # the read names it
    if at > size:
        raise DataError(
            f"data.paths file {str(file)!r} is cut short: it ends inside a zstd frame ({size:,} bytes of at "
            f"least {at:,}), so only the documents before the cut could be read; download or write it again "
            "(zstd -t checks a file)"
        )


def _zstd_frame_end(handle: Any, at: int) -> int:
    """The offset just past the zstd frame whose header starts at ``at`` (after its magic), from its
    header and its blocks' headers; past the file's end where the file stops inside it."""
    handle.seek(at)
    descriptor = handle.read(1)
    if not descriptor:
        return at + 1
    flags = descriptor[0]
    single_segment = bool(flags & 0x20)
    content_size = _FRAME_CONTENT_SIZE_BYTES[flags >> 6] or int(single_segment)
    at += 1 + (not single_segment) + _DICTIONARY_ID_BYTES[flags & 0x03] + content_size
    while True:
        handle.seek(at)
        header = handle.read(3)
        if len(header) < 3:
            return at + 3
        block = int.from_bytes(header, "little")
        kind, length = (block >> 1) & 0x03, block >> 3
        at += 3 + (1 if kind == 1 else length)  # an RLE block holds one byte, repeated
        if block & 1:  # the last block; then the content checksum where the header says there is one
            return at + (4 if flags & 0x04 else 0)


def _csv_header(file: str) -> list[str] | None:
    """The column names on the first line of the CSV ``file``, decompressed when its suffix says so (None
    when it cannot be read)."""
    opener = _DECOMPRESSED.get(PurePosixPath(file).suffix.lower(), open)
    try:
        with opener(file, "rt", encoding="utf-8-sig", newline="") as handle:
            return next(csv.reader(handle), None)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error, ValueError):  # lzma raises LZMAError (OSError)
        return None


def _csv_options(files: Sequence[str], text_field: str | None) -> dict[str, Any]:
    """The ``csv`` builder's options that read ``text_field``'s cells as their text (see
    :func:`open_hf_dataset`): its cells as strings, none of them missing; the other columns of the first
    file's header keep pandas' missing values (an empty cell in a numeric column past the first chunk
    of rows could not be read as text)."""
    if text_field is None:
        return {}
    options: dict[str, Any] = {"converters": {text_field: str}}
    header = _csv_header(files[0])
    if header is not None and text_field in header:
        options["keep_default_na"] = False
        options["na_values"] = {column: list(_PANDAS_MISSING) for column in header if column != text_field}
    return options


def _files_stamp(files: Sequence[str]) -> str:
    """What changes whenever one of ``files`` is written again, passed to ``load_dataset`` as the
    builder's ``description``, which is part of its Arrow cache's name: ``datasets`` keys the cache of
    local files on their modification times alone, so a file rewritten with its old time kept
    (``cp -p``, ``rsync -t``, ``tar x``, ``touch -r``), even to another size, was read from the cache of
    its old content. :func:`~innerloop.data.atomic.file_stamp` adds the inode, size and change time
    (``st_ctime``, which no program can set back)."""
    stamps = "\n".join(str(file_stamp(file)) for file in files)
    digest = hashlib.sha256(stamps.encode()).hexdigest()[:16]
    return f"innerloop data files {digest}"


def saved_splits(paths: Sequence[str]) -> list[str] | None:
    """The splits a ``save_to_disk`` folder ``paths`` holds (a DatasetDict's, sorted; a Dataset's own one,
    ``train`` when it names none), or None when ``paths`` are data files (which form the split ``train``)."""
    folder = _saved_dataset_folder(paths)
    if folder is None:
        return None
    datasets = import_datasets()
    with _reading(paths, "(its own)", [str(folder)]):
        loaded = load_saved(datasets, str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        return sorted(loaded)
    return [str(loaded.split) if loaded.split is not None else "train"]


def own_split(paths: Sequence[str], option: str = "--split") -> str:
    """The split ``paths`` hold when ``--split`` names none: ``train`` for data files, a saved Dataset's
    own split, a saved DatasetDict's only one (:class:`DataError` when it holds several: one must be
    named with ``option``, how the caller names the split: ``--split``, or ``split`` from Python)."""
    splits = saved_splits(paths)
    if splits is None:
        return "train"
    if len(splits) > 1:
        raise DataError(
            f"the saved DatasetDict holds the splits {splits}: name the one to read with {option}"
        )
    return splits[0]


def _load_saved_split(datasets: Any, folder: Path) -> Any:
    """The Dataset saved in ``folder``; one saved empty has no data file (``save_to_disk`` writes none,
    and ``load_from_disk`` then fails with an IndexError), so it is made empty, of its saved features."""
    state = json.loads((folder / "state.json").read_text())
    if state.get("_data_files"):
        return datasets.load_from_disk(str(folder))
    info = datasets.DatasetInfo.from_directory(str(folder))
    empty = {column: [] for column in info.features}
    return datasets.Dataset.from_dict(empty, features=info.features, info=info, split=state.get("_split"))


def load_saved(datasets: Any, folder: str) -> Any:
    """``datasets.load_from_disk(folder)``, a split at a time: an empty split of a DatasetDict (which
    ``load_from_disk`` cannot read) leaves the others readable, and holds no document itself."""
    path = Path(folder)
    if not (path / "dataset_dict.json").is_file():
        return _load_saved_split(datasets, path)
    names = json.loads((path / "dataset_dict.json").read_text())["splits"]
    return datasets.DatasetDict({name: _load_saved_split(datasets, path / name) for name in names})


def _split_names(datasets: Any, split: str) -> list[str]:
    """The split names ``data.split`` reads (``train`` of ``train[:90%]+train[-5:]``); :class:`DataError`
    unless it is a split name or slices of splits, as ``load_dataset`` reads them."""
    try:
        datasets.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as err:
        raise DataError(
            f"data.split={split!r} is not a split name, or a slice of one such as 'train[:90%]' or "
            f"'train[10:200]': {_one_line(err)}"
        ) from None
    return [part.split("[")[0].strip() for part in split.split("+")]


def _saved_split(datasets: Any, loaded: Any, split: str, folder: str) -> Any:
    """The split (or slice of one, e.g. ``train[:10%]``, ``test[-100:]``) ``split`` of a ``save_to_disk``
    folder: of a DatasetDict, one of its splits; of a Dataset, its own split (``train`` when it names
    none). Slices are cut as ``load_dataset`` cuts them (the same rounding)."""
    if isinstance(loaded, datasets.DatasetDict):
        splits, what = dict(loaded), f"a split of {folder!r}; its splits: {sorted(loaded)}"
    else:
        own = str(loaded.split) if loaded.split is not None else "train"
        splits = {own: loaded}
        what = f"the split of the saved Dataset {folder!r}, which holds the one split {own!r}"
    try:
        pieces = datasets.ReadInstruction.from_spec(split).to_absolute(
            {name: len(data) for name, data in splits.items()}
        )
    except (ValueError, AssertionError):
        raise DataError(f"data.split={split!r} is not {what}") from None
    if len(pieces) == 1 and (pieces[0].from_, pieces[0].to) == (0, len(splits[pieces[0].splitname])):
        return splits[pieces[0].splitname]  # a whole split
    parts = [splits[p.splitname].select(range(p.from_, p.to)) for p in pieces]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _one_line(err: object) -> str:
    return " ".join(str(err).split())


def _check_text(value: Any, text_field: str, index: int) -> str:
    if not isinstance(value, str):
        what = "missing or null (None in the data)" if value is None else f"{a_type(value)} ({value!r:.40})"
        raise DataError(
            f"data.text_field={text_field!r} of document {index} (counted from 0 over data.paths in order) is "
            f'{what}; every document\'s text must be a string ("" for an empty one)'
        )
    return value


def _missing_field(text_field: str, fields: Any) -> DataError:
    return DataError(
        f"data.text_field={text_field!r} is not a field of the dataset; its fields: {sorted(fields)}"
    )


def iter_texts(dataset: Any, text_field: str, first: int = 0) -> Iterator[tuple[int, list[str]]]:
    """``(number of the first, texts)`` of chunks of documents from document ``first`` on, in order.
    Raises :class:`DataError` naming ``data.text_field`` when a document has no text there. The lines of
    text data files (:func:`open_hf_dataset`) are read without a UTF-8 byte-order mark at their start
    (:func:`_without_marks`)."""
    chunks = _texts_of(dataset, text_field, first)
    if getattr(dataset, "_innerloop_lines", False):
        chunks = ((start, _without_marks(texts)) for start, texts in chunks)
    return chunks


def _without_marks(lines: list[str]) -> list[str]:
    """``lines`` without the byte-order mark (U+FEFF) any of them starts with: the mark of a UTF-8 file
    saved with one (Windows Notepad), or of one of several files joined by ``cat``; not text (datasets'
    json and csv readers drop it, its text reader kept it: the encoding it is given is ignored for a
    compressed file). Where U+FEFF is meant as a character, it is a zero-width no-break space, which
    starts no line of text."""
    return [line[1:] if line.startswith(UTF8_BYTE_ORDER_MARK) else line for line in lines]


def _texts_of(dataset: Any, text_field: str, first: int) -> Iterator[tuple[int, list[str]]]:
    """:func:`iter_texts`, each document's text as the dataset holds it."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):  # a Dataset: read by slices
        if text_field not in dataset.column_names:
            raise _missing_field(text_field, dataset.column_names)
        for start in range(first, len(dataset), _READ_CHUNK):
            texts = dataset[start : start + _READ_CHUNK][text_field]
            yield start, [_check_text(t, text_field, start + i) for i, t in enumerate(texts)]
        return
    # an IterableDataset: skip (read past) the first documents, then read on, a chunk at a time
    source = getattr(dataset, "_innerloop_source", None)
    records = iter(dataset.skip(first) if first else dataset)
    index = first
    while True:
        with _reading(*source) if source is not None else contextlib.nullcontext():
            chunk = list(itertools.islice(records, _READ_CHUNK))
        if not chunk:
            return
        for record in chunk:
            if text_field not in record:
                raise _missing_field(text_field, record)
        yield index, [_check_text(r[text_field], text_field, index + i) for i, r in enumerate(chunk)]
        index += len(chunk)
