"""Review s40d: scale and concurrency (a real corpus's memory, files that change while read, builds
racing into one cache)."""

from __future__ import annotations

import _ctypes
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import time
import tracemalloc
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from innerloop.data import text
from innerloop.data.text import DataError, read_bytes, read_tokens
from innerloop.data.tokenizer import Tokenizer, train_bpe
from innerloop.kernels.cpu import build
from innerloop.train import data as train_data
from innerloop.train.data import IndexedBatches, PackedBatches, RankShardOfExamples, TextDataModule

SOME_LIBRARY = Path(_ctypes.__file__)  # a shared library every Python has


class CharTokenizer(Tokenizer):
    """One id per character (code point mod 1000), id 1000 between documents; counts its calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    @property
    def vocab_size(self) -> int:
        return 1001

    @property
    def eos_id(self) -> int | None:
        return 1000

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 1000 for c in text]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        self.calls.append(sum(len(t) for t in texts))
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(map(chr, ids))

    def to_state(self) -> dict[str, Any]:
        return {"kind": "chars"}

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        return []


def _files(folder: Path, sizes: Sequence[int]) -> list[Path]:
    files = []
    for i, size in enumerate(sizes):
        path = folder / f"f{i}.txt"
        path.write_bytes(bytes((i + j) % 26 + 97 for j in range(size)))
        files.append(path)
    return files


def test_read_bytes_holds_the_corpus_once(tmp_path: Path) -> None:
    """The files' bytes were joined from a list of chunks into a bytes object, then copied into a
    bytearray: three copies of the corpus at once (a 200 MB file: +580 MB peak; a 10 GB corpus was
    killed by the system on a 32 GB machine). Now one buffer, sized from the files, read into."""
    files = _files(tmp_path, [1_000_000, 500_000, 0, 700_000])
    total = sum(p.stat().st_size for p in files)
    tracemalloc.start()
    try:
        data = read_bytes(files)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bytes(data.numpy()) == b"".join(p.read_bytes() + b"\0" for p in files)
    assert peak < 1.2 * total, (peak, total)


@pytest.mark.parametrize("change", [-300, 0, 500])
def test_read_bytes_reads_a_file_that_changed_size_as_it_is_now(tmp_path, monkeypatch, change) -> None:
    """A file that grew or shrank between its size being taken and its read (a log being written) is
    read whole as it is then, its separator after it."""
    files = _files(tmp_path, [1000, 2000, 1500])
    sizes = {p: p.stat().st_size for p in files}
    monkeypatch.setattr(text, "_file_size", lambda p, option: sizes[p] - change)
    data = read_bytes(files)
    assert bytes(data.numpy()) == b"".join(p.read_bytes() + b"\0" for p in files)


def test_read_bytes_names_a_file_that_vanished(tmp_path, monkeypatch) -> None:
    files = _files(tmp_path, [10, 10])
    monkeypatch.setattr(text, "_file_size", lambda p, option: 10)
    files[1].unlink()
    with pytest.raises(DataError, match=r"data.paths file '.*f1.txt' cannot be read: No such file"):
        read_bytes(files)


def test_read_tokens_encodes_a_group_of_files_at_a_time(tmp_path, monkeypatch) -> None:
    """All files' texts were decoded and encoded in one call: the tokenizers library holds about 150
    bytes per byte of a call's text (20 MB of 5,000 files: 780 MB peak, 200 MB now), and the ids were
    one Python list of every token. The ids are the same."""
    monkeypatch.setattr(text, "ENCODE_GROUP_BYTES", 3000)
    files = _files(tmp_path, [1000, 1500, 0, 800, 4000, 100, 2900])
    tokenizer = CharTokenizer()
    ids = read_tokens(files, tokenizer)
    expected = [i for p in files for i in (*tokenizer.encode(p.read_text()), 1000)]
    assert ids.dtype == torch.int64 and ids.tolist() == expected
    assert tokenizer.calls == [2500, 800, 4000, 3000]  # whole files, a larger one alone
    assert read_tokens([], tokenizer).dtype == torch.int64


def test_read_tokens_refuses_a_file_too_large_to_encode_here(tmp_path, monkeypatch) -> None:
    """One 200 MB text file with a BPE tokenizer needs about 30 GB in the tokenizers library (50 MB
    took 7.4 GB and 114 s): the process was killed by the system with no word. A file that cannot fit
    even at the library's least need per byte (16 B: its offsets) is refused in one line; one that
    needs more than the memory only at the typical 150 B per byte (104-187 measured) may fit, and is
    warned about, not refused; another tokenizer's needs are not guessed."""
    files = _files(tmp_path, [100, 20_000, 300])
    tokenizer = train_bpe(["some text to merge some pairs of"], 270)
    monkeypatch.setattr(text, "machine_memory_bytes", lambda: 200_000)
    with pytest.raises(DataError) as error:
        read_tokens(files, tokenizer)
    message = str(error.value)
    assert f"data.paths file {str(files[1])!r} (19.5 KiB) is one document" in message
    assert "at least 312.5 KiB, more than the 195.3 KiB here; split it into smaller files" in message
    monkeypatch.setattr(text, "machine_memory_bytes", lambda: None)  # unknown: nothing checked
    expected = read_tokens(files, tokenizer)
    monkeypatch.setattr(text, "machine_memory_bytes", lambda: 2_000_000)  # 16 B/B fits, 150 does not
    with pytest.warns(text.TokenizerMemoryWarning, match=r"about 2\.9 MiB, more than the 1\.9 MiB here"):
        assert torch.equal(read_tokens(files, tokenizer), expected)
    monkeypatch.setattr(text, "machine_memory_bytes", lambda: 1000)
    assert len(read_tokens(files, CharTokenizer())) == 20_403  # not the tokenizers library: unchecked


