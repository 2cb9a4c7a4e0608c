"""Review s55r: check_update_rule's large-rates case (s55m) against a rule that is right but defined only
for rates below 1 (its documented domain).

The default check now runs such a rule at rates up to LARGE_RATES_BOUND first, and it failed there with
the rule's own error (or a relative error), nothing saying that this was the large-rates case nor how a
rule with a smaller domain opts out (``max_lr=``, passed on to every make_problem).
"""

from __future__ import annotations

import pytest
import torch

from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.testing import check_update_rule


class _DefinedBelowOne(DualForm):
    """The dual form, refusing rates of 1 or more (a rule whose documented domain is rates < 1)."""

    def forward(self, state, task, views, lr, tau, decay=None, decay_log=None):  # noqa: ANN001, ANN201, D102
        if bool((lr >= 1).any()):
            raise ValueError(f"inner learning rates must be < 1, got {lr.max().item():.3g}")
        return super().forward(state, task, views, lr, tau, decay, decay_log)


class _DivergesAboveOne(DualForm):
    """The dual form with rates above 1 replaced by 1 (a form valid, and documented, for rates <= 1 only)."""

    def forward(self, state, task, views, lr, tau, decay=None, decay_log=None):  # noqa: ANN001, ANN201, D102
        return super().forward(state, task, views, lr.clamp(max=1.0), tau, decay, decay_log)


# reason: the first case runs the rule's check until it fails (0.05-0.7 s of CPU, above the fast loop's 0.3 s)
@pytest.mark.slow
@pytest.mark.parametrize(
    ("rule", "error"), [(_DefinedBelowOne, ValueError), (_DivergesAboveOne, AssertionError)]
)
def test_a_rule_failing_only_at_large_rates_is_told_how_to_opt_out(rule, error) -> None:
    torch.manual_seed(0)
    with pytest.raises(error) as raised:
        check_update_rule(rule(), gradients=False, without_grad=False)
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "LARGE_RATES_BOUND" in notes and "max_lr=" in notes, (str(raised.value), notes)
