"""DataModules: byte-level text from files, and a synthetic associative-recall task.

Both draw their training batches as a pure function of ``(seed, batch index)``. A run resumed from a
checkpoint at global step ``s`` therefore starts at batch ``s * accumulate_grad_batches`` and sees
exactly the batches an uninterrupted run would have seen, with no sampler state to save. Under
multi-process training each rank reads every ``world_size``-th batch (rank and world size come from
the Trainer; there is no distributed code here).

Targets equal to :data:`IGNORE_INDEX` are not scored (the recall task scores only the answers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from innerloop.data.recall import (
    IGNORE_INDEX,
    RECALL_DISTRACTORS,
    RECALL_KEYS,
    RECALL_VALUES,
    Batch,
    recall_example,
)
from innerloop.data.text import (
    DOCUMENT_SEPARATOR,
    DataError,
    _single_file_cut,
    check_text_lengths,
    read_bytes,
    resolve_files,
    split_by_file,
    split_text_files,
    stdlib_files,
    text_split_lengths,
)

# Re-exported: the DataModules below are built on them, and this module is where a run's data is read.
__all__ = [
    "DOCUMENT_SEPARATOR",
    "IGNORE_INDEX",
    "RECALL_DISTRACTORS",
    "RECALL_KEYS",
    "RECALL_VALUES",
    "Batch",
    "DataError",
    "FixedExamples",
    "IndexedBatches",
    "RecallDataModule",
    "TextDataModule",
    "check_text_lengths",
    "evaluation_examples",
    "read_bytes",
    "recall_example",
    "resolve_files",
    "spread_windows",
    "split_by_file",
    "split_text_files",
    "stdlib_files",
    "text_split_lengths",
]


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
