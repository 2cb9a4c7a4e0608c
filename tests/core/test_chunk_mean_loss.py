"""The official TTT-E2E training loss (``chunk_mean_cross_entropy``) against a transcription of the
official code's formula, and its wiring: the default of an E2E model, the choice ``token_mean``, and a
training step that minimises it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from innerloop.core.functional import chunk_mean_cross_entropy, mean_scored_cross_entropy
from innerloop.models import ModelConfig
from innerloop.models.config import validate_model_config

IGNORE = -100
VOCAB = 7


def official_loss(logits: torch.Tensor, targets: torch.Tensor, chunk: int, skip: int | None) -> float:
    """The official ``MetaModel.loss`` per sequence, row by row: the sequence cut into chunks, each chunk's
    ``cross_entropy_loss_and_accuracy`` (the sum of the masked token losses over ``max(count, 1e-10)``),
    the mean over the chunks; then the mean over the rows that score something (padding is not a row)."""
    row_losses = []
    for row_logits, row_targets in zip(logits, targets, strict=True):
        valid = row_targets != IGNORE
        if skip is not None:
            valid &= row_targets != skip
        if not valid.any():
            continue
        chunk_losses = []
        for start in range(0, row_targets.shape[0], chunk):
            log_probs = torch.log_softmax(row_logits[start : start + chunk], dim=-1)
            these = row_targets[start : start + chunk]
            mask = valid[start : start + chunk]
            token_log_probs = log_probs.gather(-1, these.clamp_min(0)[:, None])[:, 0]
            total = -torch.where(mask, token_log_probs, 0.0).sum()
            chunk_losses.append(float(total) / max(float(mask.sum()), 1e-10))
        row_losses.append(sum(chunk_losses) / len(chunk_losses))
    return sum(row_losses) / len(row_losses) if row_losses else 0.0


# The cases the formula turns on are examples of their own, so that the drawn ones need not find them
# (60 drawn examples took ~0.55 s of CPU: these and 15 drawn, about a third): a row with nothing scored
# beside rows that score (padding, not a sequence), chunks with nothing scored (0 in their row's mean), a
# last chunk cut short, one chunk longer than the sequence, chunks of one token, a skipped target id, and
# a batch with nothing scored at all.
@settings(max_examples=15, deadline=None)
@example(batch=4, tokens=7, chunk=3, skip=None, unscored=0.75, seed=0)
@example(batch=4, tokens=11, chunk=3, skip=2, unscored=0.6, seed=2)
@example(batch=2, tokens=5, chunk=9, skip=3, unscored=0.2, seed=3)
@example(batch=2, tokens=23, chunk=1, skip=0, unscored=0.3, seed=4)
@example(batch=2, tokens=8, chunk=4, skip=None, unscored=1.0, seed=5)
@given(
    batch=st.integers(1, 4),
    tokens=st.integers(1, 23),
    chunk=st.integers(1, 9),
    skip=st.one_of(st.none(), st.integers(0, VOCAB - 1)),
    unscored=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_it_is_the_official_formula(batch, tokens, chunk, skip, unscored, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, tokens, VOCAB, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (batch, tokens), generator=gen)
    targets[torch.rand(batch, tokens, generator=gen) < unscored] = IGNORE
    loss = chunk_mean_cross_entropy(logits, targets, chunk, IGNORE, skip)
    assert float(loss) == pytest.approx(official_loss(logits, targets, chunk, skip), rel=1e-12, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), chunks=st.integers(1, 4), chunk=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_with_every_target_scored_and_whole_chunks_it_is_the_token_mean(batch, chunks, chunk, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, chunks * chunk, VOCAB, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (batch, chunks * chunk), generator=gen)
    chunked = chunk_mean_cross_entropy(logits, targets, chunk, IGNORE)
    assert float(chunked) == pytest.approx(
        float(mean_scored_cross_entropy(logits, targets, IGNORE)), rel=1e-12
    )


def test_a_chunk_with_nothing_scored_counts_as_zero_and_weighs_its_row() -> None:
    """Row 0 scores 2 of 8 targets, both in its first chunk of 4: its loss is that chunk's mean over 2,
    halved (the empty second chunk counts as 0) -- not the plain mean over its 2 scored targets."""
    logits = torch.randn(1, 8, VOCAB, dtype=torch.float64)
    targets = torch.full((1, 8), IGNORE)
    targets[0, :2] = torch.tensor([3, 5])
    per_token = F.cross_entropy(logits[0, :2], targets[0, :2], reduction="none")
    loss = chunk_mean_cross_entropy(logits, targets, 4, IGNORE)
    assert float(loss) == pytest.approx(float(per_token.mean()) / 2, rel=1e-12)


def test_padded_rows_change_neither_the_loss_nor_its_gradient_and_nothing_scored_is_zero() -> None:
    logits = torch.randn(3, 10, VOCAB, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, VOCAB, (3, 10))
    targets[2] = IGNORE
    loss = chunk_mean_cross_entropy(logits, targets, 4, IGNORE)
    (gradient,) = torch.autograd.grad(loss, logits)
    alone = chunk_mean_cross_entropy(logits[:2], targets[:2], 4, IGNORE)
    (gradient_alone,) = torch.autograd.grad(alone, logits)
    assert float(loss.detach()) == pytest.approx(float(alone.detach()), rel=1e-14)
    assert torch.allclose(gradient, gradient_alone, rtol=1e-13, atol=1e-16)
    nothing = chunk_mean_cross_entropy(logits, torch.full((3, 10), IGNORE), 4, IGNORE)
    assert float(nothing.detach()) == 0.0 and nothing.requires_grad
    no_tokens = chunk_mean_cross_entropy(logits[:, :0], torch.full((3, 0), IGNORE), 4, IGNORE)
    assert float(no_tokens.detach()) == 0.0 and no_tokens.requires_grad  # T = 0 scores nothing too, not 0 / 0


def test_a_skipped_target_with_an_infinite_logit_row_stays_finite() -> None:
    """An unscored position's loss is exactly 0 (not ``inf * 0 = nan``), whatever its logits hold."""
    logits = torch.randn(1, 4, VOCAB, dtype=torch.float64)
    logits[0, 1] = torch.tensor([float("-inf")] * VOCAB)
    targets = torch.tensor([[1, 2, 3, 4]])
    loss = chunk_mean_cross_entropy(logits, targets, 2, IGNORE, skip_target_id=2)
    assert torch.isfinite(loss)


