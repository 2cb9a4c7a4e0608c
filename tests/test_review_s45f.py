"""Review s45f: the last look at session 45's changes to data, training and the tools, false refusals
first.

Covers: a byte-level corpus of binary files is not refused as gzip by two bytes that one in 65,536
random files begins with (``COMPRESSION_MAGIC['.gz']`` is gzip's whole beginning now: the magic,
deflate and flags without a reserved bit); several validation loaders of which one is empty:
``[empty, b]`` failed ('LossByPosition has seen no data yet') and ``[a, empty]`` logged loader 0 under
the one-loader name ``val_loss`` (a single loader keeps ``val_loss``); a ``.zst`` file cut short (a
download that did not finish), which ``data.name=hf`` read as the documents before the cut without a
word, is refused by its frames' headers; the refusal of an archive found in a data folder (a ``.jar``)
says it may be left out, not only extracted; ``train(run, callbacks=None)``, as Lightning's Trainer
takes it.

Checked and found right (no test here): empty, 3-byte, ``PK``/``BZh``-text and growing files read as
bytes; the packed check's cost on 20,000 small files (0.3 s at the config check, ~0 at the read);
``.jsonl.zst``/``.csv.zst`` read streaming and not, and a streaming resume's skip equal to the rest of an
uninterrupted read; a plain file named ``.zst`` named by the read; accumulation's promotion hook (a NaN
is raised in ``training_step``, before it); compare's cells and CSV read by their parsers; check_kernel's
allowance (at most 1.9e-7; a kernel computing in float32 still fails on the component that sets it).
"""

from __future__ import annotations

import gzip

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from innerloop.data.text import DataError, compression_of, read_tokens, refuse_compressed
from innerloop.models import ModelConfig
from innerloop.train import LanguageModelModule


def test_a_binary_file_beginning_with_gzip_s_two_magic_bytes_is_read_as_bytes(tmp_path) -> None:
    """The gzip check was the two bytes 1f 8b: a byte-level corpus of 20,000 random files held one that
    begins so about one time in four, and the whole run was refused as 'is compressed (.gz)'. A gzip file
    also says deflate (08) and no reserved flag bit; a real one, named anything, is still refused."""
    binary = tmp_path / "sample.bin"
    binary.write_bytes(b"\x1f\x8b\xa7\x93" + bytes(range(256)))
    refuse_compressed([binary])
    assert read_tokens([binary], None)[:3].tolist() == [0x1F, 0x8B, 0xA7]
    assert compression_of(b"\x1f\x8b\x08\xe0") is None  # reserved flag bits: not a gzip file
    packed = tmp_path / "notes.txt"
    packed.write_bytes(gzip.compress(b"text\n" * 10))
    with pytest.raises(DataError, match=r"is compressed \(\.gz\)"):
        read_tokens([packed], None)
    assert compression_of(gzip.compress(b"")) == ".gz"


def _windows(seed: int, count: int) -> DataLoader:
    """``count`` (inputs, targets) batches of 2 windows of 8 random bytes."""
    ids = torch.randint(0, 256, (count, 2, 9), generator=torch.Generator().manual_seed(seed))
    return DataLoader([(ids[i, :, :-1], ids[i, :, 1:]) for i in range(count)], batch_size=None)


@pytest.mark.slow  # two trainer.validate calls: ~0.4 s on this loaded machine
@pytest.mark.filterwarnings("ignore:Total length of `DataLoader` across ranks is zero")
def test_several_validation_loaders_with_an_empty_one_are_each_named_by_their_index() -> None:
    """trainer.validate(module, dataloaders=[empty, b]) failed with 'LossByPosition has seen no data
    yet' (the empty loader 0 was scored when loader 1 began), and [a, empty] logged loader 0's numbers
    as 'val_loss', the one-loader name, where Lightning names them val_loss/dataloader_idx_0."""
    torch.manual_seed(0)
    config = ModelConfig(
        hidden_size=8, num_heads=1, num_layers=1, intermediate_size=16, ttt={"mini_batch_size": 4}
    )
    module = LanguageModelModule(config, num_position_buckets=1, diagnostics_batches=0).eval()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    empty, a = DataLoader([], batch_size=None), _windows(1, 1)
    first = trainer.validate(module, dataloaders=[a, empty], verbose=False)[0]
    assert "val_loss/dataloader_idx_0" in first and "val_loss" not in first
    second = trainer.validate(module, dataloaders=[empty, a], verbose=False)  # one dict per loader
    assert second[1]["val_loss/dataloader_idx_1"] == first["val_loss/dataloader_idx_0"]
    assert not any("dataloader_idx_0" in name for result in second for name in result)


