"""Edge cases of sampling: ties at the top-k cut, no tokens asked for, logits that are not finite."""

from __future__ import annotations

import pytest
import torch

from innerloop.models import CausalLM, ModelConfig, generate, sample_next


def tiny() -> CausalLM:
    torch.manual_seed(0)
    config = ModelConfig(mixer="ttt", hidden_size=32, num_layers=2, num_heads=2)
    return CausalLM(config).eval()


def draws(logits: torch.Tensor, top_k: int | None, count: int) -> set[int]:
    generator = torch.Generator().manual_seed(0)
    return {t for _ in range(count) for t in sample_next(logits, 1.0, top_k, generator).tolist()}


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_keeps_exactly_k_tokens_when_logits_tie(top_k: int) -> None:
    # All 64 logits tie with the k-th: a threshold would keep all 64; topk's indices keep k.
    drawn = draws(torch.zeros(1, 64), top_k, 300)
    assert len(drawn) == top_k


def test_top_k_with_bfloat16_ties_at_the_cut() -> None:
    logits = torch.full((1, 32), -5.0)
    logits[0, [3, 7, 11]] = 2.0  # three tokens tie for the second place behind token 20
    logits[0, 20] = 3.0
    drawn = draws(logits.bfloat16(), 2, 400)
    assert 20 in drawn and len(drawn) == 2 and drawn <= {3, 7, 11, 20}


def test_top_k_still_never_draws_masked_tokens() -> None:
    logits = torch.randn(2, 64)
    logits[:, 10:] = float("-inf")  # a masked vocabulary: fewer finite logits than top_k
    for top_k in (None, 5, 20):
        assert max(draws(logits, top_k, 100)) < 10


def test_max_new_tokens_zero_does_not_run_the_model() -> None:
    calls = []
    model = tiny()
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    assert list(generate(model, torch.tensor([[1, 2, 3]]), 0)) == []
    assert not calls  # the prompt was not read: nothing samples after it


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_from_the_model_are_refused_naming_the_step(temperature: float, bad: float) -> None:
    model = tiny()
    calls = []

    def poison(_module, _args, output):  # the third call (step 2) returns NaN / inf in row 1
        calls.append(1)
        logits, state = output
        if len(calls) == 3:
            logits = logits.clone()
            logits[1, -1, 5] = bad
        return logits, state

    model.register_forward_hook(poison)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    tokens = generate(model, prompt, 5, temperature=temperature, top_k=None)
    got = []
    with pytest.raises(ValueError, match=r"non-finite logits at step 2 .*in rows \[1\]"):
        for token, _state in tokens:
            got.append(token)
    assert len(got) == 2  # the tokens before the bad step were yielded


def test_a_row_with_every_logit_minus_inf_is_refused() -> None:
    logits = torch.zeros(2, 8)
    logits[0] = float("-inf")
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"not finite in rows \[0\]"):
            sample_next(logits, temperature, None, None)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_next_refuses_nan_logits(temperature: float) -> None:
    logits = torch.zeros(3, 8)
    logits[2, 4] = float("nan")
    with pytest.raises(ValueError, match=r"not finite in rows \[2\]"):
        sample_next(logits, temperature, 3, None)


@pytest.mark.parametrize(
    ("temperature", "top_k", "error", "message"),
    [
        (-1.0, None, ValueError, r"temperature=-1\.0 must be a finite real number >= 0"),
        (float("inf"), None, ValueError, r"temperature=inf must be a finite real number >= 0"),
        (float("nan"), None, ValueError, r"temperature=nan must be a finite real number >= 0"),
        (None, None, TypeError, r"temperature=None \(NoneType\) must be a finite real number"),
        (1.0, 0, ValueError, r"top_k=0 must be an int >= 1, or None"),
        (1.0, -1, ValueError, r"top_k=-1 must be an int >= 1, or None"),
        (1.0, 2.0, TypeError, r"top_k=2\.0 \(float\) must be an int >= 1"),
    ],
)
def test_sample_next_checks_its_arguments_as_generate_does(temperature, top_k, error, message) -> None:
    """A negative temperature drew the least likely token every time, inf drew uniformly."""
    logits = torch.tensor([[10.0, 0.0, -10.0]])
    with pytest.raises(error, match=message):
        sample_next(logits, temperature, top_k, None)
    with pytest.raises(error, match=message):
        next(generate(tiny(), torch.zeros(1, 2, dtype=torch.long), 1, temperature, top_k))


