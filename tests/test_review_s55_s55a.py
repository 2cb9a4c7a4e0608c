"""Review s55a: non-finite checks of a batched call name the rows that went NaN or inf and those that
stayed finite (TTT-E2E's inner loop and a TTT layer's output alike), and leave the state given to the
call unchanged, so a caller can drop the broken rows and run the others again."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from test_review_s54_s54r import _e2e

from innerloop import TTTLayer
from innerloop.core import NonFiniteRowsError
from innerloop.core.family_layers import DeltaNetLayer
from innerloop.models import ModelConfig, NonFiniteInnerStepError, build_model
from innerloop.models.generate import generate
from innerloop.plugins.e2e import NextTokenChunkLoss

BAD_TOKEN = 7  # its embedding is NaN (_nan_embedding): a row holding it goes non-finite


def _nan_embedding(model: torch.nn.Module) -> None:
    """BAD_TOKEN's hidden state NaN (a hook: the embedding is tied to the head, whose NaN row would make
    every row's logits NaN)."""

    def hook(module, inputs, output):
        return output.masked_fill((inputs[0] == BAD_TOKEN)[..., None], float("nan"))

    model.embed.register_forward_hook(hook)


def _ids_with_one_bad_row(batch: int, bad: int, length: int = 16) -> torch.Tensor:
    ids = torch.randint(0, BAD_TOKEN, (batch, length))  # ids below BAD_TOKEN: finite rows
    ids[bad, length // 2] = BAD_TOKEN
    return ids


def _clones(state) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in state.fast.items()} | {
        f"caches.{i}.{part}": getattr(cache, part)[
            ..., : cache.position if hasattr(cache, "position") else None, :
        ].clone()
        for i, cache in enumerate(state.caches)
        if cache is not None
        for part in ("key", "value")
    }


CASES = [(1, 0), (3, 0), (3, 1), (3, 2)]  # (batch, bad row): first, middle, last


@pytest.mark.parametrize(("batch", "bad"), CASES)
def test_e2e_non_finite_error_names_the_broken_and_the_finite_rows(batch, bad) -> None:
    """One sequence's NaN made the whole batched call raise, naming no row: a batched server could not
    tell which sequence to drop."""
    model = _e2e()
    with torch.no_grad():
        _nan_embedding(model)
        with pytest.raises(NonFiniteInnerStepError) as caught:
            model(_ids_with_one_bad_row(batch, bad))
    finite = [row for row in range(batch) if row != bad]
    assert caught.value.rows == [bad] and caught.value.finite_rows == finite
    said = str(caught.value)
    assert f"batch rows [{bad}] of {batch} went non-finite" in said, said
    if finite:
        assert f"rows {finite} stayed finite" in said, said


@pytest.mark.slow  # four calls of the model
@pytest.mark.parametrize(("batch", "bad"), [(3, 0), (3, 2)])
def test_e2e_finite_rows_resume_from_the_unchanged_state_after_the_raise(batch, bad) -> None:
    """The state given to a call that raised is left as it was, so its finite rows (index_select) run
    again exactly as they would have in a batch without the broken row."""
    model = _e2e()
    torch.manual_seed(1)
    ids = torch.randint(0, BAD_TOKEN, (batch, 32))
    with torch.no_grad():
        _nan_embedding(model)
        _, state = model(ids[:, :14])
        before = _clones(state)
        broken = ids[:, 14:].clone()
        broken[bad, 3] = BAD_TOKEN
        with pytest.raises(NonFiniteInnerStepError) as caught:
            model(broken, state)
        after = _clones(state)
        assert all(torch.equal(before[k], after[k]) for k in before)
        rows = torch.tensor(caught.value.finite_rows)
        resumed, _ = model(ids[rows, 14:], state.index_select(rows))
        clean, _ = model(ids[:, 14:], state)
    # float32's default tolerance: a batch of 2 rounds its products otherwise than one of 3 (~1e-7)
    torch.testing.assert_close(resumed, clean[rows])


@pytest.mark.parametrize(("batch", "bad"), CASES)
def test_e2e_fast_weights_carried_non_finite_name_their_row(batch, bad) -> None:
    model = _e2e()
    ids = torch.randint(0, BAD_TOKEN, (batch, 16))
    with torch.no_grad():
        _, state = model(ids[:, :6])
        name = sorted(state.fast)[0]
        state.fast[name] = state.fast[name].clone()
        state.fast[name][bad] = float("inf")
        with pytest.raises(NonFiniteInnerStepError) as caught:
            model(ids[:, 6:], state)
    assert caught.value.rows == [bad], str(caught.value)


