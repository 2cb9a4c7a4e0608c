"""Review s30d: generation and decoding as a product, against independent oracles.

- ``sample_next``'s distribution against transformers' own logits warpers (``TemperatureLogitsWarper``,
  ``TopKLogitsWarper``) on the same logits (no ties at the top-k cut, where innerloop documents that it
  keeps exactly k), and a chi-square test of seeded draws against that distribution.
- transformers' ``generate()`` on a batch that stops rows at ``eos_token_id`` without a ``pad_token_id``:
  transformers pads the rows that ended with the first end-of-sequence id, and one outside the
  vocabulary was read as a token mid-generation, failing with an error that blamed ``input_ids``.
- ``innerloop generate`` and the export's tokenizer read a prompt into different ids when the
  tokenizer's template adds a start token (xfail: which of the two is right depends on how the model
  was trained).
"""

from __future__ import annotations

import math

import pytest
import torch
from tokenizer_testing import bos_tokenizer_json, export_a_checkpoint_with_a_bos_tokenizer

from innerloop.models import sample_next

transformers = pytest.importorskip(
    "transformers", reason="the oracles are transformers' warpers (in the test extra)"
)


def drawn_probabilities(
    monkeypatch, logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None = None
):
    """The probabilities ``sample_next`` hands to ``torch.multinomial`` (None if it draws none: greedy)."""
    seen = []
    multinomial = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.detach().clone())
        return multinomial(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    sample_next(logits, temperature, top_k, torch.Generator().manual_seed(0), top_p=top_p)
    monkeypatch.setattr(torch, "multinomial", multinomial)
    return seen[0].double() if seen else None


def warped_probabilities(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None = None
) -> torch.Tensor:
    """transformers' sampling distribution: its temperature, then its top-k and top-p warpers (in the
    order its ``generate`` applies them), then softmax."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, logits.double())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.softmax(scores, dim=-1)


SPREAD = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 3
MASKED = torch.tensor([[1.0, float("-inf"), 0.5, float("-inf"), -2.0]])


@pytest.mark.parametrize(
    ("logits", "temperature", "top_k"),
    [
        (SPREAD, 1.0, None),
        (SPREAD, 0.5, 5),
        (SPREAD, 2.0, 49),
        (SPREAD, 1.0, 50),  # top_k = the vocabulary
        (SPREAD, 1.0, 1000),  # top_k past the vocabulary
        (SPREAD, 1e-3, None),  # tiny temperature
        (SPREAD, 1e4, None),  # huge temperature: nearly uniform
        (SPREAD.double(), 0.01, 3),
        (SPREAD.bfloat16(), 0.7, 10),
        (MASKED, 1.0, None),  # -inf logits are never drawn
        (MASKED, 1.0, 4),  # top_k past the finite logits
        (MASKED, 0.3, 2),
        (torch.tensor([[0.3]]), 1.0, 5),  # a vocabulary of one token
        (torch.tensor([[0.3, 0.3], [5.0, -5.0]]), 1.0, None),  # of two
        (torch.tensor([[0.3, 0.3], [5.0, -5.0]]), 1e30, None),
    ],
)
def test_sample_next_draws_from_transformers_warped_distribution(
    monkeypatch, logits: torch.Tensor, temperature: float, top_k: int | None
) -> None:
    ours = drawn_probabilities(monkeypatch, logits, temperature, top_k)
    theirs = warped_probabilities(logits, temperature, top_k)
    assert ours is not None and ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-6
    assert bool((ours[theirs == 0] == 0).all())


@pytest.mark.parametrize(
    ("logits", "temperature", "top_k", "top_p"),
    [
        (SPREAD, 1.0, None, 0.9),
        (SPREAD, 0.5, None, 0.5),
        (SPREAD, 2.0, 10, 0.8),  # top-k first, then the nucleus of what it kept
        (SPREAD, 1.0, None, 0.0),  # the most likely token alone
        (SPREAD, 1.0, None, 1.0),  # no cut
        (SPREAD, 1e4, None, 0.3),  # nearly uniform: about 30% of the tokens
        (SPREAD.bfloat16(), 0.7, None, 0.95),
        (MASKED, 1.0, None, 0.99),  # -inf logits are never drawn
        (torch.tensor([[0.3]]), 1.0, None, 0.1),  # a vocabulary of one token
    ],
)
def test_top_p_draws_from_transformers_nucleus(
    monkeypatch, logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float
) -> None:
    ours = drawn_probabilities(monkeypatch, logits, temperature, top_k, top_p)
    theirs = warped_probabilities(logits, temperature, top_k, top_p)
    assert ours is not None and ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-6
    assert torch.equal(ours == 0, theirs == 0)  # the same tokens cut


def test_seeded_draws_pass_a_chi_square_test_against_transformers_distribution() -> None:
    # 100,000 draws of one row with two masked tokens, at T=0.6 and top_k=8 (7 degrees of freedom):
    # the statistic measured 9.0; the 0.999 quantile of chi-square(7) is 24.3.
    logits = torch.randn(30, generator=torch.Generator().manual_seed(7)) * 2
    logits[[3, 11]] = float("-inf")
    draws = sample_next(logits.expand(100_000, 30).contiguous(), 0.6, 8, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=30).double()
    expected = warped_probabilities(logits[None], 0.6, 8)[0] * draws.numel()
    support = expected > 0
    assert int(support.sum()) == 8 and counts[~support].sum() == 0
    statistic = ((counts[support] - expected[support]) ** 2 / expected[support]).sum().item()
    assert math.isfinite(statistic) and statistic < 24.3


def test_greedy_is_transformers_argmax_on_ties() -> None:
    # temperature 0: the first of tied maxima, as transformers' greedy search (argmax) picks it.
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits, 0.0, None, None).tolist() == [1, 0]


@pytest.fixture(scope="module")
def tiny_hf():
    """Built in setup: the first generate() imports much of transformers (about 1.5 s)."""
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    torch.manual_seed(0)
    model = InnerloopForCausalLM(InnerloopConfig(model={"hidden_size": 32, "num_heads": 2})).eval()
    with torch.no_grad():  # spread the logits: row 0 below repeats one token at once
        model.model.lm_head.weight.mul_(5.0)
        model.generate(torch.tensor([[1]]), max_new_tokens=1, do_sample=False)
    return model


def test_a_missing_pad_token_id_that_defaults_to_an_eos_outside_the_vocabulary_is_named(tiny_hf) -> None:
    """review s30d (LOW): with eos_token_id=[256, x] and no pad_token_id, transformers pads the rows that
    ended with 256 (its first eos id), past the byte-level vocabulary. The batch ran until a row ended,
    then failed inside forward with "input_ids holds token id 256 ... give prefix_token_id=10", an id the
    caller never put in input_ids; the docs promise an out-of-vocabulary pad is refused, by name, before
    anything is generated. The default pad is checked as an explicit one is now."""
    model = tiny_hf
    ids = torch.tensor([[1, 2, 3], [6, 7, 8]])
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=4, do_sample=False)
    eos = int(greedy[0, 3])
    assert eos not in greedy[1, 3:].tolist()  # row 0 ends at once, row 1 goes on
    with pytest.raises(
        ValueError, match=r"no pad_token_id, .*first eos_token_id, 256, outside .*pad_token_id=0"
    ):
        model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=[256, eos])
    with torch.no_grad():  # an eos id the model never produces ends no row: nothing is padded
        out = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=[256])
        padded = model.generate(
            ids, max_new_tokens=4, do_sample=False, eos_token_id=[256, eos], pad_token_id=0
        )
    assert torch.equal(out, greedy)
    assert torch.equal(padded[1], greedy[1]) and padded[0, 3:].tolist() == [eos, 0, 0, 0]


@pytest.mark.slow  # ~0.5 s: trains a tokenizer, exports a model
def test_innerloop_generate_and_the_exports_tokenizer_read_one_prompt_alike(tmp_path) -> None:
    from transformers import AutoTokenizer

    from innerloop.checkpoints import checkpoint_tokenizer

    checkpoint, _, _ = export_a_checkpoint_with_a_bos_tokenizer(tmp_path)
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    # the ids `innerloop generate --prompt "def f"` feeds the model (cli._generate_tokens) and those the
    # export's tokenizer gives model.generate(): [276, 272] against [0, 276, 272] (the start token)
    # (and a special token's text, "</s>", as text, not as the token: split_special_tokens)
    for prompt in ("def f", "def f</s>x"):
        assert checkpoint_tokenizer(checkpoint).encode(prompt) == exported(prompt).input_ids


def test_a_saved_tokenizer_drops_template_tokens_inside_a_sequence_and_keeps_the_rest() -> None:
    """A Sequence post-processor (ByteLevel offsets, then a start-token template) loses the template only;
    a tokenizer.json without a template is written byte for byte as it is."""
    import json

    from tokenizers import Tokenizer, processors

    from innerloop.data.tokenizer import without_template_tokens

    plain = bos_tokenizer_json()
    tokenizer = Tokenizer.from_str(plain)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=True),
            processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)]),
        ]
    )
    saved = Tokenizer.from_str(without_template_tokens(tokenizer.to_str()))
    assert tokenizer.encode("def f").ids[0] == 0  # the template's start token
    assert saved.encode("def f").ids == tokenizer.encode("def f", add_special_tokens=False).ids
    assert [p["type"] for p in json.loads(saved.to_str())["post_processor"]["processors"]] == ["ByteLevel"]
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    without_template = tokenizer.to_str()
    assert without_template_tokens(without_template) is without_template
