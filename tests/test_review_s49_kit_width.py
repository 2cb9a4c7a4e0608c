"""The testing kit checks update rules at a head dim above 5 (LONG_CHECK_SHAPE's head dim 8): a rule wrong
only past a head's fifth feature (a size hard-coded for small heads) passed every shape it drew before,
whose head dims were 5, 4 and 1."""

from __future__ import annotations

import pytest
import torch

from innerloop.core.protocol import UpdateRule
from innerloop.plugins.optimizers.minibatch_gd import MiniBatchGD
from innerloop.testing import check_update_rule, checks

PRIMAL = MiniBatchGD()


class WrongPastFeature5(UpdateRule):
    """Mini-batch GD whose outputs are off by 0.1% in every feature past a head's fifth."""

    name = "wrong_past_feature_5"
    supports_decay = True

    def forward(self, state, task, views, lr, tau, decay=None):  # noqa: ANN001, ANN201
        outputs, new_state = PRIMAL.forward(state, task, views, lr, tau, decay)
        scale = torch.ones(outputs.shape[-1], dtype=outputs.dtype, device=outputs.device)
        scale[5:] = 1.001
        return outputs * scale, new_state


def test_the_kit_draws_a_head_dim_past_5() -> None:
    assert max(shape["head_dim"] for shape in checks.PLUGIN_CHECK_SHAPES) >= 8


@pytest.mark.slow  # runs the rule checks until the wide shape fails (~1-2 s)
def test_a_rule_wrong_only_past_a_heads_fifth_feature_is_caught() -> None:
    with pytest.raises(AssertionError):
        check_update_rule(WrongPastFeature5())
