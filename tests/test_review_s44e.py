"""Review s44e: the last look at session 44's changes, false refusals first.

Covers: a text run's refusal of compressed files (``refuse_compressed``) reading the file's first bytes,
so that a text file under a compression suffix (``notes.gz`` written by hand) is read, not refused, while a
real gzip/bz2/xz file (any case of its suffix) still is; and ``copied_files`` reading a training file whole
only where a held-out file of its size begins as it does (a corpus of equal-sized shards was read a second
time, whole, at every training set-up); a refused ``InnerloopConfig.update`` / ``update_from_string``
leaving every attribute as it was. Elsewhere: tests/test_review_s44c.py (resume_command with a backslash
before ``${``), tests/interop/test_ttt_e2e.py (an official inner-lr warm-up longer than the run; s46a replaced that
test: the official evaluation of a checkpoint runs at the full inner lr, so a converted model does too).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path

import pytest

import innerloop.data.text as text
from innerloop.data.text import DataError, copied_files, read_tokens


def test_a_text_file_under_a_compression_suffix_is_read_and_a_compressed_one_refused(tmp_path) -> None:
    """``refuse_compressed`` went by the name alone: a plain text file named ``x.gz`` or ``notes.GZ`` was
    refused as compressed, though read as it is it is the text; the file's first bytes decide now."""
    plain = b"plain text under an odd name\n" * 4
    for name in ("x.gz", "notes.GZ", "log.bz2", "a.xz"):
        (tmp_path / name).write_bytes(plain)
        assert bytes(read_tokens([tmp_path / name], None).tolist()).startswith(plain)
    for name, compress in (("NOTES.TXT.GZ", gzip.compress), ("b.bz2", bz2.compress), ("c.xz", lzma.compress)):
        (tmp_path / name).write_bytes(compress(plain))
        with pytest.raises(DataError, match=rf"data.paths file '.*{name}' is compressed"):
            read_tokens([tmp_path / name], None)


def test_equal_sized_training_shards_are_not_read_whole_to_find_copies(tmp_path, monkeypatch) -> None:
    """A corpus cut into equal-sized shards (``split -b``) had every training shard share a held-out
    shard's size, and ``copied_files`` hashed each whole: the corpus read a second time at set-up. Now only
    a shard whose first MiB matches a held-out one's is read whole; the copy is still found."""
    size = 2**20 + 100
    shards = [tmp_path / f"shard{i}" for i in range(4)]
    for i, shard in enumerate(shards):
        shard.write_bytes(bytes([65 + i]) * size)
    copy = tmp_path / "held_copy"
    copy.write_bytes(shards[0].read_bytes())
    whole: list[Path] = []
    digest = text._file_digest

    def spy(path: Path, *blocks: int | None) -> bytes:  # before the fix, _file_digest(path) only
        if blocks in ((), (None,)):
            whole.append(path)
        return digest(path, *blocks)

    monkeypatch.setattr(text, "_file_digest", spy)
    assert copied_files([shards[3], copy], shards[:3]) == [(copy, shards[0])]
    assert sorted(whole) == sorted([shards[0], copy])  # not shards 1, 2 (training) nor 3 (held out)


@pytest.mark.parametrize("how", ["update", "update_from_string"])
def test_a_refused_config_update_leaves_every_attribute_as_it_was(how) -> None:
    """``InnerloopConfig.update`` (and ``update_from_string``) refused ``hidden_size=30`` with 4 heads
    but had set ``use_cache`` before it: the error left half the update in place."""
    from innerloop.hf.configuration import InnerloopConfig

    config = InnerloopConfig()
    before = config.to_dict()
    with pytest.raises(ValueError, match="hidden_size=30"):
        if how == "update":
            config.update({"use_cache": False, "pad_token_id": 3, "hidden_size": 30})
        else:
            config.update_from_string("use_cache=false,hidden_size=30")
    assert config.to_dict() == before
    config.update({"use_cache": False, "hidden_size": 48, "num_attention_heads": 3})  # valid: all set
    assert (config.use_cache, config.model["hidden_size"], config.model["num_heads"]) == (False, 48, 3)


def test_a_file_is_refused_by_how_it_begins_for_every_packed_format_whatever_its_name(tmp_path) -> None:
    """The refusal knew .gz, .bz2 and .xz by their suffixes: a zstd file (``.jsonl.zst``, as The Pile
    ships), a zip or 7z archive, an lz4 file, or a gzip file saved as ``notes.txt``, were trained on as
    their compressed bytes without a word. Each is named by its format now; plain text under any of
    those names is read (``compression_of`` is the check)."""
    import zipfile

    import zstandard

    plain = b"plain text under an odd name\n" * 4
    archive = tmp_path / "packed.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("inner.txt", plain)
    packed = {
        "notes.txt": (gzip.compress(plain), ".gz"),
        "corpus.jsonl.zst": (zstandard.ZstdCompressor().compress(plain), ".zst"),
        "empty.bz2": (bz2.compress(b""), ".bz2"),
        "docs.ZIP": (archive.read_bytes(), ".zip"),
        "x.7z": (b"7z\xbc\xaf\x27\x1c\x00\x04" + plain, ".7z"),
        "y.lz4": (b"\x04\x22\x4d\x18" + plain, ".lz4"),
    }
    for name, (data, kind) in packed.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=rf"data.paths file '.*{name}' is compressed \({kind}\)"):
            read_tokens([tmp_path / name], None)
        (tmp_path / name).write_bytes(plain)
        assert bytes(read_tokens([tmp_path / name], None).tolist()).startswith(plain)
    assert text.compression_of(b"BZhang was here") is None  # bz2's three letters alone are text
