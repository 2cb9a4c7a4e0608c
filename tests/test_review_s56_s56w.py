"""Review s56w of s56r (forward_unchecked), s56j and s56t: regression tests."""

from __future__ import annotations

import pytest
import torch

from innerloop.core.protocol import apply_stack
from innerloop.plugins.models.linear import LinearModel


class _ForwardCallsUnchecked(LinearModel):
    """A model of one's own written as the protocol's docs suggest: ``forward`` is the argument check
    followed by ``forward_unchecked`` (which it does not override)."""

    name = "forward_calls_unchecked"

    def forward(self, params, x):
        self.check_forward_arguments(params, x)
        return self.forward_unchecked(params, x)


def test_a_stack_model_whose_forward_calls_forward_unchecked_runs_its_stack():
    """StackModel.forward_unchecked delegated to an overridden ``forward``, which called
    ``forward_unchecked`` again: RecursionError, at registration 'failed its smoke test' naming nothing."""
    model = _ForwardCallsUnchecked()
    params = {k: v + 0.1 * torch.randn(v.shape) for k, v in model.init_params(2, 4).items()}
    x = torch.randn(2, 3, 4)
    want = apply_stack(model.stack, params, x)
    assert torch.equal(model.forward(params, x), want)
    assert torch.equal(model.forward_unchecked(params, x), want)


@pytest.mark.slow  # a registration's smoke and conformance checks: 0.9 s
def test_a_stack_model_whose_forward_calls_forward_unchecked_registers():
    from plugin_testing import One

    from innerloop.registry import build_registry

    registry = build_registry(include_external=False)
    registry.add_plugin(One("inner_models", _ForwardCallsUnchecked()), origin="test.forward_calls_unchecked")