def test_a_zstd_file_cut_short_is_refused_and_a_whole_one_of_several_frames_read(tmp_path) -> None:
    """data.name=hf read a .txt.zst or .jsonl.zst cut short (a download that did not finish) as the
    documents before the cut, without a word: zstd's stream readers stop at the end of the bytes (a cut
    gzip file fails as it is read). Found with 8.5 MB of text cut at 2/3: 132,827 of 200,000 lines read.
    A whole file of several frames, a skippable one among them, with or without checksums, is read."""
    zstandard = pytest.importorskip("zstandard", reason="data.name=hf reads .zst through zstandard")
    from innerloop.data.hf import check_hf_source

    lines = b"".join(b"line %d of the text\n" % i for i in range(3000))
    whole = (
        zstandard.ZstdCompressor().compress(lines[:20000])
        + b"\x50\x2a\x4d\x18\x04\x00\x00\x00skip"
        + zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(lines[20000:])
    )
    (tmp_path / "whole.txt.zst").write_bytes(whole)
    assert check_hf_source([str(tmp_path / "whole.txt.zst")])[0] == "text"
    for cut in (len(whole) - 1, len(whole) // 2, 20):
        (tmp_path / "cut.txt.zst").write_bytes(whole[:cut])
        with pytest.raises(DataError, match=r"cut\.txt\.zst' is cut short: it ends inside a zstd frame"):
            check_hf_source([str(tmp_path / "cut.txt.zst")])


def test_an_archive_found_in_a_data_folder_may_be_left_out(tmp_path) -> None:
    """A code folder given as data.paths with one ``gradle-wrapper.jar`` (a zip, as .docx and .whl are)
    was refused saying only 'extract it', which a jar among text files is not for."""
    import zipfile

    (tmp_path / "Main.java").write_text("class Main {}\n")
    with zipfile.ZipFile(tmp_path / "gradle-wrapper.jar", "w") as handle:
        handle.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
    with pytest.raises(DataError, match=r"is compressed \(\.zip\).*; or leave it out of data.paths \(a glob"):
        refuse_compressed(sorted(tmp_path.iterdir()))


def test_train_takes_callbacks_none_as_lightning_does() -> None:
    """lightning.Trainer(callbacks=None) is no extra callback; train(run, callbacks=None), as a wrapper
    passing its own default on writes it, was refused as 'callbacks must be a Lightning Callback'."""
    from innerloop.train.run import _checked_callbacks

    assert _checked_callbacks(None) == []
    with pytest.raises(TypeError, match=r"^callbacks must be a Lightning Callback or a list of them"):
        _checked_callbacks([None])


def test_check_kernel_reports_the_kernels_mismatch_when_its_float32_run_cannot_be_made() -> None:
    """s45f's LOW: the allowance's float32 run of the torch path ran inside the handler of the kernel's
    mismatch, so an error of that run (a plugin's float64 constant that ``.float()`` leaves) replaced the
    mismatch in the report. Such a run gives no allowance now (0.0), and the mismatch is raised."""
    from types import SimpleNamespace

    from innerloop.testing.kernel_checks import _Checker

    def cannot_run(*args):
        raise RuntimeError("expected both operands to have the same dtype")

    checker = SimpleNamespace(_measured_float32_error=cannot_run)
    assert _Checker._float32_error(checker, None, None, None, (), {}) == 0.0


def test_a_binary_file_that_begins_as_a_utf16_mark_does_is_not_warned_about(tmp_path, caplog) -> None:
    """s45f's LOW: one binary file in 65,536 begins with ``ff fe`` and was warned about as UTF-16 text full
    of NUL bytes; the warning needs a NUL in its first bytes now, as such text has (UTF-16 of ASCII)."""
    import logging

    from innerloop.data.text import read_bytes

    binary, wide = tmp_path / "blob.bin", tmp_path / "wide.txt"
    binary.write_bytes(b"\xff\xfe" + bytes(range(1, 200)))  # the mark, then no NUL
    wide.write_bytes("wide".encode("utf-16"))
    with caplog.at_level(logging.WARNING, logger="innerloop.data.text"):
        read_bytes([binary])
        assert caplog.records == []
        read_bytes([wide])
    assert [r.getMessage().split(" is ")[1] for r in caplog.records] == [
        "UTF-16 text (it starts with a UTF-16 byte-order mark), read as its bytes: the NUL byte of each ASCII character in it"
    ]
