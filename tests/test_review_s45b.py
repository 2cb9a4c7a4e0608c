"""Review s45b: the grader of issues 11 (Hugging Face, tokenizers, datasets, evaluation) and 15 (the
official TTT-E2E checkpoints), with tools, data and inputs the other tests do not use.

Kept here, each a finding (the commit that fixes it names it):

- A right-padded batch holding a row of padding alone (an empty text: ``DataCollatorForLanguageModeling``
  pads one so, as wikitext's blank lines give in transformers' ``Trainer``) was refused as "an empty
  row", saying the tokens after the zeros would read the pads, where there are none; GPT-2 scores it. It
  is scored as right padding now, and refused where right padding is (a cache, ``generate()``)
  (tests/hf/test_modeling.py).
- An id outside the vocabulary was refused with a hint about the byte tokenizer's ``<|endoftext|>`` (256)
  and lm-eval's ``prefix_token_id`` whatever the id and vocabulary (400 of 300 tokens, -1).
"""

from __future__ import annotations

import pytest
import torch

from innerloop.hf import InnerloopConfig, InnerloopForCausalLM


def _model(vocab_size: int) -> InnerloopForCausalLM:
    shape = {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 16}
    return InnerloopForCausalLM(InnerloopConfig(model={**shape, "vocab_size": vocab_size})).eval()


def test_an_id_outside_the_vocabulary_names_the_byte_tokenizer_only_for_its_end_of_text() -> None:
    """The refusal of an id outside the vocabulary always added that a byte-level tokenizer has
    ``<|endoftext|>`` at 256 and lm-eval's ``prefix_token_id=10``: for id 400 of a 300-token model, or
    id -1, a cause that is not theirs."""
    for vocab, bad in ((300, 400), (256, -1), (320, 320)):
        with pytest.raises(ValueError, match=rf"token id {bad}, outside") as err:
            _model(vocab)(torch.tensor([[1, bad]]))
        assert "byte-level" not in str(err.value) and "prefix_token_id" not in str(err.value)
    with pytest.raises(ValueError, match=r"token id 256, outside.*byte-level.*prefix_token_id=10"):
        _model(256)(torch.tensor([[1, 256]]))  # the byte tokenizer's <|endoftext|>
