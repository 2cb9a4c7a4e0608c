"""Review s53g: constant-memory decoding at inputs nobody tried (generate, caches, sampling, memory).

- ``innerloop generate`` with a tokenizer (``cli._generate_tokens``) kept every id read and sampled (the
  prompt's too) in a list and decoded the whole list again at each token: memory and time per token
  grew with the text, on the path the docs call constant-memory. The text is now decoded over a window of
  a few ids (the last printed piece as context, then the ids not yet printed).
- Hugging Face ``generate(do_sample=True)`` took ``temperature=inf`` (every token equally likely, where
  ``innerloop.models.generate`` and ``innerloop generate`` refuse a temperature that is not finite) and
  ``top_p=nan`` or ``top_p > 1`` (no token cut, without a word; transformers' own check of top_p, [0, 1],
  runs only for a top_p below 1). Both are refused now, naming the setting, the value and the range.
"""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from innerloop import cli


class _Utf8Bytes:
    """A tokenizer whose ids are bytes (a character of several bytes spans several ids), counting how
    many ids each ``decode`` call reads."""

    eos_id = None
    vocab_size = 256

    def __init__(self, prompt: bytes) -> None:
        self.prompt = prompt
        self.decoded_lengths: list[int] = []

    def encode(self, text: str) -> list[int]:
        return list(self.prompt)

    def decode(self, ids: list[int]) -> str:
        self.decoded_lengths.append(len(ids))
        return bytes(ids).decode("utf-8", errors="replace")


def _run_cli_tokens(monkeypatch, tokenizer, sampled_ids: list[int]) -> None:
    import innerloop.models

    def sampled(model, prompt_ids, steps, temperature, top_k, generator, eos_token_id=None, top_p=None):
        yield from ((torch.tensor([token]), None) for token in sampled_ids)

    monkeypatch.setattr(innerloop.models, "generate", sampled)
    args = argparse.Namespace(
        prompt="x", tokens=len(sampled_ids), temperature=0.0, top_k=None, top_p=None, seed=0, ignore_eos=False
    )
    model = argparse.Namespace(config=argparse.Namespace(vocab_size=256))
    assert cli._generate_tokens(args, model, tokenizer) == 0


def test_cli_generate_with_a_tokenizer_decodes_a_window_not_the_whole_text(monkeypatch, capsys) -> None:
    """Seen failing: each token's decode read every id so far (1,000 prompt ids + up to 600 sampled: the
    last decode read 1,600 ids), so memory and time per token grew with the text. Now no decode after the
    prompt reads more than a few ids, and the text printed is the whole decode, multi-byte characters
    (split over ids) and an invalid byte (printed as U+FFFD) included."""
    prompt = ("é" * 500).encode()  # 1,000 ids
    text = ("ab€c" * 100).encode() + b"\xff" + ("d😀" * 20).encode()
    tokenizer = _Utf8Bytes(prompt)
    _run_cli_tokens(monkeypatch, tokenizer, list(text))
    assert capsys.readouterr().out == (prompt + text).decode("utf-8", errors="replace") + "\n"
    after_the_prompt = tokenizer.decoded_lengths[2:]  # the prompt is decoded whole once (with its context)
    assert max(after_the_prompt) <= 8, max(after_the_prompt)


class _Words:
    """A tokenizer of words whose decode puts a space between two words (none before the first), as a
    SentencePiece tokenizer drops the leading space of its text: a piece's text depends on the id before."""

    eos_id = None
    vocab_size = 5
    words = ("zero", "one", "two", "three", "four")

    def encode(self, text: str) -> list[int]:
        return [1, 2]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


def test_cli_generate_text_of_a_tokenizer_that_reads_context_is_the_whole_decode(monkeypatch, capsys) -> None:
    """The window keeps the last ids printed as context: each word after the first is printed with its
    space, as decoding the whole text gives it (an id past the vocabulary printed as ``[token N]``; the
    words after it keep theirs too, s54m: the window restarted without context there, dropping it)."""
    sampled = [3, 4, 0, 0, 1, 2, 3, 4] * 5 + [9, 2, 3]
    _run_cli_tokens(monkeypatch, _Words(), sampled)
    whole = " ".join(_Words.words[i] for i in [1, 2, *sampled[:40]])
    assert capsys.readouterr().out == whole + "[token 9] two three\n"


@pytest.mark.parametrize(
    ("setting", "value", "valid"),
    [
        ("temperature", float("inf"), "a finite real number > 0"),
        ("top_p", float("nan"), "a number in [0, 1]"),
        ("top_p", 1.5, "a number in [0, 1]"),
    ],
)
def test_hf_generate_refuses_sampling_values_that_sample_another_way(tiny_hf_model, setting, value, valid):
    """Seen failing: each ran without a word (temperature=inf sampled every token alike; top_p=nan and
    1.5 cut no token). Refused before anything runs, naming the setting, its value and what is valid."""
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=re.escape(f"{setting}={value}): {setting} must be {valid}")):
        tiny_hf_model.generate(ids, max_new_tokens=2, do_sample=True, pad_token_id=0, **{setting: value})


@pytest.mark.slow  # six short generate() calls: about 2 s on a loaded CPU
def test_hf_generate_still_takes_the_edges_of_the_sampling_ranges(tiny_hf_model) -> None:
    """top_p 0 and 1, a large finite temperature and greedy decoding with a temperature set (unread) run."""
    ids = torch.tensor([[1, 2, 3]])
    for settings in ({"top_p": 0.0}, {"top_p": 1.0}, {"temperature": 1e30}):
        out = tiny_hf_model.generate(ids, max_new_tokens=2, do_sample=True, pad_token_id=0, **settings)
        assert out.shape == (1, 5)
    greedy = tiny_hf_model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, temperature=None)
    assert greedy.shape == (1, 5)
