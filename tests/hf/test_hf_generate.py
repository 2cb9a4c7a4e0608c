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


def growth_per_token(kind: str, early: int = 40, late: int = 140) -> float:
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


@pytest.mark.slow  # ~1-2 s a model: 140 tokens, with a walk of every live tensor
@pytest.mark.parametrize("kind", ["ttt_linear", "swa", "e2e"])
def test_memory_does_not_grow_with_generated_tokens(kind: str) -> None:
    assert growth_per_token(kind) <= KEPT_PER_TOKEN


@pytest.mark.slow  # ~10 s: the control of the test above
def test_the_measurement_sees_a_growing_cache() -> None:
    # Full attention keeps every key and value (2 x layers x hidden floats a token): it must show. Its
    # buffers grow in steps (a quarter, at least 256 tokens), so over 560 tokens at least half shows.
    assert growth_per_token("attention", late=600) > 2 * 2 * 32 * 4 / 2


def cache_sizes(kind: str) -> list[int]:
    """The bytes of the cache ``generate()`` returns after 6 and after 62 new tokens: 15 and 71 positions
    read, the same place in TTT-E2E's 4-token chunks (its pending tokens are the same count)."""
    model = tiny_hf_model(kind)
    return [
        model.generate(PROMPT, max_new_tokens=n, do_sample=False, return_dict_in_generate=True).cache.nbytes()
        for n in (6, 62)
    ]


# The live-bytes test above cannot see a sliding window's cache that keeps every key (its first growing
# buffer holds 267 positions, not full by 140 tokens, s58g): the cache's own size does.
@pytest.mark.slow  # two generate() runs of 6 and 62 tokens per model (~0.3-1 s)
@pytest.mark.parametrize("kind", ["ttt_linear", "swa", "e2e"])
def test_the_cache_has_the_same_size_after_more_tokens(kind: str) -> None:
    small, large = cache_sizes(kind)
    assert small == large > 0


@pytest.mark.slow  # the control of the test above: two generate() runs (~0.3-1 s)
def test_the_cache_size_sees_a_cache_that_keeps_every_key() -> None:
    small, large = cache_sizes("attention")  # full attention: every key and value kept
    assert large > small


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


@pytest.mark.slow  # ~0.5 s: many sampled generations
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


def test_left_padded_prompts_are_each_generated_as_alone() -> None:
    model = tiny_hf_model("swa")
    prompts = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    batch = model.generate(prompts, attention_mask=mask, max_new_tokens=3, pad_token_id=0, do_sample=False)
    alone = model.generate(prompts[:1, 2:], max_new_tokens=3, do_sample=False)
    assert batch[0, 4:].tolist() == alone[0, 2:].tolist()  # more in tests/test_review_s47_s47d.py


# --- Reusing a cache in generate() (cache= / past_key_values= / a returned cache) -----------------


def tiny_float64(kind: str):
    """A hidden-16 float64 model of ``kind`` (exact comparisons), built with weights scaled so that
    greedy tokens are well separated."""
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    shapes = {"hidden_size": 16, "num_heads": 2, "num_layers": 2, "intermediate_size": 32, "window": 5}
    extra = {
        "ttt_linear": {"ttt": {"mini_batch_size": 4}},
        "swa": {"mixer": "swa"},
        "attention": {"mixer": "attention"},
        "e2e": {"mixer": "e2e", "e2e": {"chunk_size": 4}},
    }[kind]
    torch.manual_seed(0)
    model = InnerloopForCausalLM(InnerloopConfig(model={**shapes, **extra})).eval().double()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.mul_(5.0)
    return model


IDS = torch.tensor([list(b"abcdefg"), list(b"0123456")])


def logits_seen(model, run) -> torch.Tensor:
    """The last-position logits of every forward ``run()`` makes, ``[B, steps, V]``."""
    seen: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda module, args, out: seen.append(out.logits[:, -1]))
    try:
        run()
    finally:
        hook.remove()
    return torch.stack(seen, dim=1)


