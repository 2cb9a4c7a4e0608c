"""DataModules: byte-level text from files, and a synthetic associative-recall task.

Both draw their training batches as a pure function of ``(seed, batch index)``. A run resumed from a
checkpoint at global step ``s`` therefore starts at batch ``s * accumulate_grad_batches`` and sees
exactly the batches an uninterrupted run would have seen, with no sampler state to save. Under
multi-process training each rank reads every ``world_size``-th batch (rank and world size come from
the Trainer; there is no distributed code here).

Targets equal to :data:`IGNORE_INDEX` are not scored (the recall task scores only the answers).
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

IGNORE_INDEX = -100
"""Target value that the loss and the metrics skip."""

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs [B, T] int64, targets [B, T] int64)

# Parts of the standard library's tree that are not the standard library's own source: installed
# packages (which differ between machines) and the test suites (large and repetitive).
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})

DOCUMENT_SEPARATOR = 0
"""Byte placed between files (text never contains a NUL byte)."""


class DataError(ValueError):
    """Data that cannot be used as configured (no such file, too little text for ``seq_len``, nothing
    held out for validation); the message names the setting and what to change."""


def stdlib_files() -> list[Path]:
    """The ``.py`` files of this Python's standard library, sorted (the default text corpus)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if not (set(p.relative_to(root).parts[:-1]) & _STDLIB_SKIP)]


def resolve_files(patterns: Sequence[str]) -> list[Path]:
    """Expand files, directories (all files below) and globs (``**`` allowed) into a sorted file list.

    An entry that matches no file raises :class:`DataError` naming it.
    """
    files: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_file():
            matched = [path]
        elif path.is_dir():
            matched = [p for p in path.rglob("*") if p.is_file()]
        else:
            matched = [Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p)]
        if not matched:
            raise DataError(
                f"data.paths entry {pattern!r} matches no file (give files, directories or globs)"
            )
        files.update(p.resolve() for p in matched)
    return sorted(files)


