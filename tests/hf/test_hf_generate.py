"""generate() through innerloop's recurrent state: innerloop's own greedy tokens, memory that does not
grow with the tokens generated, and GenerationMixin's options (top-p, repetition penalty, stopping
criteria, streamers)."""

from __future__ import annotations

import pytest
import torch
from hf_testing import tiny_hf_model
from memory_testing import live_tensor_bytes
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from innerloop.models import generate as innerloop_generate

PROMPT = torch.tensor([list(b"def f(x):\n")])


def greedy(model, prompt: torch.Tensor, tokens: int, **options) -> list[int]:
    """The tokens HF greedy decoding appends to ``prompt``."""
    out = model.generate(prompt, max_new_tokens=tokens, do_sample=False, **options)
    return out[0, prompt.shape[1] :].tolist()


@pytest.mark.parametrize("kind", ["ttt_linear", "ttt_mlp_mamba_untied", "swa", "attention", "e2e"])
def test_greedy_tokens_are_innerloops_own(kind: str) -> None:
    model = tiny_hf_model(kind)
    expected = [int(t) for t, _ in innerloop_generate(model.model, PROMPT, 24, temperature=0)]
    assert greedy(model, PROMPT, 24) == expected


@pytest.mark.parametrize(
    "options",
    [{"use_cache": False}, {"attention_mask": torch.ones_like(PROMPT)}],
    ids=["without_cache", "with_a_mask_of_ones"],
)
def test_greedy_tokens_without_the_cache_or_with_a_mask_are_the_same(options: dict) -> None:
    model = tiny_hf_model("swa")
    expected = [int(t) for t, _ in innerloop_generate(model.model, PROMPT, 10, temperature=0)]
    assert greedy(model, PROMPT, 10, **options) == expected


def test_a_batch_of_prompts_of_one_length_decodes_each_row() -> None:
    model = tiny_hf_model("ttt_linear")
    prompts = torch.cat((PROMPT, torch.tensor([list(b"import os")[:9] + [10]])))
    rows = model.generate(prompts, max_new_tokens=8, do_sample=False)[:, prompts.shape[1] :]
    for row, prompt in zip(rows.tolist(), prompts, strict=True):
        assert row == greedy(model, prompt[None], 8)


class MeasureAt(StoppingCriteria):
    """Never stops; records the live tensor bytes when the sequence reaches each given length."""

    def __init__(self, lengths: set[int]):
        self.lengths = lengths
        self.live: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if input_ids.shape[1] in self.lengths:
            self.live[input_ids.shape[1]] = live_tensor_bytes()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def growth_per_token(kind: str, early: int = 40, late: int = 240) -> float:
    """Live tensor bytes gained per generated token between the ``early``-th and ``late``-th token."""
    model = tiny_hf_model(kind)
    start = PROMPT.shape[1]
    measure = MeasureAt({start + early, start + late})
    model.generate(
        PROMPT,
        max_new_tokens=late,
        do_sample=True,
        top_k=0,
        stopping_criteria=StoppingCriteriaList([measure]),
    )
    return (measure.live[start + late] - measure.live[start + early]) / (late - early)


# generate() keeps the token ids it returns (int64, 8 bytes a token) and an attention mask (8 bytes);
# anything else that grows is the model's memory.
KEPT_PER_TOKEN = 16


@pytest.mark.slow  # ~10 s: 240 tokens per model, with a walk of every live tensor
@pytest.mark.parametrize("kind", ["ttt_linear", "swa", "e2e"])
def test_memory_does_not_grow_with_generated_tokens(kind: str) -> None:
    assert growth_per_token(kind) <= KEPT_PER_TOKEN


@pytest.mark.slow  # ~5 s: the control of the test above
def test_the_measurement_sees_a_growing_cache() -> None:
    # Full attention keeps every key and value (2 x layers x hidden floats a token): it must show.
    assert growth_per_token("attention") > 2 * 2 * 32 * 4