def test_the_training_digest_hashes_the_tokens_in_place(tmp_path: Path) -> None:
    """The checkpoint's digest of the training text copied it whole (``tobytes``) first."""
    _files(tmp_path, [1_000_000, 1000, 1000, 1000])
    module = TextDataModule([str(tmp_path)], seq_len=8, batch_size=2, val_fraction=0.5)
    module.setup()
    tracemalloc.start()
    try:
        digest = module.training_digest
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert digest == hashlib.sha256(bytes(module.train_bytes.numpy())).hexdigest()
    assert len(module.train_bytes) > 500_000 and peak < 100_000, peak


@pytest.mark.slow  # 0.8 s: two reads through the datasets library (the first warms its caches)
def test_eval_data_records_are_not_one_python_list_of_every_token(tmp_path: Path) -> None:
    """``innerloop eval --data x.jsonl`` of a data.name=hf run gathered every token of the file into
    one Python list (8 bytes a token for its pointer, 36 for a token id past 256) before the tensor."""
    from innerloop.train.data import dataset_tokens

    lines = [json.dumps({"text": "abcdefghij" * 100 + str(i)}) for i in range(1000)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    path = [str(tmp_path / "data.jsonl")]
    dataset_tokens(path, "text")  # the datasets library's own first-use work (its cache, imports)
    tracemalloc.start()
    try:
        tokens = dataset_tokens(path, "text")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tokens.dtype == torch.int64 and len(tokens) == sum(len(json.loads(x)["text"]) + 1 for x in lines)
    assert tokens[:3].tolist() == [97, 98, 99] and tokens[1001].item() == 0
    assert peak < 4 * len(tokens), (peak, len(tokens))


@pytest.mark.skipif(build.fcntl is None, reason="builds wait on an flock lock (POSIX)")
def test_builds_started_together_into_one_cache_compile_once(tmp_path, monkeypatch) -> None:
    """Two processes building the CPU kernels into one fresh cache each compiled (measured: two real
    compiles of 9.8 s side by side, both libraries working, one renamed over the other); ranks of one
    job or test workers compiled N times. The second now waits on the first's build lock and loads its
    library. (Threads stand in for processes: flock locks each open file, not each process.)"""
    compiles: list[Path] = []

    def fake_compile(compiler, flags, target):
        compiles.append(target)
        time.sleep(0.1)
        shutil.copyfile(SOME_LIBRARY, target)
        return subprocess.CompletedProcess([compiler], 0, "", "")

    monkeypatch.setenv("INNERLOOP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "find_compiler", lambda: shutil.which("true"))
    monkeypatch.setattr(build, "_compile", fake_compile)
    with ThreadPoolExecutor(3) as pool:
        targets = list(pool.map(lambda _: build._build(), range(3)))
    assert len(compiles) == 1 and len(set(targets)) == 1
    assert targets[0].read_bytes() == SOME_LIBRARY.read_bytes()
    assert not list(targets[0].parent.glob(".build-*"))


@pytest.mark.skipif(build.fcntl is None, reason="builds wait on an flock lock (POSIX)")
def test_a_build_waiting_on_anothers_says_so_once(tmp_path, monkeypatch, caplog) -> None:
    """A process waiting (up to 15 minutes) on another's build printed nothing: it looked hung."""
    folder = tmp_path / "cpu_kernels"
    folder.mkdir()
    holder = os.open(folder, os.O_RDONLY)
    build.fcntl.flock(holder, build.fcntl.LOCK_EX)
    monkeypatch.setattr(build, "WAIT_NOTICE_SECONDS", 0.05)
    monkeypatch.setattr(build, "BUILD_WAIT_SECONDS", 0.15)
    try:
        with caplog.at_level("WARNING", logger=build.__name__):
            os.close(build._wait_for_other_builds(folder))  # the lock never freed: it goes on after the wait
    finally:
        os.close(holder)
    notices = [r.getMessage() for r in caplog.records]
    assert (
        len(notices) == 1
        and f"waiting for another process's build of the CPU kernels in {folder}" in notices[0]
    )


def _as_worker(monkeypatch, worker: int, workers: int) -> None:
    info = SimpleNamespace(id=worker, num_workers=workers)
    monkeypatch.setattr(train_data, "get_worker_info", lambda: info)


def _round_robin(streams: list[list[Any]]) -> list[Any]:
    """What a DataLoader yields of its workers' streams: one item of each in turn."""
    return [item for turn in zip(*streams, strict=True) for item in turn]


def test_a_dataloaders_workers_read_the_training_stream_once_in_order(monkeypatch) -> None:
    """Under a user's DataLoader with workers, each worker's copy of the stream read every batch: with
    2 workers each training batch came twice (measured with fork). Worker w of W reads batches w, w+W,
    ...: what the DataLoader yields, in turn, is the stream of one process."""
    make = lambda i: (torch.tensor([i]), torch.tensor([-i]))  # noqa: E731
    expected = [b[0].item() for b in itertools.islice(IndexedBatches(make, 5, 1, 2), 12)]
    assert expected == list(range(11, 35, 2))
    for workers in (2, 3):
        streams = []
        for worker in range(workers):
            _as_worker(monkeypatch, worker, workers)
            streams.append(
                [b[0].item() for b in itertools.islice(IndexedBatches(make, 5, 1, 2), 12 // workers)]
            )
        assert _round_robin(streams) == expected, workers


def test_a_dataloaders_workers_read_each_validation_batch_once(monkeypatch) -> None:
    inputs = torch.arange(22).view(11, 2)
    shard = lambda: RankShardOfExamples(inputs, -inputs, batch_size=2, rank=1, world=2)  # noqa: E731
    expected = [b[0].tolist() for b in shard()]
    assert len(expected) == 3
    _as_worker(monkeypatch, 0, 2)
    first = [b[0].tolist() for b in shard()]
    _as_worker(monkeypatch, 1, 2)
    second = [b[0].tolist() for b in shard()]
    assert first + second == [expected[0], expected[2], expected[1]]  # the DataLoader's turns: 0, 1, 0


def test_the_hf_stream_refuses_a_dataloader_worker(monkeypatch) -> None:
    """A worker's copy of HFDataModule's stream recorded its position in the worker: a checkpoint then
    resumed from the wrong documents, silently."""
    _as_worker(monkeypatch, 0, 2)
    batches = PackedBatches(lambda p: iter(()), 2, 0, None, lambda g, p: None)
    with pytest.raises(DataError, match=r"read them with num_workers=0"):
        next(iter(batches))


def test_text_batches_through_forked_workers_equal_those_of_one_process(tmp_path: Path) -> None:
    """End to end: TextDataModule's training stream read by a DataLoader with 2 forked workers."""
    _files(tmp_path, [3000, 3000])
    module = TextDataModule([str(tmp_path)], seq_len=8, batch_size=2, val_fraction=0.5)
    module.setup()
    dataset = module.train_dataloader().dataset
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=60)
    got = [b[0] for b in itertools.islice(loader, 6)]
    assert all(torch.equal(a, b[0]) for a, b in zip(got, itertools.islice(iter(dataset), 6), strict=True))


def test_an_evaluation_reads_the_held_out_files_only(tmp_path, monkeypatch) -> None:
    """``innerloop eval`` of a run's validation (setup("validate")) read and tokenized the training
    files too: 5,000 files with a BPE tokenizer, 3.25 s of its 3.8 s reading text it never scores.
    A later setup("fit") reads the training text, as a fresh setup does."""
    _files(tmp_path, [2000] * 12)
    read: list[list[Path]] = []
    real = train_data.read_tokens
    monkeypatch.setattr(
        train_data, "read_tokens", lambda files, t: read.append(list(files)) or real(files, t)
    )
    module = TextDataModule([str(tmp_path)], seq_len=16, batch_size=2, val_fraction=0.3)
    module.setup("validate")
    assert len(read) == 1 and 0 < len(read[0]) < 12 and module.train_bytes is None
    assert sorted(p.name for p in read[0]) == sorted(Path(k).name for k in module.validation_keys)
    windows = module.make_val_examples()
    module.setup("fit")
    fresh = TextDataModule([str(tmp_path)], seq_len=16, batch_size=2, val_fraction=0.3)
    fresh.setup("fit")
    assert len(read) == 4 and torch.equal(module.train_bytes, fresh.train_bytes)
    assert torch.equal(windows[0], fresh.make_val_examples()[0])
    assert module.state_dict() == fresh.state_dict()


def test_evaluating_a_one_file_run_reads_its_text_and_checkpoint_once(tmp_path, monkeypatch) -> None:
    """``innerloop eval`` of a one-file run's validation read and tokenized the file twice (the check of
    its recorded validation_cut, then the windows: a 3 MB file with BPE, 2 s each) and read and
    verified the whole checkpoint three times (the model, the split check, the cut check: each a full
    read of a file the run may be rewriting). Once each now, the same windows."""
    from innerloop.checkpoints import save_checkpoint
    from innerloop.config import load_config
    from innerloop.train import run as run_module
    from innerloop.train.run import _run_validation_windows

    path = tmp_path / "corpus.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 20)
    module = TextDataModule([str(path)], seq_len=8, batch_size=2, val_fraction=0.25, val_batches=1)
    module.setup("fit")
    checkpoint = tmp_path / "last.safetensors"
    save_checkpoint({"state_dict": {"w": torch.zeros(1)}, "TextDataModule": module.state_dict()}, checkpoint)
    overrides = [f"data.paths=[{path}]", "data.val_fraction=0.25", "data.seq_len=8", "data.batch_size=2"]
    run = load_config("tiny", [*overrides, "data.val_batches=1"])[0]
    reads, loads = [], []
    real_read, real_load = train_data.read_tokens, run_module.load_checkpoint
    monkeypatch.setattr(train_data, "read_tokens", lambda files, t: reads.append(1) or real_read(files, t))
    monkeypatch.setattr(run_module, "load_checkpoint", lambda *a: loads.append(1) or real_load(*a))
    for seq_len, batches, rows in ((8, None, 2), (4, 3, 6)):
        windows = _run_validation_windows(run, checkpoint, seq_len, None, batches)
        expected = train_data.spread_windows(module.val_bytes, seq_len, rows)
        assert torch.equal(windows.inputs, expected[0]) and torch.equal(windows.targets, expected[1])
    assert len(reads) == 2 and not loads  # one read per evaluation; the model's load verified the file
