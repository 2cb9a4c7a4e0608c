"""Testing helpers that the built-ins' tests use and a third-party plugin's tests can call.

- :mod:`innerloop.testing.checks`: ``check_inner_model``, ``check_inner_loss``, ``check_update_rule``
  (with decay and momentum where a rule takes them; by default every built-in loss, the inner LayerNorm
  and residual each on and off, the values under ``no_grad`` and ``inference_mode``, and the gradients
  against the naive loop's), ``check_update_rule_gradients`` (a gradcheck).
- :mod:`innerloop.testing.kernel_checks`: ``check_kernel``, a registered kernel against the torch path
  through a layer (several lengths and splits, a carried state, gradients, no_grad, decoding): what
  dispatch's first-use probe, which sees a block's first two mini-batches only, leaves to the kernel's
  own tests.
- :mod:`innerloop.testing.reference`: the naive token-by-token loop every rule is checked against.
- :mod:`innerloop.testing.strategies`: hypothesis strategies (needs the ``test`` extra).
"""

from innerloop.testing.checks import (
    FLOAT64_TOLERANCE,
    InnerProblem,
    ReferenceDivergedError,
    check_inner_loss,
    check_inner_model,
    check_update_rule,
    check_update_rule_gradients,
    check_zero_decay_and_momentum,
    make_problem,
    run_in_chunks,
    run_layer_in_chunks,
    twin_layers,
)
from innerloop.testing.kernel_checks import KERNEL_CHECK_TOLERANCES, KernelCheckReport, check_kernel
from innerloop.testing.reference import causal_linear_attention, naive_token_loop

__all__ = [
    "FLOAT64_TOLERANCE",
    "InnerProblem",
    "KERNEL_CHECK_TOLERANCES",
    "KernelCheckReport",
    "ReferenceDivergedError",
    "causal_linear_attention",
    "check_inner_loss",
    "check_inner_model",
    "check_kernel",
    "check_update_rule",
    "check_update_rule_gradients",
    "check_zero_decay_and_momentum",
    "make_problem",
    "naive_token_loop",
    "run_in_chunks",
    "run_layer_in_chunks",
    "twin_layers",
]
