"""s50k: adversarial review of the scan's log gate (``decay_log``, commits 0ec3b85 / eb5b6e4 / dd83ff0)."""

from __future__ import annotations

import pytest
import torch

from innerloop import ops
from innerloop.core.family_layers import GatedDeltaNetLayer, TitansLayer
from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.testing import check_update_rule


class _TitansWithoutForgetting(TitansLayer):
    """A user's Titans whose :meth:`forgetting` override turns the forgetting off (keeps the momentum)."""

    def forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        decay, momentum = super().forgetting(x)
        return torch.zeros_like(decay), momentum


@pytest.mark.slow  # 1.3 s: two Titans layers in float64
def test_a_subclass_forgetting_override_reaches_the_titans_scan() -> None:
    """docs/family.md: a layer's gates come from ``forgetting``; since the scan took Titans' gate as its log
    (``scan_gates``), a subclass's override of ``forgetting`` was silently ignored (outputs 1e-1 apart)."""
    torch.manual_seed(0)
    custom = _TitansWithoutForgetting(16, 2, mini_batch_size=4).double()
    reference = TitansLayer(16, 2, mini_batch_size=4).double()
    reference.load_state_dict(custom.state_dict())
    with torch.no_grad():
        reference.A_log.fill_(-torch.inf)  # exp(A_log) = 0: log a = 0, no forgetting
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    assert torch.allclose(custom(x)[0], reference(x)[0], atol=1e-12, rtol=0)


class _GatedDeltaNetKeepingEverything(GatedDeltaNetLayer):
    """A user's Gated DeltaNet whose :meth:`forgetting` override reports no decay at all."""

    def forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None


def test_a_subclass_forgetting_override_reaches_the_gated_deltanet_scan() -> None:
    """The sibling in Gated DeltaNet: ``forgetting`` returning no decay gives a scan without one."""
    torch.manual_seed(0)
    layer = _GatedDeltaNetKeepingEverything(8, 2).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    assert layer.scan_gates(x) == (None, None, None)


class _LogGateDropped(DualForm):
    """A rule that names ``decay_log`` (as the built-ins do) but drops it: no forgetting on the log path,
    which the family layers (Gated DeltaNet, Titans) take."""

    name = "s50k_log_gate_dropped"

    def forward(self, state, task, views, lr, tau, decay=None, decay_log=None):  # type: ignore[override]
        return super().forward(state, task, views, lr, tau, decay=decay)


@pytest.mark.slow  # check_update_rule's checks before this one
def test_check_update_rule_checks_a_rules_log_gate_path() -> None:
    """innerloop.testing gave every rule its gate as ``decay`` only: a rule wrong on ``decay_log`` (the
    path the family layers take) passed check_update_rule."""
    with pytest.raises(AssertionError, match="decay_log"):
        check_update_rule(
            _LogGateDropped(),
            "linear",
            "reconstruction",
            gradients=False,
            without_grad=False,
            norm=True,
            residual=True,
            batch=1,
            heads=1,
            tokens=8,
        )


class _OldSignatureRule(DualForm):
    """A third-party rule written to the signature documented before ``decay_log``: ``decay=`` only."""

    name = "s50k_old_signature"

    def forward(self, state, task, views, lr, tau, decay=None):  # type: ignore[override]
        return super().forward(state, task, views, lr, tau, decay=decay)


@pytest.mark.slow  # 4.3 s (load 4 on 2 cores): ops.scan checks an unregistered rule instance at first use
def test_a_rule_without_decay_log_gets_the_log_gate_as_decay() -> None:
    """Holds (s50k): ``ops.scan(decay_log=...)`` on a rule taking ``decay`` only equals ``decay = 1 - exp``;
    its gradient w.r.t. the log gate is finite at a full reset (-inf) and at 0."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    lr = torch.full((1, 2, 8), 0.2, dtype=torch.float64)
    logs = -torch.rand(1, 2, 8, generator=generator, dtype=torch.float64)
    logs[0, 0, 2], logs[0, 1, 5] = -torch.inf, 0.0
    logs.requires_grad_()
    options = dict(update_rule=_OldSignatureRule(), mini_batch_size=4)
    from_log, _ = ops.scan(q, k, v, lr, decay_log=logs, **options)
    from_decay, _ = ops.scan(q, k, v, lr, decay=-torch.expm1(logs.detach()), **options)
    assert torch.allclose(from_log, from_decay, atol=1e-14, rtol=0)
    (gradient,) = torch.autograd.grad(from_log.square().sum(), logs)
    assert torch.isfinite(gradient).all()
