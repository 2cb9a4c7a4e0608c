"""Review s21 (transformers integration): padding ids outside the vocabulary.

The byte-level tokenizer has no pad token, and transformers' usual idiom (``tokenizer.pad_token =
tokenizer.eos_token``, which lm-eval's ``configure_pad_token`` applies too) makes the pad id 256, past the
model's vocabulary. Two places then fail with an error that blames ``input_ids`` for an id the caller
never put there (and points at lm-eval's ``prefix_token_id``), instead of scoring or naming the padding /
``pad_token_id``.
"""

from __future__ import annotations

import pytest
import torch
from hf_testing import tiny_hf_model

from innerloop.hf.tokenizer import byte_tokenizer


def test_a_right_padded_batch_padded_with_the_end_of_text_id_scores_or_names_the_padding() -> None:
    model = tiny_hf_model("ttt_linear")
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # transformers' usual idiom; lm-eval does the same
    texts = ["hello world", "hi"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")  # right padding, the default side
    assert int(batch["input_ids"][1, -1]) == 256 and int(batch["attention_mask"][1, -1]) == 0
    with torch.no_grad():
        logits = model(**batch).logits  # the padding's id 256 is never read as a token the model scores
    with torch.no_grad():
        for row, text in enumerate(texts):
            alone = model(torch.tensor([list(text.encode())])).logits[0]
            assert (logits[row, : len(alone)] - alone).abs().max().item() <= 1e-5


def test_a_pad_token_id_outside_the_vocabulary_is_named_or_harmless_in_a_batch() -> None:
    model = tiny_hf_model("ttt_linear")
    ids = torch.tensor([list(b"ab\ncd"), list(b"xyz12")])
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=4, do_sample=False)
    eos = int(greedy[0, 5])  # row 0 ends at once, row 1 goes on
    assert eos not in greedy[1, 5:].tolist()
    with pytest.raises(
        ValueError, match=r"pad_token_id=256, outside the model's vocabulary .* pad_token_id=0"
    ):
        model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=eos, pad_token_id=256)
    with torch.no_grad():  # as the message says: an id in the vocabulary
        out = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out[1], greedy[1])
    assert out[0, 5].item() == eos and out[0, 6:].tolist() == [0] * 3
