"""Review s44e: the last look at session 44's changes, false refusals first.

Covers: a text run's refusal of compressed files (``refuse_compressed``) reading the file's first bytes,
so that a text file under a compression suffix (``notes.gz`` written by hand) is read, not refused, while a
real gzip/bz2/xz file (any case of its suffix) still is.
"""

from __future__ import annotations

import bz2
import gzip
import lzma

import pytest

from innerloop.data.text import DataError, read_tokens


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