@pytest.mark.parametrize(
    "logits", [torch.zeros(4), torch.zeros(1, 2, 4), torch.zeros(2, 4, dtype=torch.long)]
)
def test_sample_next_takes_only_a_batch_of_float_logits(logits) -> None:
    with pytest.raises(ValueError, match=r"logits must be a floating-point tensor \[batch, vocab\]"):
        sample_next(logits, 1.0, None, None)


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
@pytest.mark.parametrize("mixer", ["ttt", "attention"])
def test_an_empty_input_is_an_empty_piece_not_a_crash_inside_a_block(backbone, mixer) -> None:
    """T = 0 crashed in the pre-conv (mamba) once; now it is an empty piece of a sequence, as in every
    layer and in E2ELM: no logits, the state unchanged (tests/test_review_s49_s49a.py)."""
    model = CausalLM(ModelConfig(mixer=mixer, backbone=backbone, hidden_size=16, num_heads=2)).eval()
    logits, state = model(torch.zeros(2, 0, dtype=torch.long))
    assert logits.shape == (2, 0, model.config.vocab_size) and state.batch_size == 2


def _sampled(model: CausalLM, prompt: torch.Tensor, steps: int, **options) -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [
        token.tolist() for token, _ in generate(model, prompt, steps, 1.0, generator=generator, **options)
    ]


def test_generation_ends_when_every_row_has_sampled_an_end_of_sequence_id() -> None:
    model = tiny()
    prompt = torch.tensor([[1, 2, 3], [7, 8, 9]])
    free = _sampled(model, prompt, 12)  # [step][row]; rows draw independently of each other
    step = next(s for s in range(2, 12) if free[s][0] not in [t[0] for t in free[:s]])
    eos = free[step][0]  # a token the first row samples first at `step`
    row_ends = [next((s for s, tokens in enumerate(free) if tokens[r] == eos), None) for r in (0, 1)]
    ended = _sampled(model, prompt, 12, eos_token_id=eos)
    assert len(ended) == (12 if row_ends[1] is None else max(row_ends) + 1)  # until both rows have ended
    for s, tokens in enumerate(ended):
        assert tokens[0] == (free[s][0] if s <= step else eos)  # an ended row repeats its end
        if row_ends[1] is None or s <= row_ends[1]:
            assert tokens[1] == free[s][1]  # the other row is not changed by the first one's end


def test_any_of_several_end_of_sequence_ids_ends_a_row() -> None:
    model, prompt = tiny(), torch.tensor([[1, 2, 3]])
    free = [t[0] for t in _sampled(model, prompt, 12)]
    step = next(s for s in range(2, 12) if free[s] not in free[:s])
    unseen = next(token for token in range(256) if token not in free)
    assert _sampled(model, prompt, 12, eos_token_id=[unseen, free[step]]) == [[t] for t in free[: step + 1]]


@pytest.mark.parametrize("eos", [-1, 256, 2.0, "2", [], [1, None]])
def test_a_bad_end_of_sequence_id_is_named(eos) -> None:
    with pytest.raises((TypeError, ValueError), match=r"eos_token_id"):
        generate(tiny(), torch.tensor([[1, 2]]), 3, eos_token_id=eos)


@pytest.mark.parametrize(("ignore_eos", "printed"), [(False, "xbcd\n"), (True, "xbcdfe\n")])
def test_the_cli_stops_at_the_tokenizers_end_of_text_unless_told_not_to(
    monkeypatch, capsys, ignore_eos, printed
) -> None:
    import argparse

    import innerloop.models
    from innerloop import cli

    class Letters:  # a tokenizer whose end of text is id 5
        eos_id = 5
        vocab_size = 26

        def encode(self, text: str) -> list[int]:
            return [23, 1, 2]

        def decode(self, ids: list[int]) -> str:
            return "".join(chr(ord("a") + i) for i in ids)

    asked = []

    def sampled(model, prompt_ids, steps, temperature, top_k, generator, eos_token_id=None, top_p=None):
        asked.append(eos_token_id)
        yield from ((torch.tensor([token]), None) for token in (3, 5, 4))

    monkeypatch.setattr(innerloop.models, "generate", sampled)
    args = argparse.Namespace(
        prompt="x", tokens=3, temperature=0.0, top_k=None, top_p=None, seed=0, ignore_eos=ignore_eos
    )
    assert cli._generate_tokens(args, tiny(), Letters()) == 0
    assert capsys.readouterr().out == printed and asked == [None if ignore_eos else 5]