@pytest.mark.parametrize(("batch", "bad"), CASES)
def test_ttt_layer_non_finite_output_names_the_broken_and_the_finite_rows(batch, bad) -> None:
    """A TTT layer's output check (finite input, non-finite output or state) named no row either, while
    its input check names the sequences: the same for every mixer now."""
    torch.manual_seed(0)
    layer = TTTLayer(16, 2)
    x = torch.randn(batch, 8, 16)
    _, state = layer(x)
    state.params["W1"] = state.params["W1"].clone()  # a broadcast view of one row: its own rows
    state.params["W1"][bad] = float("nan")
    with pytest.raises(ValueError) as caught:
        layer(x, state)
    finite = [row for row in range(batch) if row != bad]
    assert caught.value.rows == [bad] and caught.value.finite_rows == finite
    assert f"batch rows [{bad}] of {batch} went non-finite" in str(caught.value), str(caught.value)


@pytest.mark.parametrize("mixer", ["ttt", "delta"])
def test_layer_finite_rows_resume_from_the_unchanged_state_after_the_raise(mixer) -> None:
    """What the error and docs/architecture.md promise: the state given to the call that raised is
    unchanged, and its finite rows (index_select) continue as in a batch without the broken row."""
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=4) if mixer == "ttt" else DeltaNetLayer(16, 2)
    x = torch.randn(3, 12, 16)
    _, state = layer(x[:, :6])
    before = {name: tensor.clone() for name, tensor in state.tensors().items()}
    broken = x[:, 6:].clone()
    broken[1, 2] = 3e38  # finite, overflows row 1 only
    with pytest.raises(NonFiniteRowsError) as caught:
        layer(broken, state)
    assert caught.value.rows == [1] and caught.value.finite_rows == [0, 2], str(caught.value)
    assert all(torch.equal(before[k], t) for k, t in state.tensors().items())
    rows = torch.tensor(caught.value.finite_rows)
    resumed, _ = layer(x[rows, 6:], state.index_select(rows))
    torch.testing.assert_close(resumed, layer(x[:, 6:], state)[0][rows])  # float32 default tolerance


@pytest.mark.parametrize(("batch", "bad"), CASES)
def test_layer_input_check_gives_the_rows_as_the_output_check_does(batch, bad) -> None:
    """The input check named the sequences only in words: a caller had to parse the message to drop them."""
    layer = TTTLayer(16, 2)
    x = torch.randn(batch, 4, 16)
    x[bad, 1, 3] = float("nan")
    with pytest.raises(NonFiniteRowsError) as caught:
        layer(x)
    assert caught.value.rows == [bad]
    assert caught.value.finite_rows == [row for row in range(batch) if row != bad]


def _decode_only_call_goes_non_finite(model, scale: float, monkeypatch) -> None:
    """The fast weights a decode call that only scores is given, times ``scale`` (grown without an inner
    step's check seeing it), and that call's logits NaN where its fast weights overflow them."""
    forward = type(model)._suffix

    def scaled(self, h, input_ids, caches, state):
        if state is not None and input_ids.shape[1] == 1 and state.pending.shape[1] >= 1:
            state = replace(state, fast={k: v * scale for k, v in state.fast.items()})
        logits, new_state = forward(self, h, input_ids, caches, state)
        if scale == 1.0 and state is not None and input_ids.shape[1] == 1:
            logits = logits.clone().fill_(float("nan"))  # NaN from elsewhere: the fast weights normal
        return logits, new_state

    monkeypatch.setattr(type(model), "_suffix", scaled)


@pytest.mark.parametrize(("scale", "blamed"), [(1e30, "model.e2e.inner_lr"), (1.0, "optim.lr")])
def test_generate_names_e2e_s_likely_cause_for_a_decode_call_that_only_scores(scale, blamed, monkeypatch):
    """A decode call that only scores (no inner step: TTT-E2E checks nothing there) giving NaN logits got
    generate's general "the model's weights or its state have overflowed or hold NaN", whichever it was.
    It now says the call was not checked and measures the fast weights' growth, as E2E's diagnosis does."""
    model = _e2e()
    _decode_only_call_goes_non_finite(model, scale, monkeypatch)
    ids = torch.randint(0, BAD_TOKEN, (3, 5))  # chunk 1 trained on in the prompt's call, 1 token pending
    with pytest.raises(ValueError) as caught:
        list(generate(model, ids, max_new_tokens=4))
    said = str(caught.value)
    assert "in rows [0, 1, 2]" in said and "only scored" in said and blamed in said, said


@pytest.mark.parametrize(("batch", "bad"), CASES)
@pytest.mark.parametrize("mixer", ["ttt", "gated_deltanet", "titans"])
def test_a_language_model_s_layers_give_the_rows_through_it(mixer, batch, bad) -> None:
    """A CausalLM whose layer refuses one sequence's NaN passes the error on with that row, and its state
    given to the call is left as it was."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(mixer=mixer, hidden_size=16, num_heads=2, num_layers=2)).eval()
    _nan_embedding(model)
    ids = torch.randint(0, BAD_TOKEN, (batch, 12))
    with torch.no_grad():
        _, state = model(ids[:, :6])
        before = [_block_tensors(block) for block in state.blocks]
        broken = ids[:, 6:].clone()
        broken[bad, 2] = BAD_TOKEN
        with pytest.raises(NonFiniteRowsError) as caught:
            model(broken, state)
    assert caught.value.rows == [bad], str(caught.value)
    assert caught.value.finite_rows == [row for row in range(batch) if row != bad]
    after = [_block_tensors(block) for block in state.blocks]
    assert all(
        torch.equal(b, a) for x, y in zip(before, after, strict=True) for b, a in zip(x, y, strict=True)
    )


def _block_tensors(block) -> list[torch.Tensor]:
    """Copies of a block state's tensors: its pre-conv history's and its mixer state's."""
    tensors = [] if block.conv is None else [block.conv]
    tensors += list(block.mixer.tensors().values())
    assert tensors
    return [t.clone() for t in tensors]


