"""Review s17 (mutation C2): the checkers' final-state comparison includes the inner loss's carry.

A caller continues from the final state, so a rule or kernel whose returned ``loss_carry`` is wrong
must fail ``assert_states_close`` (which check_update_rule, check_kernel and the layer checks use).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from innerloop import TTTLayer
from innerloop.testing import FLOAT64_TOLERANCE
from innerloop.testing.checks import assert_states_close


def test_a_state_differing_only_in_its_loss_carry_is_not_close():
    torch.manual_seed(0)
    layer = TTTLayer(
        hidden_size=16, num_heads=2, inner_model="linear", inner_loss="next_token", mini_batch_size=4
    )
    with torch.no_grad():
        _, state = layer.double()(torch.randn(1, 6, 16, dtype=torch.float64))
    assert "previous_key" in state.loss_carry
    assert_states_close(state, state, "same", FLOAT64_TOLERANCE)
    carry = {**state.loss_carry, "previous_key": state.loss_carry["previous_key"] * 2}
    wrong = dataclasses.replace(state, loss_carry=carry)
    with pytest.raises(AssertionError, match=r"state\.loss_carry\['previous_key'\]"):
        assert_states_close(wrong, state, "final", FLOAT64_TOLERANCE)
