"""Review s55q of s55a's per-row non-finite errors: transformers' generate() must not refuse a run whose
finite rows are intact because a row that has already ended (its end-of-sequence token generated: what it
decodes next is replaced by the pad token) went NaN."""

from __future__ import annotations

import pytest
import torch

from innerloop.core import NonFiniteRowsError


def _nan_after_row_0_ended(model) -> None:
    """Row 0's final hidden states NaN from the second decoded token's call on (the first decode call
    produced its end-of-sequence token)."""
    calls = []

    def hook(module, inputs, output):
        if inputs[0].shape[1] == 1:
            calls.append(1)
            if len(calls) >= 2:
                output = output.clone()
                output[0] = float("nan")
        return output

    (model.model.norm if hasattr(model, "model") else model.norm).register_forward_hook(hook)


@pytest.mark.slow  # transformers' generate on a tiny TTT model (~0.5 s)
@pytest.mark.parametrize("sample", [False, True])
def test_hf_generate_does_not_refuse_a_run_for_a_row_that_already_ended(sample) -> None:
    """NonFiniteScoresCheck refused every row when a finished row's (discarded) scores went NaN: greedy
    search returned the other rows intact before it. Now the finished row is left out of the check (its
    scores made 0, which transformers replaces by the pad token) and a still-running row is refused."""
    pytest.importorskip("transformers")
    from tests.hf.hf_testing import tiny_hf_model

    model = tiny_hf_model("ttt_linear")
    ids = torch.randint(5, 50, (2, 4))
    reference = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    eos = int(reference[0, 4])  # row 0's first decoded token ends it
    if int(reference[1, 4]) == eos or eos in reference[1, 4:].tolist():
        pytest.skip("row 1 decodes row 0's first token too at this seed")  # not at seed 0
    _nan_after_row_0_ended(model)
    mode = {"do_sample": True, "top_k": 1} if sample else {"do_sample": False}  # sampling's path, the argmax
    out = model.generate(ids, max_new_tokens=4, eos_token_id=eos, pad_token_id=0, **mode)
    assert out[0, 4:].tolist() == [eos, 0, 0, 0]
    assert torch.equal(out[1], reference[1])
    model.model.norm._forward_hooks.clear()
    _nan_after_row_0_ended(model)
    with pytest.raises(NonFiniteRowsError) as caught:  # a row still running is refused, as before
        model.generate(ids, max_new_tokens=4, pad_token_id=0, **mode)
    assert caught.value.rows == [0] and caught.value.finite_rows == [1]


@pytest.mark.slow  # a model built and 12 decode calls (~1.4 s at load 16 on 2 cores)
def test_models_generate_does_not_refuse_a_run_for_a_row_that_already_ended() -> None:
    """innerloop.models.generate refused the batch when a row that had ended (it repeats its
    end-of-sequence id whatever it scores) went NaN; its finite rows are now returned, a running row's
    NaN still refused."""
    from innerloop.models import ModelConfig, build_model
    from innerloop.models.generate import generate

    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=16, num_heads=2, num_layers=1)).eval()
    ids = torch.randint(5, 50, (2, 4))
    reference = torch.stack([t for t, _ in generate(model, ids, 4, top_k=1)], dim=1)
    eos = int(reference[0, 0])
    assert eos not in reference[1].tolist()  # seed 0: row 1 never decodes it
    _nan_after_row_0_ended(model)
    tokens = torch.stack([t for t, _ in generate(model, ids, 4, top_k=1, eos_token_id=eos)], dim=1)
    assert tokens[0].tolist() == [eos] * 4 and torch.equal(tokens[1], reference[1])
    with pytest.raises(NonFiniteRowsError) as caught:
        list(generate(model, ids, 4, top_k=1))
    assert caught.value.rows == [0] and caught.value.finite_rows == [1]


def test_rows_not_told_leave_finite_rows_unset() -> None:
    """with_rows with no row told (no value of one row alone holds NaN or inf) set finite_rows to every
    row, though its message says the rows could not be told and NonFiniteRowsError documents None then:
    a caller rerunning finite_rows reran the broken row too."""
    from innerloop.core.layer import with_rows

    error = with_rows(ValueError("layer produced non-finite outputs"), 3, [], None)
    assert error.rows == [] and error.finite_rows is None
    assert "could not be told" in str(error)
