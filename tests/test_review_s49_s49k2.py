"""Review s49k2: gaps of the testing kit.

The kit checked an activation's closed-form derivative only at ``3 x`` for random normal ``x`` (|z| up
to ~10, ~7 at registration), so a derivative wrong only at larger pre-activations (a clamped formula)
passed both ``check_inner_model`` and registration, and the dual form then trained with it.
"""

from __future__ import annotations

import pytest
import torch

from innerloop.core.protocol import GELU_TANH, Activation, AffineLayer, StackModel
from innerloop.testing.checks import FLOAT64_TOLERANCE, REGISTRATION_TOLERANCE, check_activation_derivatives


def clamped_softplus_derivative(z: torch.Tensor) -> torch.Tensor:
    """softplus' derivative, right for |z| <= 12 only (sigmoid of a clamped input)."""
    return torch.sigmoid(z.clamp(-12.0, 12.0))


def clamped_tanh_derivative(z: torch.Tensor) -> torch.Tensor:
    """tanh's derivative, right for |z| <= 10 only."""
    return 1 - torch.tanh(z.clamp(-10.0, 10.0)) ** 2


def stack_model(activation: Activation) -> StackModel:
    class OneActivation(StackModel):
        name = f"one_{activation.name}"
        stack = (AffineLayer("W1", "b1", activation), AffineLayer("W2", None, None))

        def param_shapes(self, f: int) -> dict[str, tuple[int, ...]]:
            return {"W1": (f, f), "b1": (1, f), "W2": (f, f)}

        def init_params(self, heads: int, f: int, generator: torch.Generator | None = None) -> dict:
            return {
                k: 0.3 * torch.randn(heads, *s, generator=generator) for k, s in self.param_shapes(f).items()
            }

    return OneActivation()


CLAMPED_SOFTPLUS = Activation("softplus", torch.nn.functional.softplus, clamped_softplus_derivative)
CLAMPED_TANH = Activation("tanh", torch.tanh, clamped_tanh_derivative)


# the clamped tanh's error (8e-9 at |z| >= 10) is within registration's tolerance, not the kit's
@pytest.mark.parametrize(
    ("activation", "tolerance"),
    [
        (CLAMPED_SOFTPLUS, FLOAT64_TOLERANCE),
        (CLAMPED_SOFTPLUS, REGISTRATION_TOLERANCE),
        (CLAMPED_TANH, FLOAT64_TOLERANCE),
    ],
    ids=["softplus-kit", "softplus-registration", "tanh-kit"],
)
def test_derivative_wrong_only_at_large_pre_activations_is_caught(
    activation: Activation, tolerance: float
) -> None:
    model = stack_model(activation)
    z = 3 * torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(AssertionError, match=r"at z and at 10 <= \|z\| <= 19"):
        check_activation_derivatives(model, z, tolerance)


@pytest.mark.parametrize(
    "activation",
    [GELU_TANH, Activation("softplus", torch.nn.functional.softplus, torch.sigmoid)],
    ids=lambda a: a.name,
)
def test_right_derivatives_pass_at_large_pre_activations(activation: Activation) -> None:
    z = 3 * torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    check_activation_derivatives(stack_model(activation), z)