def test_the_cli_prints_an_id_past_the_tokenizers_vocabulary_as_a_token_number(monkeypatch, capsys) -> None:
    """A model whose model.vocab_size was set above its tokenizer's (padded) may sample an id the tokenizer
    has no text for: printed as ``[token N]`` (as the byte-level path does), the text around it kept."""
    import argparse

    import innerloop.models
    from innerloop import cli

    class Letters:  # a tokenizer of 6 letters, a..f
        eos_id = None
        vocab_size = 6

        def encode(self, text: str) -> list[int]:
            return [0, 1]

        def decode(self, ids: list[int]) -> str:
            assert all(0 <= i < self.vocab_size for i in ids), ids
            return "".join(chr(ord("a") + i) for i in ids)

    def sampled(model, prompt_ids, steps, temperature, top_k, generator, eos_token_id=None, top_p=None):
        yield from ((torch.tensor([token]), None) for token in (3, 200, 4, 255))

    monkeypatch.setattr(innerloop.models, "generate", sampled)
    args = argparse.Namespace(
        prompt="x", tokens=4, temperature=0.0, top_k=None, top_p=None, seed=0, ignore_eos=False
    )
    assert cli._generate_tokens(args, tiny(), Letters()) == 0
    assert capsys.readouterr().out == "abd[token 200]e[token 255]\n"


@pytest.mark.parametrize(
    ("top_p", "error", "words"),
    [
        (-0.1, ValueError, "top_p=-0.1 must be a real number in [0, 1]"),
        (1.5, ValueError, "top_p=1.5 must be a real number in [0, 1]"),
        (float("nan"), ValueError, "top_p=nan must be"),
        ("0.5", TypeError, "top_p='0.5' (str)"),
        (True, TypeError, "top_p=True (bool)"),
        (torch.tensor([0.5]), TypeError, "top_p=tensor([0.5000]) (Tensor)"),
    ],
)
def test_a_top_p_outside_0_to_1_is_refused_by_name(top_p, error, words) -> None:
    with pytest.raises(error) as caught:
        sample_next(torch.randn(1, 5), 1.0, None, None, top_p=top_p)
    assert words in str(caught.value)
    with pytest.raises(error) as caught:
        generate(tiny(), torch.zeros(1, 2, dtype=torch.long), 2, top_p=top_p)  # when called, not when read
    assert words in str(caught.value)


def test_top_p_keeps_the_fewest_most_likely_tokens_reaching_it() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05 (sums from the top 0.5, 0.8, 0.95, 1): top_p 0.45 keeps {0},
    # 0.7 {0, 1}, 0.9 {0, 1, 2}, 0.99 all four; a 0-d tensor is taken as its number
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(400, 4)
    for top_p, kept in ((0.45, {0}), (0.7, {0, 1}), (0.9, {0, 1, 2}), (0.99, {0, 1, 2, 3})):
        for given in (top_p, torch.tensor(top_p)):
            drawn = sample_next(logits, 1.0, None, torch.Generator().manual_seed(0), top_p=given)
            assert set(drawn.tolist()) == kept, (top_p, given)


def test_generate_samples_with_top_p() -> None:
    # top_p = 0 keeps each step's most likely token alone: greedy decoding at any temperature
    model, prompt = tiny(), torch.tensor([[1, 2, 3], [4, 5, 6]])
    greedy = torch.stack([t for t, _ in generate(model, prompt, 5, temperature=0)], dim=1)
    nucleus = generate(model, prompt, 5, temperature=3.0, generator=torch.Generator().manual_seed(0), top_p=0)
    assert torch.equal(torch.stack([t for t, _ in nucleus], dim=1), greedy)
