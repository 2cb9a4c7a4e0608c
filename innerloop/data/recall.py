"""The synthetic multi-query associative-recall task: its token ranges and one example.

Targets equal to :data:`IGNORE_INDEX` are not scored (the task scores only the answers).
"""

from __future__ import annotations

import torch

from innerloop.models.config import Bounds, checked_number

IGNORE_INDEX = -100
"""Target value that the loss and the metrics skip."""

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs [B, T] int64, targets [B, T] int64)


# Token ranges of the recall task (inside the byte vocabulary of 256).
RECALL_KEYS = range(16, 80)  # 64 keys
RECALL_DISTRACTORS = range(80, 128)  # 48 distractor tokens
RECALL_VALUES = range(128, 192)  # 64 values


RECALL_PAIRS_BOUNDS = Bounds(1, len(RECALL_KEYS), why=f"the task has {len(RECALL_KEYS)} keys")
"""The valid ``num_pairs``: each pair has its own key."""

RECALL_GAP_BOUNDS = Bounds(
    0,
    2**30 - 4 * len(RECALL_KEYS) + 1,
    why="sequences of 4 * num_pairs + gap - 1 tokens, at most 2**30 as data.seq_len",
)
"""The valid ``gap``: a sequence is held in memory as a window of ``data.seq_len`` (at most ``2**30``) is."""


def recall_length(num_pairs: int, gap: int) -> int:
    """Tokens of one example's inputs (and targets): the ``4 * num_pairs + gap`` tokens of the sequence
    less one, the inputs being the sequence without its last token and the targets without its first.
    A ValueError naming the argument for a ``num_pairs`` or ``gap`` that :func:`recall_example` refuses
    (0 pairs, -3 pairs, 1.5 pairs gave a length of 3, -13, 7.0)."""
    num_pairs = int(checked_number("num_pairs", num_pairs, int, RECALL_PAIRS_BOUNDS))
    gap = int(checked_number("gap", gap, int, RECALL_GAP_BOUNDS))
    return 4 * num_pairs + gap - 1


def recall_example(num_pairs: int, gap: int, generator: torch.Generator) -> Batch:
    """One multi-query associative recall example: ``(inputs [T], targets [T])``, ``T = 4*num_pairs + gap - 1``
    (:func:`recall_length`).

    The sequence is ``k1 v1 ... kn vn``, then ``gap`` random distractor tokens, then every key once more
    in a random order, each followed by its value. Only the values after the repeated keys are scored:
    the model must recall the value of a key it saw at least ``gap`` tokens earlier.
    """
    num_pairs = int(checked_number("num_pairs", num_pairs, int, RECALL_PAIRS_BOUNDS))
    gap = int(checked_number("gap", gap, int, RECALL_GAP_BOUNDS))
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