def test_the_cache_has_the_same_size_after_more_tokens() -> None:
    model = tiny_hf_model("ttt_linear")
    sizes = [
        model.generate(PROMPT, max_new_tokens=n, do_sample=False, return_dict_in_generate=True).cache.nbytes()
        for n in (5, 60)
    ]
    assert sizes[0] == sizes[1] > 0


def nucleus(probabilities: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches ``top_p`` (ties aside)."""
    ordered, indices = probabilities.sort(descending=True)
    before = ordered.cumsum(0) - ordered  # mass of the more likely tokens
    return set(indices[before < top_p].tolist())


def sampled_outside_nucleus(model, top_p: float, sample_top_p: float) -> int:
    """How many of 60 tokens sampled with ``sample_top_p`` fall outside the ``top_p`` nucleus."""
    torch.manual_seed(3)
    out = model.generate(PROMPT, max_new_tokens=60, do_sample=True, top_p=sample_top_p, top_k=0)
    with torch.no_grad():
        logits = model(out[:, :-1]).logits[0, PROMPT.shape[1] - 1 :]  # [60, V]: the step's distribution
    tokens = out[0, PROMPT.shape[1] :].tolist()
    return sum(
        t not in nucleus(torch.softmax(step, -1), top_p) for t, step in zip(tokens, logits, strict=True)
    )


def test_top_p_samples_only_from_the_nucleus() -> None:
    model = tiny_hf_model("ttt_linear")
    assert sampled_outside_nucleus(model, 0.3, sample_top_p=0.3) == 0
    assert sampled_outside_nucleus(model, 0.3, sample_top_p=1.0) > 10  # the check can fail


def test_sampling_is_reproducible_from_the_seed() -> None:
    model = tiny_hf_model("swa")
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(model.generate(PROMPT, max_new_tokens=20, do_sample=True, top_p=0.9).tolist())
    assert runs[0] == runs[1]


def test_a_large_repetition_penalty_repeats_no_token() -> None:
    model = tiny_hf_model("ttt_linear")
    plain = greedy(model, PROMPT, 30)
    assert len(set(plain)) < len(plain)  # this tiny model repeats itself when greedy
    penalised = greedy(model, PROMPT, 30, repetition_penalty=1e4)
    assert len(set(penalised)) == len(penalised)
    assert not set(penalised) & set(PROMPT[0].tolist())


def test_stopping_criteria_and_eos_stop_generation() -> None:
    model = tiny_hf_model("ttt_linear")
    plain = greedy(model, PROMPT, 20)

    class StopAtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= PROMPT.shape[1] + 5)

    stopped = greedy(model, PROMPT, 20, stopping_criteria=StoppingCriteriaList([StopAtLength()]))
    assert stopped == plain[:5]
    eos = plain[6]
    assert greedy(model, PROMPT, 20, eos_token_id=eos, pad_token_id=0) == plain[: plain.index(eos) + 1]


def test_a_streamer_receives_the_prompt_then_each_token() -> None:
    class Collect(BaseStreamer):
        def __init__(self):
            self.received: list = []

        def put(self, value: torch.Tensor) -> None:
            self.received.append(value.tolist())

        def end(self) -> None:
            self.received.append("end")

    model = tiny_hf_model("e2e")
    streamer = Collect()
    out = model.generate(PROMPT, max_new_tokens=6, do_sample=False, streamer=streamer)
    assert streamer.received[0] == PROMPT.tolist()
    assert [token for [token] in streamer.received[1:-1]] == out[0, PROMPT.shape[1] :].tolist()
    assert streamer.received[-1] == "end"


def test_beam_search_is_refused_with_the_reason() -> None:
    model = tiny_hf_model("swa")
    with pytest.raises(ValueError, match="beam search is not supported by innerloop models"):
        model.generate(PROMPT, max_new_tokens=3, num_beams=2)


def test_left_padded_prompts_are_refused() -> None:
    model = tiny_hf_model("swa")
    prompts = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="left padding"):
        model.generate(prompts, attention_mask=mask, max_new_tokens=3, pad_token_id=0)
