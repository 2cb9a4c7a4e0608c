"""Regression tests of the main session of review 53 (each seen failing before its fix)."""

import pytest
import torch

from innerloop.core.family_layers import LinearAttentionLayer


def test_weights_that_turn_nan_in_one_update_are_not_called_moderate_and_base_lr_is_named() -> None:
    """s53f: base_lr 3e38 with input of scale 10 turns every inner weight NaN at the first update (the
    step overflows). The message said "the inner weights stayed moderate (largest |W| 0.0e+00)" -- NaN
    left out of the magnitude -- and blamed the built-in plugins; it now says the weights turned NaN in
    one update and names base_lr first."""
    torch.manual_seed(0)
    layer = LinearAttentionLayer(64, 4, base_lr=3e38)
    with torch.no_grad(), pytest.raises(ValueError) as raised:
        layer(torch.randn(1, 32, 64) * 10)
    message = str(raised.value)
    assert "stayed moderate" not in message
    assert "the inner weights turned NaN or inf in one update from largest |W| 0.0e+00" in message
    assert "lower base_lr (now 3e+38)" in message
    assert message.index("lower base_lr") < message.index("its plugins are all built in")
