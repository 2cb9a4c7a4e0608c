"""A language model's state moves and casts like a tensor (``LMState.to``), as the error for a state
of another dtype advises: a model moved with ``model.to(...)`` continues from the moved state."""

from __future__ import annotations

import pytest
import torch

from innerloop.models import CausalLM, ModelConfig


@pytest.mark.parametrize(
    ("mixer", "backbone"), [("ttt", "transformer"), ("ttt", "mamba"), ("attention", "mamba")]
)
def test_a_state_cast_with_to_continues_as_a_state_made_in_that_dtype(mixer, backbone) -> None:
    torch.manual_seed(0)
    config = ModelConfig(mixer=mixer, backbone=backbone, vocab_size=50, hidden_size=16, num_heads=2)
    model = CausalLM(config).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        _, state = model(ids[:, :5])
        model.double()
        _, state64 = model(ids[:, :5])
        if mixer == "ttt":
            with pytest.raises(TypeError, match=r"cast it with state\.to\(torch\.float64\)"):
                model(ids[:, 5:], state)
        moved = state.to(torch.float64)
        assert all(t.dtype == torch.float64 for t in _floating(moved))
        continued, _ = model(ids[:, 5:], moved)
        expected, _ = model(ids[:, 5:], state64)
    torch.testing.assert_close(continued, expected, rtol=1e-5, atol=1e-6)  # the float32 prefix's rounding


def _floating(state) -> list[torch.Tensor]:
    found = []
    for block in state.blocks:
        if block.conv is not None:
            found.append(block.conv)
        mixer = block.mixer
        found += list(mixer.tensors().values()) if hasattr(mixer, "tensors") else [mixer.key, mixer.value]
    return [t for t in found if t.is_floating_point()]
