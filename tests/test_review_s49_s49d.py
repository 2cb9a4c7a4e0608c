"""Review s49d: the family's layers (DeltaNet, Gated DeltaNet) against the delta rule's stability."""

from __future__ import annotations

import pytest

from innerloop.core.family_layers import DeltaNetLayer, GatedDeltaNetLayer
from innerloop.models import ModelConfig, build_model
from innerloop.models.config import FamilyConfig

DELTA_MEMBERS = [DeltaNetLayer, GatedDeltaNetLayer]


@pytest.mark.parametrize("member", DELTA_MEMBERS)
def test_a_delta_step_past_two_on_unit_keys_is_refused(member) -> None:
    """With l2-normalised keys the delta rule's step ``I - beta k^T k`` has the eigenvalue ``1 - beta``
    along k: beta > 2 (``base_lr > 2``, beta = base_lr * sigmoid) expands the state at every visit of a key.
    Measured before the fix: DeltaNet at base_lr=3, width 64, 512 random tokens, the state reached 3.5e9
    while the RMS-normed outputs looked ordinary (accepted silently)."""
    with pytest.raises(ValueError, match=r"base_lr=3\.0;.*<= 2.*qk_l2norm"):
        member(8, 2, base_lr=3.0)
    layer = member(8, 2, base_lr=2.0)  # FLA's allow_neg_eigval: beta in (0, 2)
    with pytest.raises(ValueError, match=r"base_lr=2\.5;.*<= 2"):
        layer.base_lr = 2.5
    assert layer.base_lr == 2.0
    member(
        8, 2, base_lr=3.0, qk_l2norm=False
    )  # unnormalised keys: the bound is beta ||k||^2 <= 2, not checked


@pytest.mark.parametrize("mixer", ["deltanet", "gated_deltanet"])
def test_a_config_with_a_delta_step_past_two_is_refused_in_one_line(mixer) -> None:
    with pytest.raises(ValueError, match=r"^model\.family: .*base_lr=2\.5[^\n]*$"):
        build_model(
            ModelConfig(
                mixer=mixer, hidden_size=8, num_heads=2, intermediate_size=8, family=FamilyConfig(base_lr=2.5)
            )
        )


@pytest.mark.parametrize("mixer", ["linear_attention", "titans"])
def test_the_step_bound_leaves_the_other_members_alone(mixer) -> None:
    shape = dict(hidden_size=4, num_heads=2, intermediate_size=4, num_layers=1)
    build_model(ModelConfig(mixer=mixer, family=FamilyConfig(base_lr=3.0), **shape))