class _RowNaNLoss(NextTokenChunkLoss):
    """The built-in chunk loss, NaN for batch row ``row``: a plugin's fault in one sequence."""

    name = "review_s55a_row_nan"

    def __init__(self, row: int) -> None:
        self.row = row

    def chunk_loss(self, logits, input_ids):
        losses = super().chunk_loss(logits, input_ids)
        return losses.index_fill(0, torch.tensor([self.row]), float("nan"))


@pytest.mark.parametrize(("batch", "bad"), CASES)
def test_e2e_a_plugins_nan_in_one_row_names_that_row(batch, bad, monkeypatch) -> None:
    model = _e2e()
    monkeypatch.setattr(model, "inner_loss", _RowNaNLoss(bad))
    with torch.no_grad(), pytest.raises(NonFiniteInnerStepError, match="review_s55a_row_nan") as caught:
        model(torch.randint(0, BAD_TOKEN, (batch, 9)))
    assert caught.value.rows == [bad], str(caught.value)


def test_e2e_diagnosis_reads_the_broken_row_not_a_finite_row_s_grown_weights() -> None:
    """Row 0's fast weights grown 1e5 times (finite logits), row 1's logits NaN with its fast weights as
    the model's: the diagnosis took the largest weight over every row and blamed the inner rate."""
    model = _e2e()
    ids = torch.randint(0, BAD_TOKEN, (2, 12))
    with torch.no_grad():
        _, state = model(ids[:, :6])
        grown = {k: v.clone() for k, v in state.fast.items()}
        for tensor in grown.values():
            tensor[0] *= 1e5
        state = replace(state, fast=grown)
        model.norm.register_forward_hook(
            lambda module, inputs, output: output.index_fill(0, torch.tensor([1]), float("nan"))
        )
        with pytest.raises(NonFiniteInnerStepError) as caught:
            model(ids[:, 6:], state)
    said = str(caught.value)
    assert caught.value.rows == [1], said
    assert "not model.e2e.inner_lr" in said, said


@pytest.mark.parametrize(("batch", "bad"), [(2, 1), (3, 0), (3, 2)])
def test_layer_diagnosis_reads_the_broken_row_not_a_finite_row_s_large_input(batch, bad) -> None:
    """A finite row's large input (7.5e4) put "largest |input| 7.5e+04 ... normalise the input" first in
    the error of another row, whose carried inner weights overflowed on ordinary input."""
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=4)
    _, state = layer(torch.randn(batch, 8, 16))
    state.params["W1"] = state.params["W1"].clone()
    state.params["W1"][bad, :, 0, :] = 3e38  # finite, overflows this row's inner products
    x = torch.randn(batch, 8, 16)
    x[[row for row in range(batch) if row != bad]] *= 2e4
    with pytest.raises(NonFiniteRowsError) as caught:
        layer(x, state)
    said = str(caught.value)
    assert caught.value.rows == [bad], said
    assert caught.value.finite_rows == [row for row in range(batch) if row != bad], said
    assert f"batch rows [{bad}] of {batch} went non-finite" in said, said
    largest = float(re.search(r"largest \|input\| ([0-9.e+-]+)\)", said).group(1))
    assert "normalise the input" not in said and largest < 10, said


@pytest.mark.slow  # transformers' generate on a tiny TTT-E2E model (~1 s)
@pytest.mark.parametrize("sample", [False, True])
def test_hf_generate_refuses_nan_logits_of_a_decode_call_that_only_scores(sample) -> None:
    """transformers' greedy search took the argmax of a NaN row (token 0) and went on: a TTT-E2E decode
    call that only scores is not checked by the model, and nothing else read the scores."""
    pytest.importorskip("transformers")
    from tests.hf.hf_testing import tiny_hf_model

    model = tiny_hf_model("e2e")
    calls = []

    def hook(module, inputs, output):  # the 4th scoring on: the second decoded token's, only scored
        calls.append(1)
        return output.fill_(float("nan")) if len(calls) >= 4 and inputs[0].shape[1] == 1 else output

    model.model.norm.register_forward_hook(hook)
    ids = torch.randint(0, 50, (2, 4))  # a chunk of 4: trained on at the first decoded token's call
    with pytest.raises(NonFiniteRowsError, match="non-finite logits") as caught:
        model.generate(ids, max_new_tokens=3, do_sample=sample)
    assert caught.value.rows == [0, 1]
