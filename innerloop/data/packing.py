"""Documents packed into windows of ``seq_len + 1`` tokens, resumable from a recorded position.

A dataset is a sequence of documents (texts), numbered 0, 1, 2, ... in the order the source gives
them. Each document becomes its token ids followed by the tokenizer's end-of-text id (when it has
one), and the documents' tokens are read as one stream, cut into windows of ``seq_len + 1`` tokens
that start every ``seq_len`` tokens (consecutive windows share one token, so every token but the first
is predicted exactly once). When the training documents run out the stream starts again at document
0 (the next *epoch*), so training never ends for lack of data.

Validation: document ``i`` is held out when ``floor((i + 1) * f) > floor(i * f)`` for
``f = data.val_fraction`` (:func:`is_validation`): every ``1/f``-th document (documents 9, 19, 29, ...
for ``f = 0.1``), decided from its number alone, so it works on a stream of unknown length and the two
sides never share a document. The validation windows are the first ones packed from the held-out
documents (:func:`validation_windows`), the same in every run.

Test (``t = data.test_fraction`` > 0): of the documents not held out for validation, numbered again
0, 1, 2, ... in order, every ``1/(t / (1 - f))``-th (:func:`is_test`): a share ``t`` of all documents,
decided from its number alone too, and never a validation one; training reads neither.

A :class:`StreamPosition` ``(epoch, document, offset)`` says where a window starts: token ``offset`` of
document ``document`` (counting its end-of-text token) in epoch ``epoch``. A checkpoint stores the
position of the next batch, and :func:`packed_windows` started there yields exactly the windows an
uninterrupted run would have read next.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from innerloop.core.functional import as_integer, check_positive_int, is_integer
from innerloop.data.text import DataError

#: ``read(epoch, first_document)`` yields ``(document number, token ids)`` of the documents from
#: ``first_document`` on, in order, for one epoch (it may skip documents, e.g. validation ones).
DocumentReader = Callable[[int, int], Iterator[tuple[int, list[int]]]]


class StreamPosition(NamedTuple):
    """Where a window starts: token ``offset`` of document ``document`` in epoch ``epoch``."""

    epoch: int
    document: int
    offset: int


START = StreamPosition(0, 0, 0)


def is_validation(document: int, val_fraction: float) -> bool:
    """Whether document number ``document`` is held out for validation (every ``1/val_fraction``-th).
    A ValueError naming the argument for a ``document`` that is not an integer >= 0 or a
    ``val_fraction`` outside ``[0, 1]`` (-1 read as a validation document, a fraction of 1.5 as all)."""
    check_held_out_split(document, val_fraction)
    return _every(as_integer(document), val_fraction)  # a 0-d tensor's float32 arithmetic would round


def _every(number: int, fraction: float) -> bool:
    """Whether ``number`` is one of every ``1/fraction``-th numbers (:func:`is_validation`, unchecked)."""
    return math.floor((number + 1) * fraction) > math.floor(number * fraction)


def is_test(document: int, val_fraction: float, test_fraction: float) -> bool:
    """Whether document number ``document`` is held out for test: not a validation document, and among
    those (numbered from 0: document ``n`` is number ``n - floor(n * val_fraction)`` of them) every
    ``1/(test_fraction / (1 - val_fraction))``-th, a share ``test_fraction`` of all documents. False for
    every document at ``test_fraction`` 0. A ValueError as :func:`is_validation`'s, or for fractions in
    ``[0, 1]`` whose sum is past 1 (more test documents than the validation ones leave)."""
    check_held_out_split(document, val_fraction, test_fraction)
    return _among_test(as_integer(document), val_fraction, test_fraction)


def _among_test(document: int, val_fraction: float, test_fraction: float) -> bool:
    """:func:`is_test`, its arguments unchecked."""
    if test_fraction == 0 or _every(document, val_fraction):
        return False
    return _every(document - math.floor(document * val_fraction), test_fraction / (1 - val_fraction))


def check_held_out_split(document: Any, val_fraction: Any, test_fraction: Any = 0.0) -> None:
    """A ValueError naming the argument unless ``document`` is an integer >= 0 and ``val_fraction`` and
    ``test_fraction`` are numbers in ``[0, 1]`` with a sum of at most 1 (:func:`is_validation`,
    :func:`is_test`)."""
    plain = type(document) is int and type(val_fraction) is float and type(test_fraction) is float
    if plain and document >= 0 and 0 <= val_fraction <= 1 - test_fraction <= 1:
        return  # the common case, quickly (the split is decided once per document read)
    if not is_integer(document) or document < 0:
        raise ValueError(f"document={document!r} must be a document number: an integer >= 0")
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 <= fraction <= 1:
            raise ValueError(f"{name}={fraction!r} must be a number in [0, 1]")
    if test_fraction > 0 and (val_fraction == 1 or test_fraction / (1 - val_fraction) > 1):
        raise ValueError(
            f"val_fraction={val_fraction} + test_fraction={test_fraction} must be at most 1 (the shares of "
            "all documents held out for validation and for test)"
        )


def document_side(document: int, val_fraction: float, test_fraction: float = 0.0) -> str:
    """Which documents document number ``document`` is among: ``"validation"`` (:func:`is_validation`),
    ``"test"`` (:func:`is_test`) or ``"training"``; a ValueError as :func:`is_test`'s."""
    check_held_out_split(document, val_fraction, test_fraction)
    if _every(document, val_fraction):
        return "validation"
    return "test" if _among_test(document, val_fraction, test_fraction) else "training"


