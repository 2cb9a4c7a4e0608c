"""Review s49c: the Hugging Face model's generate() with stop strings (issue 11)."""

from __future__ import annotations

import pytest
import torch
from hf_testing import tiny_hf_model

from innerloop.hf.tokenizer import byte_tokenizer

PROMPTS = torch.tensor([list(b"Hello"), list(b"World")])
ASCII_ONLY = {"max_new_tokens": 8, "do_sample": False, "suppress_tokens": list(range(128, 256))}


@pytest.mark.slow  # five generate() calls of 8 tokens: about 1 s on a quiet CPU
def test_batched_stop_strings_pad_a_finished_row_only_with_an_eos_token_id_as_docs_say() -> None:
    """docs/huggingface.md: a byte-level model has no eos_token_id, so in a batched generate(stop_strings=)
    transformers lets a row that met its stop string go on generating (its tokens up to the stop are
    its tokens alone); with eos_token_id=0 and pad_token_id=0 the row is padded after its stop, and each
    row equals its own generation, then pads."""
    model, tokenizer = tiny_hf_model("ttt_linear"), byte_tokenizer()
    free = model.generate(PROMPTS, **ASCII_ONLY)[:, 5:]
    assert free[0, 0] != free[1, 0]
    stop = tokenizer.decode(free[0, :2])  # the first row meets it after 2 tokens, the second never
    options = {**ASCII_ONLY, "stop_strings": [stop], "tokenizer": tokenizer}
    alone = [model.generate(PROMPTS[row : row + 1], **options)[0, 5:].tolist() for row in range(2)]
    assert alone == [free[0, :2].tolist(), free[1].tolist()]
    batched = model.generate(PROMPTS, **options)[:, 5:]
    assert batched.tolist() == free.tolist()  # the first row went on past its stop string
    padded = model.generate(
        PROMPTS, attention_mask=torch.ones_like(PROMPTS), eos_token_id=0, pad_token_id=0, **options
    )
    assert padded[:, 5:].tolist() == [alone[0] + [0] * 6, alone[1]]