@pytest.mark.parametrize("kind", ["ttt_linear", "swa", "attention", "e2e"])
def test_generate_continues_a_cache_exactly(kind: str) -> None:
    model = tiny_float64(kind)
    cache = model(IDS[:, :4]).cache
    out: list[torch.Tensor] = []
    steps = logits_seen(
        model, lambda: out.append(model.generate(IDS, cache=cache, max_new_tokens=5, do_sample=False))
    )
    full = out[0]
    with torch.no_grad():
        expected, _ = model.model(full[:, :-1])  # innerloop's own forward over the whole sequence
    assert (steps - expected[:, IDS.shape[1] - 1 :]).abs().max().item() <= 1e-12
    assert cache.seq_length == 4  # not changed by being continued


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_generate_takes_the_cache_as_past_key_values_too() -> None:
    model = tiny_float64("swa")
    cache = model(IDS[:, :4]).cache
    continued = model.generate(IDS, past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(continued, model.generate(IDS, max_new_tokens=5, do_sample=False))


def test_generate_continues_the_cache_it_returned() -> None:
    model = tiny_float64("swa")
    first = model.generate(IDS, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    more = model.generate(first.sequences, cache=first.cache, max_new_tokens=4, do_sample=False)
    assert torch.equal(more, model.generate(IDS, max_new_tokens=7, do_sample=False))


def test_generate_continues_a_cache_from_the_new_tokens_and_the_whole_mask() -> None:
    model = tiny_float64("ttt_linear")
    cache = model(IDS[:, :4]).cache
    mask = torch.ones_like(IDS)  # longer than the ids: they are the new tokens alone
    new = model.generate(IDS[:, 4:], attention_mask=mask, cache=cache, max_new_tokens=4, do_sample=False)
    whole = model.generate(IDS, max_new_tokens=4, do_sample=False)
    assert torch.equal(new[:, 3:], whole[:, IDS.shape[1] :])


def test_a_cache_the_prompt_does_not_continue_is_refused() -> None:
    model = tiny_float64("swa")
    cache = model(IDS[:, :4]).cache
    for ids in (IDS[:, :4], IDS[:, :3]):
        with pytest.raises(
            ValueError, match=rf"input_ids of {ids.shape[1]} tokens with a cache that has read 4"
        ):
            model.generate(ids, cache=cache, max_new_tokens=2, do_sample=False)
    other = IDS.flip(0)  # the same tokens, in the other rows
    with pytest.raises(ValueError, match="cache that has not read the first 4 tokens of input_ids"):
        model.generate(other, cache=cache, max_new_tokens=2, do_sample=False)


def test_the_cache_tells_generate_what_it_needs() -> None:
    cache = tiny_hf_model("swa")(PROMPT).cache
    assert cache.is_linear == [False]  # generate() then cuts the prompt after what the cache has read
    # beam search reorders it (tests/hf/test_review_s15_beams.py)


# --- Padding in generate() ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mask", "named"),
    [
        ([[1, 1, 1, 1, 1, 0, 0], [1] * 7], r"right padding \(row 0: \[1, 1, 1, 1, 1, 0, 0\]"),
        ([[1, 1, 1, 0, 1, 1, 1], [1] * 7], r"a hole \(row 0: \[1, 1, 1, 0, 1, 1, 1\]"),
        ([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]], r"left padding \(row 0\) and right padding \(row 1"),
    ],
    ids=["right", "hole", "left_and_right"],
)
@pytest.mark.parametrize("use_cache", [True, False])
def test_padding_in_generate_is_refused_naming_it(mask: list, named: str, use_cache: bool) -> None:
    model = tiny_hf_model("swa")
    supported = r"(generate\(\) supports prompts without padding|a batch is either left padded)"
    with pytest.raises(ValueError, match=named + ".*" + supported):
        model.generate(
            IDS, attention_mask=torch.tensor(mask), max_new_tokens=1, pad_token_id=0, use_cache=use_cache
        )


def test_a_pad_token_id_inside_a_prompt_is_a_token_with_a_mask_of_ones() -> None:
    model = tiny_hf_model("ttt_linear")
    prompt = torch.tensor([list(b"a b c d")])  # holds byte 32, a space
    with pytest.raises(
        ValueError, match=r"pad_token_id=32 occurs in input_ids.*attention_mask=torch.ones_like"
    ):
        model.generate(prompt, pad_token_id=32, max_new_tokens=3, do_sample=False)
    ones = torch.ones_like(prompt)
    with_mask = model.generate(
        prompt, attention_mask=ones, pad_token_id=32, max_new_tokens=3, do_sample=False
    )
    assert torch.equal(with_mask, model.generate(prompt, max_new_tokens=3, do_sample=False))
