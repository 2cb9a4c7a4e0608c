"""s55b: plugin paths the docs promised but the code did not keep (--no-ttt with any update rule, the
family members' inner-loss check, the Hugging Face folders' plugin source digests)."""

from __future__ import annotations

import pytest
import torch

from innerloop.core.layer import TTTLayer
from innerloop.models.ablation import no_test_time_training, weights_moved_at_zero_lr
from innerloop.plugins.optimizers.minibatch_gd import MiniBatchGD


class _LrFloorStep(MiniBatchGD):
    """Mini-batch gradient descent at ``lr + 0.5``: a step that does not vanish at inner learning rate 0 (as
    a sign step of fixed size, or a rule with a rate of its own), with its own token-by-token reference."""

    name = "s55b_lr_floor_step"

    def forward(self, state, task, views, lr, tau, **options):
        return super().forward(state, task, views, lr + 0.5, tau, **options)

    def reference(self, state, task, views, lr, tau, **options):
        from innerloop.testing import naive_token_loop

        return naive_token_loop(state, task, views, lr + 0.5, tau, **options)


@pytest.mark.slow  # 0.5 s after the plugins' imports (3 s in a fresh process)
def test_no_test_time_training_refuses_a_rule_that_moves_the_weights_at_lr_0(monkeypatch):
    """The docs said the inner weights stay at the initial ones under --no-ttt "whatever the update rule";
    the ablation set lr 0 and ran the rule, which moved them, silently."""
    # the rule passes the registrar's conformance checks against its reference (17 s here): not under test
    monkeypatch.setattr("innerloop.registry.check_instance", lambda kind, instance: None)
    torch.manual_seed(0)
    layer = TTTLayer(
        16, 2, inner_model="linear", update_rule=_LrFloorStep(), mini_batch_size=4, kernel="torch"
    )
    with (
        pytest.raises(
            ValueError,
            match=r"update rule 's55b_lr_floor_step' .*moves the inner weights at inner "
            r"learning rate 0 \(outputs or weights off the initial inner model's by \d",
        ),
        no_test_time_training(layer),
    ):
        pass  # pragma: no cover
    assert layer.base_lr == 1.0  # restored


@pytest.mark.parametrize("rule", ["dual_form", "minibatch_gd", "momentum"])
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_the_built_in_rules_keep_the_weights_at_lr_0(model, rule):
    torch.manual_seed(0)
    layer = TTTLayer(
        16, 2, inner_model=model, update_rule=rule, mini_batch_size=4, base_lr=0.0, kernel="torch"
    )
    assert weights_moved_at_zero_lr(layer) is None