def split_by_file(files: Sequence[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """Deterministic train/validation split: a file is in validation if a hash of its path relative to
    the files' common directory falls below ``val_fraction``. The same files always split the same way.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path()
    train, val = [], []
    for p in files:
        digest = hashlib.sha256(p.relative_to(root).as_posix().encode()).digest()
        (val if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else train).append(p)
    return train, val


def read_bytes(files: Sequence[Path]) -> torch.Tensor:
    """The files' bytes, concatenated with :data:`DOCUMENT_SEPARATOR` between them, as ``uint8 [N]``."""
    chunks = []
    for p in files:
        chunks.append(p.read_bytes())
        chunks.append(bytes([DOCUMENT_SEPARATOR]))
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def split_text_files(files: Sequence[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """The training and validation files of two or more files: :func:`split_by_file`, or, when that
    leaves either side empty (too few files for the fraction), the last file held out."""
    train, val = split_by_file(files, val_fraction)
    if not val or not train:
        train, val = list(files[:-1]), list(files[-1:])
    return train, val


def _single_file_cut(length: int, val_fraction: float) -> int:
    """Where a single file's bytes are split: its last ``val_fraction`` is held out."""
    return int(length * (1 - val_fraction))


def text_split_lengths(files: Sequence[Path], val_fraction: float) -> tuple[int, int]:
    """Bytes of the training and validation text :class:`TextDataModule` makes of ``files``, from the
    files' sizes (nothing is read), separators included."""
    if len(files) == 1:
        length = files[0].stat().st_size + 1
        cut = _single_file_cut(length, val_fraction)
        return cut, length - cut
    train, val = split_text_files(files, val_fraction)
    return sum(p.stat().st_size + 1 for p in train), sum(p.stat().st_size + 1 for p in val)


def check_text_lengths(
    train_len: int, val_len: int, num_files: int, seq_len: int, val_fraction: float
) -> None:
    """Raise :class:`DataError` unless both the training and the validation text hold a window of
    ``seq_len + 1`` bytes; the message says which setting to change."""
    need = seq_len + 1
    if num_files == 1 and val_fraction == 0:
        raise DataError(
            "data.val_fraction=0 holds out no validation text: with a single file its last val_fraction "
            "of bytes is held out; set data.val_fraction > 0 (e.g. 0.1) or give more files in data.paths"
        )
    if train_len < need:
        raise DataError(
            f"the training text has {train_len} bytes, fewer than data.seq_len + 1 = {need}; give more "
            "text (data.paths) or a shorter data.seq_len"
        )
    if val_len < need:
        held_out = f"the last {val_fraction} of the file" if num_files == 1 else "the held-out files"
        raise DataError(
            f"the validation text ({held_out}) has {val_len} bytes, fewer than data.seq_len + 1 = {need}; "
            "give more text, a larger data.val_fraction or a shorter data.seq_len"
        )


def _generator(seed: int, index: int) -> torch.Generator:
    """A torch RNG that depends only on ``(seed, index)``."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


class IndexedBatches(IterableDataset):
    """An endless stream of batches ``make_batch(i)`` for ``i = start*W + rank, (start+1)*W + rank, ...``.

    ``W`` is the world size: rank ``r`` of ``W`` processes reads every ``W``-th batch, so together they
    read the same batches as one process would, ``W`` at a time.
    """

    def __init__(
        self, make_batch: Callable[[int], Batch], start: int = 0, rank: int = 0, world_size: int = 1
    ):
        self.make_batch = make_batch
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self) -> Iterator[Batch]:
        step = self.start
        while True:
            yield self.make_batch(step * self.world_size + self.rank)
            step += 1


class FixedExamples(Dataset):
    """A list of ``(inputs [T], targets [T])`` examples (the validation set)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i: int) -> Batch:
        return self.inputs[i], self.targets[i]


class _IndexedDataModule(L.LightningDataModule):
    """Shared logic: a resumable training stream and a fixed validation set."""

    batch_size: int
    seed: int

    def make_train_batch(self, index: int) -> Batch:
        raise NotImplementedError

    def make_val_examples(self) -> Batch:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        start, rank, world = 0, 0, 1
        if self.trainer is not None:  # resume where the checkpoint left off
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
            rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(IndexedBatches(self.make_train_batch, start, rank, world), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        inputs, targets = self.make_val_examples()
        return DataLoader(FixedExamples(inputs, targets), batch_size=self.batch_size, shuffle=False)


class TextDataModule(_IndexedDataModule):
    """Byte-level language modelling on text files (vocabulary 256).

    Args:
        paths: files, directories or globs; empty means the Python standard library's own source
            (present on every Python install, read from disk, nothing downloaded).
        seq_len: tokens per training window (each window reads ``seq_len + 1`` bytes).
        batch_size: windows per batch (per process).
        val_fraction: share of files held out for validation (split by file, deterministic).
        val_batches: number of validation batches (fixed windows spread over the held-out text).
        seed: seed of the training windows' positions.

    With a single file there is nothing to split by file, so its last ``val_fraction`` of bytes is
    held out instead.
    """

    def __init__(
        self,
        paths: Sequence[str] = (),
        seq_len: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        val_batches: int = 8,
        seed: int = 0,
    ):
        super().__init__()
        if seq_len < 1 or batch_size < 1 or val_batches < 1:
            raise ValueError(
                f"seq_len={seq_len}, batch_size={batch_size} and val_batches={val_batches} must all be >= 1"
            )
        self.paths = list(paths)
        self.seq_len, self.batch_size, self.val_batches, self.seed = seq_len, batch_size, val_batches, seed
        self.val_fraction = val_fraction
        self.train_bytes: torch.Tensor | None = None
        self.val_bytes: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_bytes is not None:
            return
        files = resolve_files(self.paths) if self.paths else stdlib_files()
        if len(files) == 1:
            data = read_bytes(files)
            cut = _single_file_cut(len(data), self.val_fraction)
            self.train_bytes, self.val_bytes = data[:cut], data[cut:]
        else:
            train, val = split_text_files(files, self.val_fraction)
            self.train_bytes, self.val_bytes = read_bytes(train), read_bytes(val)
        check_text_lengths(
            len(self.train_bytes), len(self.val_bytes), len(files), self.seq_len, self.val_fraction
        )

    def make_train_batch(self, index: int) -> Batch:
        assert self.train_bytes is not None, "call setup() first"
        starts = torch.randint(
            0,
            len(self.train_bytes) - self.seq_len,
            (self.batch_size,),
            generator=_generator(self.seed, index),
        )
        windows = torch.stack([self.train_bytes[s : s + self.seq_len + 1] for s in starts.tolist()]).long()
        return windows[:, :-1], windows[:, 1:]  # [B, T] each

    def make_val_examples(self) -> Batch:
        assert self.val_bytes is not None, "call setup() first"
        return spread_windows(self.val_bytes, self.seq_len, self.val_batches * self.batch_size)


def spread_windows(data: torch.Tensor, seq_len: int, count: int) -> Batch:
    """Up to ``count`` windows of ``data`` spread evenly over it: ``(inputs [N, T], targets [N, T])``."""
    if len(data) < seq_len + 1:
        raise DataError(
            f"the text has {len(data)} bytes, fewer than seq_len + 1 = {seq_len + 1}; give more text or a "
            "shorter seq_len"
        )
    starts = torch.linspace(0, len(data) - seq_len - 1, count).long().unique()
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def evaluation_examples(paths: Sequence[str], seq_len: int, count: int, val_fraction: float = 0.1) -> Batch:
    """Windows to evaluate on: all of the given files, or with no paths the validation split of the
    default corpus (the same files :class:`TextDataModule` holds out)."""
    if paths:
        return spread_windows(read_bytes(resolve_files(paths)), seq_len, count)
    module = TextDataModule(seq_len=seq_len, batch_size=count, val_fraction=val_fraction, val_batches=1)
    module.setup()
    return module.make_val_examples()


# Token ranges of the recall task (inside the byte vocabulary of 256).
RECALL_KEYS = range(16, 80)  # 64 keys
RECALL_DISTRACTORS = range(80, 128)  # 48 distractor tokens
RECALL_VALUES = range(128, 192)  # 64 values


def recall_example(num_pairs: int, gap: int, generator: torch.Generator) -> Batch:
    """One multi-query associative recall example: ``(inputs [T], targets [T])``, ``T = 4*num_pairs + gap``.

    The sequence is ``k1 v1 ... kn vn``, then ``gap`` random distractor tokens, then every key once more
    in a random order, each followed by its value. Only the values after the repeated keys are scored:
    the model must recall the value of a key it saw at least ``gap`` tokens earlier.
    """
    keys = torch.randperm(len(RECALL_KEYS), generator=generator)[:num_pairs] + RECALL_KEYS.start
    values = torch.randint(len(RECALL_VALUES), (num_pairs,), generator=generator) + RECALL_VALUES.start
    distractors = (
        torch.randint(len(RECALL_DISTRACTORS), (gap,), generator=generator) + RECALL_DISTRACTORS.start
    )
    order = torch.randperm(num_pairs, generator=generator)
    pairs = torch.stack((keys, values), dim=1).flatten()  # k1 v1 k2 v2 ...
    queries = torch.stack((keys[order], values[order]), dim=1).flatten()
    sequence = torch.cat((pairs, distractors, queries))  # [T + 1]
    inputs, targets = sequence[:-1], sequence[1:].clone()
    scored = torch.zeros_like(targets, dtype=torch.bool)
    first_query = 2 * num_pairs + gap  # index of the first repeated key in `sequence`
    scored[first_query::2] = True  # target at a repeated key is its value
    targets[~scored] = IGNORE_INDEX
    return inputs, targets


class RecallDataModule(_IndexedDataModule):
    """Synthetic multi-query associative recall over long distractors (see :func:`recall_example`).

    Args:
        num_pairs: key-value pairs per sequence (at most 64).
        gap: distractor tokens between the pairs and the queries.
        batch_size: sequences per batch (per process).
        val_batches: number of validation batches (a fixed set of sequences).
        seed: seed of the sequences (validation uses a different stream).
    """

    def __init__(
        self, num_pairs: int = 8, gap: int = 64, batch_size: int = 16, val_batches: int = 8, seed: int = 0
    ):
        super().__init__()
        if not 1 <= num_pairs <= len(RECALL_KEYS):
            raise ValueError(f"num_pairs={num_pairs} must be in [1, {len(RECALL_KEYS)}]")
        if gap < 0:
            raise ValueError(f"gap={gap} must be >= 0")
        if batch_size < 1 or val_batches < 1:
            raise ValueError(f"batch_size={batch_size} and val_batches={val_batches} must be >= 1")
        self.num_pairs, self.gap = num_pairs, gap
        self.batch_size, self.val_batches, self.seed = batch_size, val_batches, seed

    @property
    def seq_len(self) -> int:
        """Tokens per example (inputs): ``4 * num_pairs + gap - 1``."""
        return 4 * self.num_pairs + self.gap - 1

    def _examples(self, count: int, generator: torch.Generator) -> Batch:
        examples = [recall_example(self.num_pairs, self.gap, generator) for _ in range(count)]
        return torch.stack([e[0] for e in examples]), torch.stack([e[1] for e in examples])

    def make_train_batch(self, index: int) -> Batch:
        return self._examples(self.batch_size, _generator(self.seed, index))

    def make_val_examples(self) -> Batch:
        return self._examples(self.val_batches * self.batch_size, _generator(self.seed, -1))