def test_it_is_differentiable_in_float64() -> None:
    logits = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, -100, 2, 0, 4, 4, 1], [0, 0, -100, -100, -100, 3, 2]])
    assert torch.autograd.gradcheck(lambda x: chunk_mean_cross_entropy(x, targets, 3, IGNORE, 4), (logits,))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_size": 0}, "chunk_size must be a positive integer, got 0"),
        ({"chunk_size": True}, "chunk_size must be a positive integer, got True"),
        ({"chunk_size": 2.5}, "chunk_size must be a positive integer, got 2.5"),
        (
            {"targets": torch.zeros(2, 5, dtype=torch.long)},
            r"logits must be \[B, T, V\] and targets \[B, T\]",
        ),
    ],
)
def test_bad_arguments_are_named(kwargs, match) -> None:
    arguments = {
        "logits": torch.randn(2, 4, VOCAB),
        "targets": torch.zeros(2, 4, dtype=torch.long),
        "chunk_size": 2,
        "ignore_index": IGNORE,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        chunk_mean_cross_entropy(**arguments)


SMALL_E2E = {
    "mixer": "e2e",
    "vocab_size": VOCAB,
    "hidden_size": 16,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 32,
    "window": 8,
}


def test_an_e2e_model_trains_on_the_official_loss_unless_told_token_mean() -> None:
    from innerloop.train.module import LanguageModelModule

    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 11))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[0, 4:] = IGNORE
    for outer_loss in ("chunk_mean", "token_mean"):
        config = ModelConfig.from_dict({**SMALL_E2E, "e2e": {"chunk_size": 4, "outer_loss": outer_loss}})
        torch.manual_seed(0)
        module = LanguageModelModule(config, lr=1e-3, max_steps=2, warmup_steps=0).double()
        loss = module.training_step((inputs, targets), 0)
        logits = module(inputs)
        if outer_loss == "chunk_mean":
            expected = chunk_mean_cross_entropy(logits, targets, 4, IGNORE)
        else:
            expected = mean_scored_cross_entropy(logits, targets, IGNORE)
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    assert ModelConfig.from_dict(SMALL_E2E).e2e.outer_loss == "chunk_mean"  # the official code's


def test_a_bad_outer_loss_is_named_with_its_choices() -> None:
    with pytest.raises(ValueError, match=r"model\.e2e\.outer_loss.*'chunk_mean'.*'token_mean'"):
        validate_model_config(ModelConfig.from_dict({**SMALL_E2E, "e2e": {"outer_loss": "per_token"}}))
