"""DataModules: text from files, a local Hugging Face dataset, and a synthetic associative-recall task.

The text and recall modules draw their training batches as a pure function of ``(seed, batch index)``.
A run resumed from a checkpoint at global step ``s`` therefore starts at batch
``s * accumulate_grad_batches`` and sees exactly the batches an uninterrupted run would have seen,
with no sampler state to save. (Under a Trainer's epochs of ``n`` batches, ``limit_train_batches``,
every epoch reads batches ``0 .. n-1`` again, and a resume starts at the step reached in its epoch.) The Hugging Face module reads its documents in order, packed into
windows (:mod:`innerloop.data.packing`); its checkpoint state is the stream position of the next batch.
Under multi-process training each rank reads every ``world_size``-th batch, and every ``world_size``-th
validation example, padded with unscored rows so that each example is scored once (rank and world size
come from the Trainer; there is no distributed code here).

Targets equal to :data:`IGNORE_INDEX` are not scored (the recall task scores only the answers).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from innerloop.config.load import argument_name, built_from_a_config, given_argument, given_flag, setting_name
from innerloop.core.functional import as_integer
from innerloop.core.wording import counted
from innerloop.data.hf import files_record, iter_texts, open_hf_dataset, own_split, source_files
from innerloop.data.packing import (
    START,
    DocumentReader,
    StreamPosition,
    document_side,
    packed_windows,
    validation_windows,
)
from innerloop.data.recall import (
    IGNORE_INDEX,
    RECALL_DISTRACTORS,
    RECALL_GAP_BOUNDS,
    RECALL_KEYS,
    RECALL_PAIRS_BOUNDS,
    RECALL_VALUES,
    Batch,
    recall_example,
    recall_length,
)
from innerloop.data.text import (
    DOCUMENT_SEPARATOR,
    DataError,
    TextTooShortError,
    _single_file_cut,
    check_files_left,
    check_test_length,
    check_text_lengths,
    copied_files,
    fallback_held_out,
    path_entries,
    read_bytes,
    read_tokens,
    resolve_files,
    single_file_test_cut,
    split_by_file,
    split_keys,
    split_test_files,
    split_text_files,
    stdlib_files,
    text_split_lengths,
    warn_copied_files,
)
from innerloop.data.tokenizer import ByteTokenizer, Tokenizer
from innerloop.models.config import (
    AT_LEAST_1,
    BATCH_SIZE_BOUNDS,
    FRACTION,
    SEED_BOUNDS,
    SEQ_LEN_BOUNDS,
    WINDOW_SIZE_BOUNDS,
    checked_number,
)

log = logging.getLogger(__name__)

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
    "RankShardOfExamples",
    "HFDataModule",
    "IndexedBatches",
    "RecallDataModule",
    "TextDataModule",
    "check_split_kind_unchanged",
    "check_split_unchanged",
    "check_text_lengths",
    "checked_window_sizes",
    "dataset_tokens",
    "evaluation_examples",
    "read_bytes",
    "read_tokens",
    "recall_example",
    "resolve_files",
    "spread_windows",
    "split_by_file",
    "split_keys",
    "split_text_files",
    "copied_files",
    "warn_copied_files",
    "validation_file_keys",
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
        self,
        make_batch: Callable[[int], Batch],
        start: int | Callable[[], int] = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.make_batch = make_batch
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self) -> Iterator[Batch]:
        # a callable start is asked at each iteration: Lightning iterates again at each epoch
        step = self.start() if callable(self.start) else self.start
        worker, workers = _worker_share()  # a DataLoader's workers take turns, in its order
        step += worker
        while True:
            yield self.make_batch(step * self.world_size + self.rank)
            step += workers


def _worker_share() -> tuple[int, int]:
    """``(this worker's number, the number of workers)`` of the DataLoader reading a dataset here,
    ``(0, 1)`` in the main process. A DataLoader with workers gives each a copy of an iterable dataset
    and yields their items in turn (worker 0's first, worker 1's first, ...): worker ``w`` of ``W``
    reading items ``w, w + W, ...`` of the stream keeps the batches and their order those of one
    process, where every worker reading the whole stream repeated each batch ``W`` times."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class FixedExamples(Dataset):
    """A list of ``(inputs [T], targets [T])`` examples (the validation set)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i: int) -> Batch:
        return self.inputs[i], self.targets[i]


class RankShardOfExamples(IterableDataset):
    """Rank ``rank``'s batches of the validation examples under ``world`` processes: every ``world``-th
    example from the ``rank``-th, padded with unscored rows (targets all :data:`IGNORE_INDEX`) to the
    longest shard's length, so that every example is scored exactly once across the ranks and every rank
    runs the same number of batches (the validation step waits on every rank at each batch).

    An iterable dataset, so that Lightning leaves it alone: its ``DistributedSampler`` would instead pad
    the examples by repeating the first ones, which the summed metrics would then score twice.
    """

    def __init__(
        self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, rank: int, world: int
    ) -> None:
        rows_per_rank = -(-inputs.shape[0] // world)  # ceil
        inputs, targets = inputs[rank::world], targets[rank::world]
        missing = rows_per_rank - inputs.shape[0]
        if missing:
            inputs = torch.cat([inputs, inputs.new_zeros(missing, inputs.shape[1])])
            targets = torch.cat([targets, targets.new_full((missing, targets.shape[1]), IGNORE_INDEX)])
        self.inputs, self.targets, self.batch_size = inputs, targets, batch_size

    def __len__(self) -> int:
        return -(-self.inputs.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker_share()  # each batch once under a DataLoader's workers too
        for start in range(worker * self.batch_size, self.inputs.shape[0], workers * self.batch_size):
            yield self.inputs[start : start + self.batch_size], self.targets[start : start + self.batch_size]


def validation_loader(
    inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, trainer: L.Trainer | None
) -> DataLoader:
    """The validation batches of ``(inputs, targets)`` (a row each) on this process: all of them on one
    process, this rank's :class:`RankShardOfExamples` under several."""
    world = 1 if trainer is None else trainer.world_size
    if world == 1:
        return DataLoader(FixedExamples(inputs, targets), batch_size=batch_size, shuffle=False)
    shard = RankShardOfExamples(inputs, targets, batch_size, trainer.global_rank, world)
    return DataLoader(shard, batch_size=None)


def _epoch_position(trainer: L.Trainer) -> int:
    """The batch of the stream at which the training iterator starts when Lightning (re)starts it.

    The stream is endless, one epoch: batch ``global_step * accumulate_grad_batches`` (a resume continues
    where its checkpoint's step left off). Under epochs of ``n`` batches (a Trainer's
    ``limit_train_batches``, ``overfit_batches``) Lightning starts the iterator again at each epoch, and
    every epoch reads batches ``0 .. n-1``: a resume continues at the batch reached within its epoch, the
    count of the epoch's batches Lightning restored (a checkpoint inside an accumulation records its step
    boundary, ``LanguageModelModule.on_save_checkpoint``); an accumulation schedule's epochs, of other step
    counts, start at batch 0 too."""
    if not math.isfinite(trainer.num_training_batches):
        return trainer.global_step * trainer.accumulate_grad_batches
    # the batches the epoch processed: 0 at its start, the restored count on a resume
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


class _IndexedDataModule(L.LightningDataModule):
    """Shared logic: a resumable training stream and a fixed validation set."""

    batch_size: int
    seed: int

    def make_train_batch(self, index: int) -> Batch:
        """Training batch number ``index``: ``(inputs, targets)``, each ``[batch_size, seq_len]``, a pure
        function of ``(seed, index)`` (what makes a resume exact)."""
        raise NotImplementedError

    def make_val_examples(self) -> Batch:
        """Every validation example, ``(inputs, targets)`` with one row each, the same on every call."""
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        start: int | Callable[[], int] = 0
        rank, world = 0, 1
        if self.trainer is not None:  # resume where the checkpoint left off
            trainer = self.trainer
            start = lambda: _epoch_position(trainer)  # noqa: E731
            rank, world = trainer.global_rank, trainer.world_size
        return DataLoader(IndexedBatches(self.make_train_batch, start, rank, world), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        inputs, targets = self.make_val_examples()
        return validation_loader(inputs, targets, self.batch_size, self.trainer)


_SIZE_BOUNDS = {  # those of data.seq_len, ...; val_batches: eval's --batches'
    "seq_len": SEQ_LEN_BOUNDS,
    "batch_size": BATCH_SIZE_BOUNDS,
    "val_batches": WINDOW_SIZE_BOUNDS["batches"],
}


def _checked_sizes(**sizes: int) -> list[int]:
    """Each of ``sizes`` as a plain int >= 1, at most what ``data.<name>`` takes in a config
    (``ValueError`` naming the first that is not)."""
    return [
        int(checked_number(name, value, int, _SIZE_BOUNDS.get(name, AT_LEAST_1)))
        for name, value in sizes.items()
    ]


def checked_window_sizes(**sizes: Any) -> list[int | None]:
    """``sizes`` (``seq_len``, ``batch_size``, ``batches``; None: the default) as ints, each in its
    :data:`WINDOW_SIZE_BOUNDS`; else a ``ValueError`` naming it (10**30 windows crashed deep in a data
    module or in ``itertools.islice``)."""
    ints: list[int | None] = []
    for name, value in sizes.items():
        bounds, number = WINDOW_SIZE_BOUNDS[name], None if value is None else as_integer(value)
        if value is not None and number is None:  # a numpy or 0-d torch integer is one; a bool is not
            raise ValueError(
                f"{given_argument(name, value)} must be an integer {bounds.describe()} (or None for the default)"
            )
        if number is not None and number not in bounds:  # the whole range, below it as above it
            raise ValueError(
                f"{given_argument(name, number, quoted=False)} must be {bounds.describe()} ({bounds.why})"
            )
        ints.append(number)
    given = dict(zip(sizes, ints, strict=True))
    batch_size, batches = given.get("batch_size"), given.get("batches")
    windows = WINDOW_SIZE_BOUNDS["batches"]
    if batch_size is not None and batches is not None and batch_size * batches not in windows:
        raise DataError(
            f"{given_argument('batches', batches, quoted=False)} x "
            f"{given_argument('batch_size', batch_size, quoted=False)} = {batch_size * batches} "
            f"windows to score must be {windows.describe()} ({windows.why})"
        )
    return ints


def _checked_kind(name: str, value: Any, kind: type, what: str) -> Any:
    """``value``, or ``TypeError`` naming the argument ``name``, the value and what is valid."""
    if not isinstance(value, kind):
        raise TypeError(f"{name}={value!r} ({type(value).__name__}) must be {what}")
    return value


def _checked_tokenizer(tokenizer: Tokenizer | None) -> Tokenizer:
    """``tokenizer``, or a :class:`ByteTokenizer` for None (``TypeError`` for anything else, e.g. a name)."""
    what = "a Tokenizer (innerloop.data.tokenizer.load_tokenizer reads a name or path) or None (bytes)"
    return ByteTokenizer() if tokenizer is None else _checked_kind("tokenizer", tokenizer, Tokenizer, what)


def check_split_unchanged(
    recorded: Sequence[str], current: Sequence[str], doing: str, held_out: str = "validation"
) -> None:
    """Raise :class:`DataError` when the validation files of a split by file (their split keys) are
    not those a checkpoint ``recorded``: with a few files the split may hold out the last file in sorted
    order (:func:`~innerloop.data.text.split_text_files`), so a file added since can move the one the run
    validated on into its training text. ``doing``: what would go wrong, for the message. ``held_out``:
    ``"test"`` for the test files (``data.test_fraction``), which the messages then name."""
    before, now = set(recorded), set(current)
    if before == now:
        return
    used = "validated on" if held_out == "validation" else "held out for test"
    changes = [
        f"{what} {sorted(names)}"
        for what, names in (
            (f"{used} before, now not (in training, or gone):", before - now),
            (f"{used} now, not before:", now - before),
        )
        if names
    ]
    raise DataError(
        "the files of data.paths split otherwise than when the checkpoint was written (files were added, "
        f"removed or renamed): {'; '.join(changes)}. {doing} would use text the run trained on as {held_out} "
        "text, or the reverse: put data.paths back as they were"
    )


def check_split_kind_unchanged(recorded: Any, files_now: int, doing: str) -> None:
    """Raise :class:`DataError` when a checkpoint's record of its text split (``recorded``, its
    :meth:`TextDataModule.state_dict`) is of the other kind than the split of the ``files_now`` files its
    data.paths find now: a run of one file (its held-out cut recorded) meets several, which split by file,
    so that file is now wholly training (the text it validated on trained on) or wholly held out (the text
    it trained on validated on); a run of several (its held-out files recorded) meets one, now cut by its
    bytes, whose first part is trained on whichever side it was on. ``doing``: what would go wrong, for the
    message (as :func:`check_split_unchanged`'s)."""
    if not isinstance(recorded, dict) or files_now < 1:
        return
    cut, held = recorded.get("validation_cut"), recorded.get("validation_files")
    if isinstance(cut, int) and not isinstance(cut, bool) and files_now > 1:
        before = f"one file and held out its text from token {cut} (its last data.val_fraction)"
        now = f"data.paths now finds {files_now} files, which split by file (each wholly on one side)"
    elif isinstance(held, list) and files_now == 1:
        before = f"several files and held out {sorted(map(str, held))}"
        now = (
            "data.paths now finds one file, which is cut by its tokens (its last data.val_fraction held out)"
        )
    else:
        return
    raise DataError(
        f"the files of data.paths split otherwise than when the checkpoint was written: its run read {before}, "
        f"and {now}. {doing} would use text the run trained on as validation text, or the reverse: put "
        "data.paths back as they were"
    )


def validation_file_keys(
    paths: Sequence[str], val_fraction: float, test_fraction: float = 0.0, held_out: str = "val"
) -> list[str] | None:
    """The split keys of the validation files (``held_out="test"``: the test files) :class:`TextDataModule`
    holds out of ``paths`` (found and split, nothing read); None for one file or the default corpus,
    which split no files."""
    if not paths:
        return None
    keys = split_keys(paths)
    if len(keys) < 2:
        return None
    others, test, split_on = split_test_files(sorted(keys), val_fraction, test_fraction, keys)
    val = test if held_out == "test" else split_text_files(others, val_fraction, split_on)[1]
    return sorted(keys[p] for p in val)


TEXT_SETTINGS = ("paths", "seq_len", "batch_size", "val_fraction", "val_batches", "test_fraction")
"""The arguments of :class:`TextDataModule` and :class:`HFDataModule` that a run config gives as
``data.<name>``."""


@contextlib.contextmanager
def settings_named(from_a_config: bool, settings: Sequence[str] = TEXT_SETTINGS) -> Iterator[None]:
    """Within it, a :class:`DataError` whose message names a run config's ``data.<setting>`` names, for a
    DataModule not built ``from_a_config`` (a user's own), the argument its user passed instead
    (:func:`~innerloop.config.load.setting_name`: ``seq_len``), keeping its type and attributes."""
    try:
        yield
    except DataError as err:
        if from_a_config:
            raise
        pattern = re.compile(rf"\bdata\.({'|'.join(settings)})\b")
        said = pattern.sub(lambda match: setting_name(match[0], match[1], False), str(err))
        if said == str(err):
            raise
        raise err.with_message(said) from None


def check_fractions(val_fraction: float, test_fraction: float) -> float:
    """``test_fraction`` as a float in [0, 1) whose sum with ``val_fraction`` is below 1 (the training
    text is the rest), else :class:`DataError` naming both."""
    test_fraction = checked_number("test_fraction", test_fraction, float, FRACTION)
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"data.val_fraction={val_fraction} + data.test_fraction={test_fraction} = "
            f"{val_fraction + test_fraction:g} leaves no training text: their sum must be below 1 (e.g. "
            "0.1 and 0.1)"
        )
    return test_fraction


NO_TEST_SPLIT = "data.test_fraction=0 holds out no test text: the run has no test split"
"""What a data module's ``setup("test")`` says at ``test_fraction`` 0."""


class TextDataModule(_IndexedDataModule):
    """Language modelling on text files: their bytes (vocabulary 256), or their tokens.

    Args:
        paths: files, directories or globs; empty means the Python standard library's own source
            (present on every Python install, read from disk, nothing downloaded).
        seq_len: tokens per training window (each window reads ``seq_len + 1`` bytes).
        batch_size: windows per batch (per process).
        val_fraction: share of files held out for validation (split by file, deterministic).
        val_batches: number of validation batches (fixed windows spread over the held-out text).
        seed: seed of the training windows' positions.
        tokenizer: how text becomes tokens (None: bytes, read as they are; another tokenizer reads
            each file as UTF-8 text and puts its end-of-text id between files).

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
        tokenizer: Tokenizer | None = None,
        test_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        self.paths = path_entries(paths, "paths")
        self.seq_len, self.batch_size, self.val_batches = _checked_sizes(
            seq_len=seq_len, batch_size=batch_size, val_batches=val_batches
        )
        self.seed = int(checked_number("seed", seed, int, SEED_BOUNDS))
        self.val_fraction = checked_number("val_fraction", val_fraction, float, FRACTION)
        self._from_a_config = built_from_a_config()  # its messages name data.seq_len, else seq_len
        with settings_named(self._from_a_config):
            self.test_fraction = check_fractions(self.val_fraction, test_fraction)
        self.tokenizer = _checked_tokenizer(tokenizer)
        self.train_bytes: torch.Tensor | None = None  # the tokens (bytes with the byte tokenizer)
        self.val_bytes: torch.Tensor | None = None
        self.test_bytes: torch.Tensor | None = None  # test_fraction > 0: the test text (never trained on)
        self.validation_keys: list[str] | None = None  # the split keys of the validation files (data.paths)
        self.validation_cut: int | None = None  # one file of data.paths: the token where validation starts
        self.test_keys: list[str] | None = None  # data.test_fraction > 0: the split keys of the test files
        self.test_cut: int | None = None  # test_fraction > 0, one file: the token where test text starts
        self._training_digest: str | None = None  # see training_digest
        self._validation_digest: str | None = None  # see validation_digest
        self._recorded: dict[str, Any] = {}  # what a resumed checkpoint recorded (state_dict)
        self._files_found = 0  # the files data.paths found (setup)

    def setup(self, stage: str | None = None) -> None:
        """Read the text: for ``stage="validate"`` (an evaluation of the run's held-out text, Lightning's
        ``validate``) the held-out files only, where there are several (an evaluation read and tokenized
        the whole corpus, 9 parts of 10 of it for nothing); for ``stage="test"`` (an evaluation of the
        test text, ``data.test_fraction`` > 0) the test files only; the training and validation text for
        any other stage. The test text is never read for training. Its errors name the arguments given
        (``seq_len``), or for a run config's data module its keys (``data.seq_len``)."""
        with settings_named(self._from_a_config):
            self._setup(stage)

    def _setup(self, stage: str | None) -> None:
        if stage == "test" and self.test_fraction == 0:
            if self.trainer is not None:  # trainer.test(dataloaders=...) after a fit: its loaders, not ours
                return
            raise DataError(NO_TEST_SPLIT)
        if self._read_for(stage):
            return
        keys = split_keys(self.paths) if self.paths else None  # the files, found once, and their split keys
        files = sorted(keys) if keys is not None else stdlib_files()
        self._files_found = len(files)
        if len(files) == 1:
            self._split_one_file(files)
        else:
            self._split_files(files, keys, stage)
        self._check_recorded()
        self._check_lengths(files, keys, stage)

    def _read_for(self, stage: str | None) -> bool:
        """Whether :meth:`setup` read what ``stage`` needs already."""
        if stage == "test":
            return self.test_bytes is not None
        return self.val_bytes is not None and (self.train_bytes is not None or stage == "validate")

    def _split_one_file(self, files: Sequence[Any]) -> None:
        """One file: its last ``val_fraction`` for validation, the ``test_fraction`` before it for test."""
        data = read_tokens(files, self.tokenizer)
        cut = _single_file_cut(len(data), self.val_fraction)
        test_cut = single_file_test_cut(len(data), self.val_fraction, self.test_fraction)
        self.train_bytes, self.val_bytes = data[:test_cut], data[cut:]
        self.validation_cut = cut if self.paths else None  # the default corpus is never one file
        if self.test_fraction > 0:
            self.test_bytes, self.test_cut = data[test_cut:cut], test_cut

    def _split_files(self, files: Sequence[Any], keys: dict[Any, str] | None, stage: str | None) -> None:
        """Several files: the test files by their hash's band, then the others as without test files."""
        others, test, split_on = split_test_files(files, self.val_fraction, self.test_fraction, keys)
        train, val = split_text_files(others, self.val_fraction, split_on)
        if keys is not None:
            self.validation_keys = sorted(keys[p] for p in val)
            self.test_keys = sorted(keys[p] for p in test) if self.test_fraction > 0 else None
        if stage not in ("validate", "test"):  # what training reads: at least a file and validation's
            check_files_left(len(files), len(test), self.test_fraction)
        if stage != "validate" and self.test_fraction > 0 and not test:  # validation's read no test file
            check_test_length(0, len(files), self.seq_len, self.test_fraction, self.unit)
        if stage == "test":
            self.test_bytes = read_tokens(test, self.tokenizer)
            return
        if stage != "validate" and test and not isinstance(self.tokenizer, ByteTokenizer):
            # the config checked the test files' bytes; a tokenizer makes fewer tokens of them (counted, not kept)
            count = len(read_tokens(test, self.tokenizer))
            check_test_length(count, len(files), self.seq_len, self.test_fraction, self.unit)
        if self.val_bytes is None:
            self.val_bytes = read_tokens(val, self.tokenizer)
        if stage != "validate":
            self.train_bytes = read_tokens(train, self.tokenizer)
            held_out = [*val, *test]
            warn_copied_files(copied_files(held_out, train), sum(p.stat().st_size for p in held_out))

    @property
    def unit(self) -> str:
        """What the data is counted in: ``"bytes"`` with the byte tokenizer, else ``"tokens"``."""
        return "bytes" if isinstance(self.tokenizer, ByteTokenizer) else "tokens"

    def _check_lengths(self, files: Sequence[Any], keys: dict[Any, str] | None, stage: str | None) -> None:
        """:func:`check_text_lengths` of what :meth:`setup` read (:func:`check_test_length` of test text)."""
        if self.test_bytes is not None and stage != "validate":  # validation's windows need none of it
            check_test_length(len(self.test_bytes), len(files), self.seq_len, self.test_fraction, self.unit)
        if stage == "test":
            return
        assert self.val_bytes is not None
        others, _, split_on = split_test_files(files, self.val_fraction, self.test_fraction, keys)
        check_text_lengths(
            None if self.train_bytes is None else len(self.train_bytes),
            len(self.val_bytes),
            len(files),
            self.seq_len,
            self.val_fraction,
            self.unit,
            fallback_file=fallback_held_out(others, self.val_fraction, split_on),
        )

    @property
    def training_digest(self) -> str | None:
        """sha256 of the training text's tokens (None before :meth:`setup`), computed when first asked
        (by a checkpoint or a resume's check, not by an evaluation, which reads only the held-out text)."""
        if self._training_digest is None and self.train_bytes is not None:
            self._training_digest = hashlib.sha256(self.train_bytes.contiguous().numpy()).hexdigest()
        return self._training_digest

    @property
    def validation_digest(self) -> str | None:
        """sha256 of the validation text's tokens (None before :meth:`setup`), computed when first asked."""
        if self._validation_digest is None and self.val_bytes is not None:
            self._validation_digest = hashlib.sha256(self.val_bytes.contiguous().numpy()).hexdigest()
        return self._validation_digest

    def state_dict(self) -> dict[str, Any]:
        """What a resume checks (stored in the checkpoint by Lightning): the split the run validates on,
        ``"validation_files"`` (split keys; none for one file or the default corpus), and the training
        and validation texts' ``"training_digest"`` and ``"validation_digest"``."""
        state: dict[str, Any] = {}
        if self.validation_keys is not None:
            state["validation_files"] = list(self.validation_keys)
        if self.validation_cut is not None:
            state["validation_cut"] = self.validation_cut
        if self.test_keys is not None:  # data.test_fraction > 0 only: other runs' state is as before
            state["test_files"] = list(self.test_keys)
        if self.test_cut is not None:
            state["test_cut"] = self.test_cut
        digest = self.training_digest
        if digest is not None:
            state["training_digest"] = digest
        if self.validation_digest is not None:
            state["validation_digest"] = self.validation_digest
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check a resumed checkpoint's data against this one's (:meth:`_check_recorded`)."""
        self._recorded = dict(state_dict)
        self._check_recorded()

    def _check_recorded(self) -> None:
        """A resumed checkpoint's split must be this one's (:func:`check_split_unchanged`: else the run
        would train on text it validated on); a training or validation text that differs (a file edited,
        added or removed) gets a warning (:meth:`_warn_changed_text`)."""
        if self.val_bytes is None:  # before setup: checked there
            return
        if self.paths:  # one file (its cut) or several (their keys): the record must be of the same kind
            check_split_kind_unchanged(self._recorded, self._files_found, "Resuming")
        recorded = self._recorded.get("validation_files")
        if isinstance(recorded, list) and self.validation_keys is not None:
            check_split_unchanged(recorded, self.validation_keys, "Resuming")
        recorded = self._recorded.get("test_files")
        if isinstance(recorded, list) and self.test_keys is not None:
            check_split_unchanged(recorded, self.test_keys, "Resuming", held_out="test")
        test_cut = self._recorded.get("test_cut")
        if isinstance(test_cut, int) and self.test_cut is not None and test_cut != self.test_cut:
            self._refuse_moved_cut(
                f"test text (data.test_fraction={self.test_fraction})",
                test_cut,
                self.test_cut,
                "train on text held out for test, or the reverse",
            )
        cut = self._recorded.get("validation_cut")
        if isinstance(cut, int) and self.validation_cut is not None and cut != self.validation_cut:
            trained_on = self.validation_cut > cut
            self._refuse_moved_cut(
                f"last data.val_fraction={self.val_fraction}, held out for validation,",
                cut,
                self.validation_cut,
                "train on text it validated on" if trained_on else "validate on text it trained on",
            )
        self._warn_changed_text()

    def _warn_changed_text(self) -> None:
        """A warning for a training text, and one for a validation text, that differ from those a resumed
        checkpoint recorded (a file edited in place, at its length too): the resume goes on, but not on
        the data the run was trained on, or its validation loss not of the text it was before."""
        digest = self._recorded.get("training_digest")
        if isinstance(digest, str) and self.train_bytes is not None and digest != self.training_digest:
            log.warning(
                "the training text differs from the one the checkpoint was trained on (a file of data.paths "
                "edited, added or removed since): the resumed run goes on, on other data than the run it "
                "continues, so it is not the run an uninterrupted one would have been"
            )
        digest = self._recorded.get(
            "validation_digest"
        )  # none in a checkpoint written before runs recorded it
        if isinstance(digest, str) and digest != self.validation_digest:
            log.warning(
                "the validation text differs from the one the checkpoint was validated on (a held-out file of "
                "data.paths edited since): the resumed run's val_loss is of other text than the run's before, "
                "so the two parts of its curve do not compare"
            )

    def _refuse_moved_cut(self, text: str, recorded: int, now: int, consequence: str) -> None:
        """The one file's held-out ``text`` started at token ``recorded`` when the checkpoint was written and
        starts at ``now``: a :class:`DataError` saying what the resumed run would do (``consequence``)."""
        raise DataError(
            f"the data file {self.paths!r} changed length since the checkpoint was written: its {text} started "
            f"at token {recorded} and now starts at token {now}, so the resumed run would {consequence}; resume "
            f"with the file as it was, or start a new run ({given_flag('overwrite')} or another out_dir)"
        )

    def make_train_batch(self, index: int) -> Batch:
        """``batch_size`` windows at random starts in the training text, drawn from ``(seed, index)``."""
        if self.train_bytes is None:
            raise RuntimeError("TextDataModule: call setup() before make_train_batch()")
        starts = torch.randint(
            0,
            len(self.train_bytes) - self.seq_len,
            (self.batch_size,),
            generator=_generator(self.seed, index),
        )
        windows = torch.stack([self.train_bytes[s : s + self.seq_len + 1] for s in starts.tolist()]).long()
        return windows[:, :-1], windows[:, 1:]  # [B, T] each

    def make_val_examples(self) -> Batch:
        """``val_batches * batch_size`` windows spread evenly over the validation text."""
        if self.val_bytes is None:
            raise RuntimeError("TextDataModule: call setup() before make_val_examples()")
        count = self.val_batches * self.batch_size
        return spread_windows(self.val_bytes, self.seq_len, count, self.unit, "the validation text")

    def make_test_examples(self) -> Batch:
        """``val_batches * batch_size`` windows spread evenly over the test text (``setup("test")``)."""
        if self.test_bytes is None:
            raise RuntimeError("TextDataModule: call setup('test') before make_test_examples()")
        what = "the test text"
        return spread_windows(
            self.test_bytes, self.seq_len, self.val_batches * self.batch_size, self.unit, what
        )


def spread_windows(
    data: torch.Tensor,
    seq_len: int,
    count: int,
    unit: str = "bytes",
    what: str = "the text",
    seq_len_name: str = "seq_len",
) -> Batch:
    """Up to ``count`` windows of ``data`` spread evenly over it: ``(inputs [N, T], targets [N, T])``.
    ``what`` and ``seq_len_name`` name the data and the length option in the error of too short a text.

    No two windows score the same token: where the data holds fewer than ``count`` windows of
    ``seq_len`` targets, it is cut into as many as it holds, with a warning. (Overlapping windows
    scored tokens several times, weighted the middle of the data over its ends, and made the
    bootstrap bands of ``compare`` narrow without limit from the same tokens read again.)"""
    if len(data) < seq_len + 1:
        raise TextTooShortError(
            f"{what} has {len(data)} {unit} (end-of-text separators included), fewer than "
            f"{seq_len_name} + 1 = {seq_len + 1}; give more text or a shorter {seq_len_name}",
            len(data), seq_len + 1, unit,
        )  # fmt: skip
    holds = (len(data) - 1) // seq_len  # windows whose targets do not overlap
    if count > holds:
        log.warning(
            "%s holds %s of %s=%d without overlap (%d %s); scoring those %d, not the %d of batches x batch size",
            what, counted(holds, "window"), seq_len_name, seq_len, len(data), unit, holds, count,
        )  # fmt: skip
        count = holds
    # starts at least seq_len apart: (len - seq_len - 1) / (count - 1) >= seq_len for count <= holds
    # integer arithmetic: float32 linspace rounds starts of data past ~2**23 tokens, making neighbours overlap
    last = len(data) - seq_len - 1
    starts = (torch.arange(count, dtype=torch.int64) * last) // max(count - 1, 1)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def evaluation_examples(
    paths: Sequence[str],
    seq_len: int,
    count: int,
    val_fraction: float = 0.1,
    tokenizer: Tokenizer | None = None,
    text_field: str | None = None,
    split: str | None = None,
) -> Batch:
    """Windows to evaluate on: all of the given files, or with no paths the validation split of the
    default corpus (the same files :class:`TextDataModule` holds out), tokenized by ``tokenizer``
    (None: bytes). ``split``: the split of records read with ``text_field`` (:func:`dataset_tokens`).

    The files are read as a text run reads its data (each file's bytes or text, the end-of-text id
    between files), or with ``text_field`` as a ``data.name='hf'`` run reads its data
    (:func:`dataset_tokens`: the documents' ``text_field``, each followed by the end-of-text id), not
    their raw bytes. Up to ``count`` windows spread evenly over the tokens (:func:`spread_windows`)."""
    if paths:
        unit = "bytes" if tokenizer is None or isinstance(tokenizer, ByteTokenizer) else "tokens"
        data, listed = argument_name("paths"), ", ".join(map(repr, paths))
        named = {
            "what": given_argument("paths", listed, placeholder=True),
            "seq_len_name": argument_name("seq_len"),
        }
        if text_field is not None:
            tokens = dataset_tokens(paths, text_field, tokenizer, split)
            return spread_windows(tokens, seq_len, count, unit, **named)
        files = resolve_files(paths)
        if all(file.stat().st_size == 0 for file in files):
            names = ", ".join(repr(str(file)) for file in files)
            raise DataError(f"{data} {names}: {'the file is' if len(files) == 1 else 'every file is'} empty")
        tokens = read_tokens(files, tokenizer, option=data)
        return spread_windows(tokens, seq_len, count, unit, **named)
    module = TextDataModule(
        seq_len=seq_len, batch_size=count, val_fraction=val_fraction, val_batches=1, tokenizer=tokenizer
    )
    module.setup()
    return module.make_val_examples()


def dataset_tokens(
    paths: Sequence[str], text_field: str, tokenizer: Tokenizer | None = None, split: str | None = None
) -> torch.Tensor:
    """Every document of the data files (or ``save_to_disk`` folder) ``paths``, read as
    :class:`HFDataModule` reads a run's documents (:func:`~innerloop.data.hf.open_hf_dataset`; the
    ``text_field`` of each, tokenized and followed by the tokenizer's end-of-text id), as one
    ``int64 [N]`` stream. ``split`` (``--split``; a slice such as ``test[:50%]`` too) defaults to the
    data's own split: ``train`` for data files, a saved Dataset's own one, a saved DatasetDict's only
    one (one of several must be named). Raises :class:`DataError` naming ``--data`` when they cannot be
    read."""
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    encode_many = getattr(tokenizer, "encode_many", None)
    separator = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    tokens: list[torch.Tensor] = []  # a tensor per chunk of documents: 8 bytes a token, not a Python int's 36
    try:
        dataset = open_hf_dataset(
            paths, split or own_split(paths, argument_name("split")), streaming=False, text_field=text_field
        )
        for _, texts in iter_texts(dataset, text_field):
            chunk: list[int] = []
            for ids in encode_many(texts) if encode_many else [tokenizer.encode(t) for t in texts]:
                chunk += [*ids, *separator]
            tokens.append(torch.tensor(chunk, dtype=torch.int64))
    except DataError as err:
        # the caller's names for them (eval's --data, evaluate's paths=): the run's data.paths and data.split
        # are not what was read
        split_as_given, paths_as_given = (given_argument(p, "", placeholder=True) for p in ("split", "paths"))
        said = str(err).replace("data.split=", split_as_given).replace("data.paths=", paths_as_given)
        said = said.replace(
            "data.paths", argument_name("paths")
        )  # 'data.paths has', 'remove it from data.paths'
        given = given_argument("paths", list(paths), quoted=False)
        raise DataError(
            f"{given}, read as the run's data.name='hf' data (field {text_field!r}): {said}"
        ) from None
    return torch.cat(tokens) if tokens else torch.empty(0, dtype=torch.int64)


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
    ) -> None:
        super().__init__()
        self.num_pairs = int(checked_number("num_pairs", num_pairs, int, RECALL_PAIRS_BOUNDS))
        self.gap = int(checked_number("gap", gap, int, RECALL_GAP_BOUNDS))
        self.batch_size, self.val_batches = _checked_sizes(batch_size=batch_size, val_batches=val_batches)
        self.seed = int(checked_number("seed", seed, int, SEED_BOUNDS))

    @property
    def seq_len(self) -> int:
        """Tokens per example (inputs): ``4 * num_pairs + gap - 1`` (:func:`~innerloop.data.recall.recall_length`)."""
        return recall_length(self.num_pairs, self.gap)

    def _examples(self, count: int, generator: torch.Generator) -> Batch:
        examples = [recall_example(self.num_pairs, self.gap, generator) for _ in range(count)]
        return torch.stack([e[0] for e in examples]), torch.stack([e[1] for e in examples])

    def make_train_batch(self, index: int) -> Batch:
        """``batch_size`` recall examples drawn from ``(seed, index)``."""
        return self._examples(self.batch_size, _generator(self.seed, index))

    def make_val_examples(self) -> Batch:
        """``val_batches * batch_size`` recall examples, drawn from their own fixed stream."""
        return self._examples(self.val_batches * self.batch_size, _generator(self.seed, -1))


class PackedBatches(IterableDataset):
    """Batches of consecutive packed windows from a recorded stream position (see
    :mod:`innerloop.data.packing`): global batch ``g`` is windows ``g*B .. g*B + B - 1``; this rank
    reads the ``rank``-th batch of each group of ``world_size`` from ``first_batch`` on. Before each of its batches is yielded, ``record(g, position)`` is told the
    position of the next global batch of every rank's batches passed (what a checkpoint stores)."""

    def __init__(
        self,
        windows_from: Callable[[StreamPosition], Iterator[tuple[list[int], StreamPosition]]],
        batch_size: int,
        first_batch: int,
        position: StreamPosition,
        record: Callable[[int, StreamPosition], None],
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.windows_from, self.batch_size = windows_from, batch_size
        self.first_batch, self.position, self.record = first_batch, position, record
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[Batch]:
        if get_worker_info() is not None:
            raise DataError(
                "HFDataModule's training batches are read in order by one process: its position in the "
                "documents is what a checkpoint records, and a DataLoader worker's copy would record it "
                "where no checkpoint sees it; read them with num_workers=0 (the default)"
            )
        windows = self.windows_from(self.position)
        batch = self.first_batch
        while True:
            own: list[list[int]] = []
            for rank in range(self.world_size):
                rows = [next(windows) for _ in range(self.batch_size)]
                batch += 1
                self.record(batch, rows[-1][1])
                if rank == self.rank:
                    own = [window for window, _ in rows]
            tokens = torch.tensor(own, dtype=torch.long)  # [B, T + 1]
            yield tokens[:, :-1], tokens[:, 1:]


class HFDataModule(L.LightningDataModule):
    """A local dataset read with the ``datasets`` library (:mod:`innerloop.data.hf`), tokenized as it is
    read and packed into windows of ``seq_len + 1`` tokens (:mod:`innerloop.data.packing`).

    Training reads the training documents in order, epoch after epoch; validation is the first
    ``val_batches * batch_size`` windows of the held-out documents (every ``1/val_fraction``-th
    document, so the two never share one). The checkpoint stores the stream position of the next
    batch (:meth:`state_dict`), so a resumed run reads the batches an uninterrupted one would have.

    Args:
        paths, split, text_field, streaming: the dataset (see :func:`innerloop.data.hf.open_hf_dataset`).
        tokenizer: how text becomes tokens (None: bytes); its end-of-text id follows each document.
        seq_len, batch_size, val_fraction, val_batches: as for :class:`TextDataModule`.
        test_fraction: share of the documents held out for test (:func:`~innerloop.data.packing.is_test`:
            never validation ones, never trained on); their first ``val_batches * batch_size`` windows are
            :attr:`test_examples`, read by :meth:`setup`.
    """

    _HISTORY = 256  # stream positions kept (the Trainer fetches a batch or two ahead of the step)

    def __init__(
        self,
        paths: Sequence[str],
        split: str = "train",
        text_field: str = "text",
        streaming: bool = False,
        tokenizer: Tokenizer | None = None,
        seq_len: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        val_batches: int = 8,
        test_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        seq_len, batch_size, val_batches = _checked_sizes(
            seq_len=seq_len, batch_size=batch_size, val_batches=val_batches
        )
        val_fraction = checked_number("val_fraction", val_fraction, float, FRACTION)
        self._from_a_config = built_from_a_config()  # its messages name data.seq_len, else seq_len
        with settings_named(self._from_a_config, (*TEXT_SETTINGS, "split", "text_field")):
            if not 0 < val_fraction < 1:
                raise DataError(
                    f"data.val_fraction={val_fraction} must be in (0, 1) for data.name='hf': validation holds "
                    "out every 1/val_fraction-th document"
                )
            self.test_fraction = check_fractions(val_fraction, test_fraction)
        self.paths, self.split, self.text_field, self.streaming = (
            path_entries(paths, "paths"),
            _checked_kind("split", split, str, "a split name such as 'train' (or a slice, 'train[:90%]')"),
            _checked_kind("text_field", text_field, str, "the name of the text column"),
            _checked_kind("streaming", streaming, bool, "True or False"),
        )
        self.tokenizer = _checked_tokenizer(tokenizer)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_fraction, self.val_batches = val_fraction, val_batches
        self.dataset = None
        self.val_examples: Batch | None = None
        self.test_examples: Batch | None = None  # test_fraction > 0: the first windows of the test documents
        self._test_digest: str | None = None  # sha256 of the test windows (setup)
        self._positions: dict[int, StreamPosition] = {0: START}  # global batch -> where it starts
        self._resumed: tuple[int, StreamPosition] | None = None
        self._start_step, self._first = 0, 0  # the step and global batch the stream (re)started at
        self._files: list[list[Any]] | None = None  # files_record of the data when setup read it
        self._validation_digest: str | None = None  # sha256 of the validation windows (setup)
        self._recorded_digest: str | None = None  # a resumed checkpoint's (load_state_dict)
        self._recorded_test_digest: str | None = None  # its test windows' (test_fraction > 0)

    def setup(self, stage: str | None = None) -> None:
        """Open the dataset and read the validation windows, for any ``stage`` but ``"test"`` (an evaluation
        of the test windows, which need not fill a validation window); at ``test_fraction`` > 0 the test
        windows too, for any ``stage`` but ``"validate"`` (an evaluation of the validation windows).
        ``stage="test"`` at ``test_fraction`` 0 is a :class:`DataError`, as :class:`TextDataModule`'s. Its
        errors name the arguments given (``seq_len``), or for a run config's data module its keys."""
        with settings_named(self._from_a_config, (*TEXT_SETTINGS, "split", "text_field")):
            self._setup(stage)

    def _setup(self, stage: str | None) -> None:
        if stage == "test" and self.test_fraction == 0:
            if self.trainer is not None:  # trainer.test(dataloaders=...) after a fit: its loaders, not ours
                return
            raise DataError(NO_TEST_SPLIT)
        if self.dataset is None:
            self._files = files_record(source_files(self.paths))
            self.dataset = open_hf_dataset(self.paths, self.split, self.streaming, self.text_field)
        if self.val_examples is None and stage != "test":
            self.val_examples, self._validation_digest = self._held_out_windows("validation")
        if self.test_fraction > 0 and stage != "validate" and self.test_examples is None:
            self.test_examples, self._test_digest = self._held_out_windows("test")
        self._check_validation_unchanged()

    def _held_out_windows(self, held_out: str) -> tuple[Batch, str]:
        """The first ``val_batches * batch_size`` windows of the validation (or test) documents, and the
        sha256 of their tokens."""
        asked = self.val_batches * self.batch_size
        windows = validation_windows(self._reader(held_out), self.seq_len, asked, held_out)
        if len(windows) < asked:
            log.warning(
                "the %s documents hold %s of seq_len=%d; scoring those %d, not the %d of batches x batch size",
                "held-out" if held_out == "validation" else "test", counted(len(windows), "window"), self.seq_len,
                len(windows), asked,
            )  # fmt: skip
        tokens = torch.tensor(windows, dtype=torch.long)  # [N, T + 1]
        return (tokens[:, :-1], tokens[:, 1:]), hashlib.sha256(tokens.contiguous().numpy()).hexdigest()

    def _side(self, number: int) -> str:
        """Which documents document ``number`` is among: ``validation``, ``test`` or ``training``."""
        return document_side(number, self.val_fraction, self.test_fraction)

    def _reader(self, side: str) -> DocumentReader:
        """A :data:`~innerloop.data.packing.DocumentReader` of the ``side`` documents (:meth:`_side`)."""
        encode_many = getattr(self.tokenizer, "encode_many", None)
        separator = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]

        def read(epoch: int, first: int) -> Iterator[tuple[int, list[int]]]:
            for start, texts in iter_texts(self.dataset, self.text_field, first):
                encoded = encode_many(texts) if encode_many else [self.tokenizer.encode(t) for t in texts]
                for number, ids in enumerate(encoded, start):
                    if self._side(number) == side:
                        yield number, [*ids, *separator]

        return read

    def _windows_from(self, position: StreamPosition) -> Iterator[tuple[list[int], StreamPosition]]:
        return packed_windows(self._reader("training"), self.seq_len, position)

    def _record(self, batch: int, position: StreamPosition) -> None:
        self._positions[batch] = position
        for old in [b for b in self._positions if b <= batch - self._HISTORY]:
            del self._positions[old]

    def _batches_read(self) -> int:
        """Global batches trained on since :meth:`train_dataloader` started the stream (the steps
        taken since, times accumulation and ranks)."""
        if self.trainer is None:
            return 0
        steps = self.trainer.global_step - self._start_step
        return steps * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        rank, world, step = 0, 1, 0
        if self.trainer is not None:
            rank, world, step = self.trainer.global_rank, self.trainer.world_size, self.trainer.global_step
        if self._resumed is not None:  # the checkpoint's position, whatever accumulation or ranks now
            first, position = self._resumed
        elif step == 0:
            first, position = 0, START
        else:
            raise DataError(
                f"cannot resume the data stream at step {step}: the checkpoint records no stream position "
                "(it was not written by a data.name='hf' run of this innerloop)"
            )
        self._start_step, self._first = step, first
        self._positions = {first: position}
        batches = PackedBatches(
            self._windows_from, self.batch_size, first, position, self._record, rank, world
        )
        return DataLoader(batches, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        assert self.val_examples is not None, "call setup() first"
        return validation_loader(*self.val_examples, self.batch_size, self.trainer)

    def state_dict(self) -> dict[str, Any]:
        """The stream position of the next training batch: ``{"batch": g, "position": [epoch,
        document, offset]}`` (stored in the checkpoint by Lightning)."""
        # Lightning's epochs of n batches read the stream again from its start: a checkpoint in any of
        # them (the first included: its resume would read on where the run reads batch 0 again) is refused
        batches = getattr(self.trainer, "num_training_batches", math.inf)  # (no trainer: one stream)
        if math.isfinite(batches):
            raise DataError(
                f"HFDataModule cannot record its stream position for a checkpoint under the Trainer's "
                f"limit_train_batches={self.trainer.limit_train_batches!r} (or overfit_batches), epochs of "
                f"{int(batches)} batches: each epoch reads the documents again from the start, and the "
                "checkpoint records one endless stream; end the run with max_steps (max_epochs=-1) instead "
                "of epochs"
            )
        batch = self._first + self._batches_read()
        if batch not in self._positions:
            raise DataError(f"the stream position of batch {batch} is unknown (it was not read yet)")
        state: dict[str, Any] = {"batch": batch, "position": list(self._positions[batch])}
        if self._files is not None:
            state["files"] = self._files
        if self._validation_digest is not None:
            state["validation_digest"] = self._validation_digest
        if self._test_digest is not None:  # test_fraction > 0 only: other runs' state is as before
            state["test_digest"] = self._test_digest
        return state

    def _check_validation_unchanged(
        self,
        would: str = "the resumed run would train on documents it validated on",
        fix: str | None = None,
    ) -> None:
        """A resumed checkpoint's validation windows must be this data's (:class:`DataError` else): the
        held-out documents are every ``1/val_fraction``-th by number, so a document inserted or removed
        before them moves documents between training and validation, and the resumed run would train on
        documents it validated on (documents appended at the end keep every number and side).
        ``would``, ``fix``: what would go wrong and what to do, for another use (an evaluation's; ``fix``
        None: a resume's, naming ``overwrite`` as its caller gave it)."""
        if fix is None:
            fix = f"resume with the data as it was, or start a new run ({given_flag('overwrite')} or another out_dir)"
        data = f"data.paths={self.paths!r} (split={self.split!r})"
        checks = (
            (self._recorded_digest, self._validation_digest, f"the validation windows of {data} differ from "
             "those the checkpoint was validated on: documents were inserted, removed or edited among the first "
             "held-out ones (every 1/data.val_fraction-th by number), which moves documents between training "
             f"and validation, so {would}; {fix}"),
            (self._recorded_test_digest, self._test_digest, f"the test windows of {data} differ from those the "
             "checkpoint recorded: documents were inserted, removed or edited among the first test ones "
             "(data.test_fraction), which moves documents between training and test, so "
             f"{would.replace('validated on', 'held out for test')}; {fix}"),
        )  # fmt: skip
        for recorded, now, message in checks:
            if recorded is not None and now is not None and recorded != now:
                raise DataError(message)

    def check_recorded_validation(
        self, state: dict[str, Any], would: str, fix: str, held_out: str = "val"
    ) -> None:
        """:meth:`_check_validation_unchanged` against a checkpoint's ``state`` (:meth:`state_dict`) without
        resuming from it (call after :meth:`setup`); ``held_out="test"``: the test windows too (an edited
        test document leaves the validation windows valid); each is checked where :meth:`setup` read it
        (``setup("test")``: the test windows alone)."""
        digest, test = state.get("validation_digest"), state.get("test_digest")
        self._recorded_digest = digest if isinstance(digest, str) else None
        self._recorded_test_digest = test if isinstance(test, str) and held_out == "test" else None
        self._check_validation_unchanged(would, fix)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from a position :meth:`state_dict` recorded; a warning if the data files differ from
        those the checkpoint records (an edit that keeps the recorded position readable is not otherwise
        seen: the run would go on, on other data, without a word)."""
        batch, position = state_dict.get("batch"), state_dict.get("position")
        if not isinstance(batch, int) or not (
            isinstance(position, list) and len(position) == 3 and all(isinstance(v, int) for v in position)
        ):
            raise DataError(f"the checkpoint's data stream state {state_dict!r} is malformed")
        self._resumed = (batch, StreamPosition(*position))
        digest = state_dict.get("validation_digest")  # none in a checkpoint written before runs recorded it
        self._recorded_digest = digest if isinstance(digest, str) else None
        test = state_dict.get("test_digest")  # only a run at data.test_fraction > 0 records it
        self._recorded_test_digest = test if isinstance(test, str) else None
        self._check_validation_unchanged()
        recorded = state_dict.get("files")  # none in a checkpoint written before runs recorded them
        if isinstance(recorded, list) and recorded != files_record(source_files(self.paths)):
            log.warning(
                "the data files differ from those the checkpoint was trained on (a file of data.paths edited, "
                "added or removed since: names, sizes or modification times): the resumed run goes on, on "
                "other data than the run it continues, so it is not the run an uninterrupted one would have been"
            )