def first_document_of(
    side: str, val_fraction: float, test_fraction: float = 0.0, within: int = 10**7
) -> int | None:
    """The number of the first document on ``side`` (:func:`document_side`), None if none is among the
    first ``within``: the first document the ``side`` windows are read from. Found from where the
    fractions put it, a few steps of :func:`document_side` each (a walk from document 0 took seconds at
    a fraction of 1e-6)."""
    check_held_out_split(0, val_fraction, test_fraction)
    if side == "validation":
        first = _first_every(val_fraction, _every, within)
    elif side == "test":
        # at val_fraction 1 every document is a validation one (and test_fraction / (1 - val_fraction) a
        # division by 0)
        first = (
            None
            if test_fraction == 0 or val_fraction >= 1
            else _first_test(val_fraction, test_fraction, within)
        )
    else:  # training: among the first documents but where the held-out fractions leave little
        first = next(
            (n for n in range(within) if document_side(n, val_fraction, test_fraction) == side), None
        )
    return first if first is not None and first < within else None


def _first_every(fraction: float, holds: Callable[[int, float], bool], within: int) -> int | None:
    """The first ``n`` with ``holds(n, fraction)`` (:func:`is_validation`'s "every 1/fraction-th"): the
    one before ``ceil(1/fraction)``, found by stepping from just below it (float rounding); None when that
    is not below ``within`` (no ``n`` below it holds: ``(n + 1) * fraction < 1``). So a tiny fraction,
    whose ``1/fraction`` floats cannot step through (1e-17: ``n + 1`` and ``n`` the same float, a loop
    that never ended; 5e-324: infinite), is never stepped through."""
    if fraction <= 0 or 1 / fraction - 3 >= within:
        return None
    n = max(0, math.ceil(1 / fraction) - 3)
    while not holds(n, fraction):
        n += 1
    return n


def _first_test(val_fraction: float, test_fraction: float, within: int) -> int | None:
    """The first test document (:func:`is_test`): the first of the non-validation documents, numbered
    ``n - floor(n * val_fraction)``, that is every ``1/(test_fraction / (1 - val_fraction))``-th; None
    when its number is not below ``within`` (the document, numbered no lower, is not either)."""
    number = _first_every(test_fraction / (1 - val_fraction), _every, within)
    if number is None:
        return None
    n = max(0, math.floor(number / (1 - val_fraction)) - 3)  # number n - floor(n * v) grows by 0 or 1
    while n > 0 and n - math.floor(n * val_fraction) >= number:
        n -= 1
    while not _among_test(n, val_fraction, test_fraction):  # checked by first_document_of
        n += 1
    return n


class _Segment:
    """The tokens of one document still to be read, from ``offset`` on."""

    __slots__ = ("document", "epoch", "offset", "tokens")

    def __init__(self, epoch: int, document: int, tokens: list[int], offset: int) -> None:
        self.epoch, self.document, self.tokens, self.offset = epoch, document, tokens, offset

    @property
    def left(self) -> int:
        return len(self.tokens) - self.offset


