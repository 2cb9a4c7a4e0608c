"""Review s20 (LOW, the kind of the TTT-E2E finding): a language model's state assembled by hand from
blocks at different positions was taken, and each block then placed its mini-batches, RoPE and window
at its own position: other numbers, no error. Every block reads every token, so the model refuses it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from innerloop.config import load_config
from innerloop.models import build_model


@pytest.mark.parametrize("preset", ["tiny", "deltanet-tiny", "titans-tiny"])
def test_a_state_whose_blocks_read_different_numbers_of_tokens_is_refused(preset) -> None:
    torch.manual_seed(0)
    model = build_model(load_config(preset, ["model.num_layers=2", "model.hidden_size=32"])[0].model)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        whole, _ = model(ids)
        _, state = model(ids[:, :9])
        rest, _ = model(ids[:, 9:], state)  # the state as returned: the whole's numbers
        assert torch.allclose(rest, whole[:, 9:], atol=1e-5)
        blocks = list(state.blocks)
        mixer = blocks[1].mixer
        blocks[1] = dataclasses.replace(
            blocks[1], mixer=dataclasses.replace(mixer, position=mixer.position + 1)
        )
        with pytest.raises(ValueError, match=r"state.blocks\[0\] at 9, state.blocks\[1\] at 10"):
            model(ids[:, 9:], type(state)(tuple(blocks)))
