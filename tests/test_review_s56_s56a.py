"""Review s56a of s55's per-row non-finite errors in transformers' generate(): the error names the
prompts a caller passed (transformers' rows count beams and returned sequences), and a row that any
stopping criterion has finished (stop_strings, a custom StoppingCriteria, as an end-of-sequence id
already was) is not refused when its discarded scores go NaN."""

from __future__ import annotations

import pytest
import torch

from innerloop.core import NonFiniteRowsError


def _nan_rows_when_decoding(model, rows: list[int], from_call: int = 1) -> None:
    """Rows ``rows`` of transformers' batch get NaN final hidden states from the ``from_call``-th decode
    call on (a decode call reads one token per row)."""
    calls = []

    def hook(module, inputs, output):
        if inputs[0].shape[1] == 1:
            calls.append(1)
            if len(calls) >= from_call:
                output = output.clone()
                output[rows] = float("nan")
        return output

    model.model.norm.register_forward_hook(hook)


@pytest.mark.slow  # transformers' beam search on a tiny TTT model (~0.4 s)
@pytest.mark.parametrize(("beams", "returned"), [(2, 1), (3, 2)])
def test_hf_beam_search_error_names_the_prompts_passed(beams, returned) -> None:
    """A beam search's NonFiniteRowsError named transformers' rows (prompt * num_beams + beam): a prompt
    1 of 2 broken at 2 beams was 'rows [2, 3]', finite_rows [0, 1], indices a caller cannot drop from
    the prompts it passed. rows / finite_rows are now the prompts, the message names the beams."""
    pytest.importorskip("transformers")
    from tests.hf.hf_testing import tiny_hf_model

    model = tiny_hf_model("ttt_linear")
    ids = torch.randint(5, 50, (2, 4))
    _nan_rows_when_decoding(model, [beams, beams + 1])  # prompt 1's first two beams
    with pytest.raises(NonFiniteRowsError) as caught:
        model.generate(ids, max_new_tokens=3, num_beams=beams, num_return_sequences=returned, pad_token_id=0)
    assert caught.value.rows == [1] and caught.value.finite_rows == [0]
    said = str(caught.value)
    assert "prompts [1] of 2" in said and f"prompt 1 beams [0, 1] of {beams}" in said, said


@pytest.mark.slow  # transformers' sampling on a tiny TTT model (~0.3 s)
def test_hf_sampling_with_returned_sequences_error_names_the_prompts_passed() -> None:
    """num_return_sequences=2 runs each prompt twice: rows [1] of transformers' 4 is prompt 0's second
    returned sequence."""
    pytest.importorskip("transformers")
    from tests.hf.hf_testing import tiny_hf_model

    model = tiny_hf_model("ttt_linear")
    _nan_rows_when_decoding(model, [1])
    with pytest.raises(NonFiniteRowsError) as caught:
        model.generate(
            torch.randint(5, 50, (2, 4)),
            max_new_tokens=3,
            do_sample=True,
            num_return_sequences=2,
            pad_token_id=0,
        )
    assert caught.value.rows == [0] and caught.value.finite_rows == [1]
    assert "prompts [0] of 2" in str(caught.value) and "prompt 0 sequences [1] of 2" in str(caught.value)


class _StopRow0AfterOneToken:
    """A custom stopping criterion: row 0 is done once it has one generated token."""

    def __init__(self, prompt_length: int) -> None:
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done[0] = input_ids.shape[1] > self.prompt_length
        return done


@pytest.mark.slow  # transformers' generate on a tiny TTT model, three runs (~0.6 s)
@pytest.mark.parametrize("eos", [False, True])
@pytest.mark.parametrize("sample", [False, True])
def test_hf_generate_does_not_refuse_a_row_a_stopping_criterion_finished(eos, sample) -> None:
    """Only rows that had generated an end-of-sequence id were left out of the check: a row finished by
    a custom StoppingCriteria (or stop_strings) whose discarded scores went NaN refused the whole batch,
    losing the running rows' tokens. Every stop reason is now told alike (transformers' own
    unfinished_sequences); a running row's NaN is still refused."""
    pytest.importorskip("transformers")
    from transformers import StoppingCriteriaList

    from tests.hf.hf_testing import tiny_hf_model

    model = tiny_hf_model("ttt_linear")
    ids = torch.randint(5, 50, (2, 4))
    mode = {"do_sample": True, "top_k": 1} if sample else {"do_sample": False}
    stops = {"eos_token_id": 99} if eos else {}  # 99: never generated here; with it, finished rows get pad
    reference = model.generate(ids, max_new_tokens=4, pad_token_id=0, **mode)
    stop = StoppingCriteriaList([_StopRow0AfterOneToken(ids.shape[1])])
    _nan_rows_when_decoding(model, [0], from_call=1)  # row 0's scores NaN from its 2nd token on
    out = model.generate(ids, max_new_tokens=4, pad_token_id=0, stopping_criteria=stop, **mode, **stops)
    assert torch.equal(out[1], reference[1])
    assert out[0, 4] == reference[0, 4]
    if eos:
        assert out[0, 5:].tolist() == [0, 0, 0]
    with pytest.raises(NonFiniteRowsError) as caught:  # without the criterion row 0 is running
        model.generate(ids, max_new_tokens=4, pad_token_id=0, **mode, **stops)
    assert caught.value.rows == [0] and caught.value.finite_rows == [1]


def test_two_threads_setting_up_generate_on_one_model_keep_their_own_scores_checks() -> None:
    # The check _get_logits_processor made was held on the model until _get_stopping_criteria took it:
    # a second thread's generate() setting up between the two took the first's check (and the first got
    # none), so stops were recorded into another call's check. Held per thread now.
    import threading

    from transformers import GenerationConfig, StoppingCriteriaList

    from innerloop.hf.modeling import StopsRecorded
    from tests.hf.hf_testing import tiny_hf_model

    model = tiny_hf_model("ttt_linear")
    config = GenerationConfig(max_new_tokens=2, eos_token_id=1, num_beams=1)
    model._prepare_special_tokens(config)  # as generate() does before it sets up processors and criteria
    prompts = torch.ones(1, 3, dtype=torch.int64)

    def set_up() -> tuple:
        processors = model._get_logits_processor(config, input_ids_seq_length=3, encoder_input_ids=prompts)
        return processors[0], model._get_stopping_criteria(config, StoppingCriteriaList())

    first_check = model._get_logits_processor(config, input_ids_seq_length=3, encoder_input_ids=prompts)[0]
    other: list = []
    thread = threading.Thread(target=lambda: other.append(set_up()))
    thread.start()
    thread.join()
    criteria = model._get_stopping_criteria(config, StoppingCriteriaList())
    other_check, other_criteria = other[0]
    assert isinstance(criteria, StopsRecorded) and criteria.check is first_check
    assert isinstance(other_criteria, StopsRecorded) and other_criteria.check is other_check