def _documents(read: DocumentReader, start: StreamPosition, need: int) -> Iterator[_Segment]:
    """Every document's tokens from ``start`` on, epoch after epoch. Raises :class:`DataError` when a
    whole epoch holds fewer than ``need`` tokens (it could never fill a window)."""
    epoch, first = start.epoch, start.document
    offset = start.offset
    expected = start.document if start != START else None  # a recorded position's document is read first
    while True:
        tokens_in_epoch = 0
        for document, tokens in read(epoch, first):
            if expected is not None and document != expected:
                raise DataError(
                    f"the recorded stream position {tuple(start)} is at document {expected}, which the data "
                    f"no longer holds (it reads document {document} there): the data changed since the "
                    "checkpoint was written"
                )
            if offset > len(tokens):
                raise DataError(
                    f"the recorded stream position {tuple(start)} is past the end of document {document} "
                    f"({len(tokens)} tokens): the data changed since the checkpoint was written"
                )
            expected = None
            tokens_in_epoch += len(tokens)
            yield _Segment(epoch, document, tokens, offset)
            offset = 0
        if expected is not None:
            raise DataError(
                f"the recorded stream position {tuple(start)} is at document {expected}, past the data's "
                "last training document: the data changed since the checkpoint was written"
            )
        if first == 0 and tokens_in_epoch < need:
            raise DataError(
                f"the training documents hold {tokens_in_epoch} tokens, fewer than data.seq_len + 1 = "
                f"{need}; give more data or a shorter data.seq_len"
            )
        epoch, first = epoch + 1, 0


def packed_windows(
    read: DocumentReader, seq_len: int, start: StreamPosition = START
) -> Iterator[tuple[list[int], StreamPosition]]:
    """Windows of ``seq_len + 1`` tokens every ``seq_len`` tokens from ``start`` on, each with the
    position of the window after it (what a checkpoint taken after it records). ``seq_len`` must be a
    positive integer, checked when called (0 gave the same one-token window forever)."""
    check_positive_int("seq_len", seq_len)
    return _packed_windows(read, int(seq_len), start)


def _packed_windows(
    read: DocumentReader, seq_len: int, start: StreamPosition
) -> Iterator[tuple[list[int], StreamPosition]]:
    need = seq_len + 1
    source = _documents(read, start, need)
    segments: deque[_Segment] = deque()
    available = 0
    while True:
        while available < need:
            segment = next(source)
            segments.append(segment)
            available += segment.left
        window: list[int] = []
        for segment in segments:
            window.extend(segment.tokens[segment.offset : segment.offset + need - len(window)])
            if len(window) == need:
                break
        _advance(segments, seq_len)
        available -= seq_len
        head = segments[0]
        yield window, StreamPosition(head.epoch, head.document, head.offset)


def _advance(segments: deque[_Segment], count: int) -> None:
    """Consume ``count`` tokens from the front; an exhausted last segment stays (its end is the position)."""
    while count:
        head = segments[0]
        step = min(count, head.left)
        head.offset += step
        count -= step
        if head.left == 0 and len(segments) > 1:
            segments.popleft()


def validation_windows(
    read: DocumentReader, seq_len: int, count: int, held_out: str = "validation"
) -> list[list[int]]:
    """The first ``count`` windows of the held-out documents of epoch 0 (fewer if they run out).
    ``read`` yields only validation documents (``held_out="test"``: only test documents, which the
    messages then name). Raises :class:`DataError` if there is not one; ``seq_len`` and ``count`` must
    be positive integers (a ValueError naming them: a count of 0 was blamed on the data)."""
    seq_len, count = check_positive_int("seq_len", seq_len), check_positive_int("count", count)
    need = seq_len + 1
    tokens: list[int] = []
    windows: list[list[int]] = []
    documents = 0
    for _, document_tokens in read(0, 0):
        documents += 1
        tokens.extend(document_tokens)
        while len(tokens) >= need and len(windows) < count:
            windows.append(tokens[:need])
            del tokens[:seq_len]
        if len(windows) == count:
            break
    if documents == 0 and held_out == "test":
        raise DataError(
            "no document is held out for test: of the documents not held out for validation, every "
            "1/(data.test_fraction / (1 - data.val_fraction))-th is, and the data holds fewer; give more "
            "documents or a larger data.test_fraction"
        )
    if documents == 0:
        raise DataError(
            "no document is held out for validation: every 1/data.val_fraction-th document is (documents "
            "numbered from 0: at 0.1, documents 9, 19, ...), and the data holds fewer; give at least "
            "1/data.val_fraction documents (e.g. split a long document into several)"
        )
    if not windows:
        fraction = "data.test_fraction" if held_out == "test" else "data.val_fraction"
        raise DataError(
            f"the {held_out} documents hold fewer than data.seq_len + 1 = {need} tokens; give more data, "
            f"a larger {fraction} or a shorter data.seq_len"
        )
    return windows
