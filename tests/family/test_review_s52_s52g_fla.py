"""Review s52g: the delta rule and the gated delta rule against FLA 0.6.0's naive ops (float64, as in
test_fla.py) at head sizes test_fla.py does not draw (1, 3, 5, 130: odd, and not a power of two) and on
each path ``scan`` can take: the torch path with every update rule that reads them, and ``delta_chunk``.

Measured: worst relative RMS error 1.3e-15 over dims {1, 2, 3, 5, 33, 130}, batch/heads/tokens up to
2/3/19, torch (dual_form, minibatch_gd, momentum) and delta_chunk.
"""

from __future__ import annotations

import pytest
import torch
from fla_float64 import reference

from innerloop.core.functional import relative_error
from innerloop.ops import scan

TOLERANCE = 1e-9  # as test_fla.py; float64 rounding is ~1e-15
PATHS = [
    ("torch", "dual_form"),
    ("torch", "minibatch_gd"),
    ("torch", "momentum"),
    ("delta_chunk", "dual_form"),
]


def draws(seed: int, dim: int, tokens: int = 7):
    """q, l2-normalised k, v ``[B, T, H, d]``, beta ``[B, T, H]`` in (0, 1), a start state ``[B, H, d, d]``
    (two sequences of three heads; one of one at 130 features, to stay fast)."""
    batch, heads = (1, 1) if dim > 64 else (2, 3)
    generator = torch.Generator().manual_seed(seed)
    normal = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    q, v = normal(batch, tokens, heads, dim), normal(batch, tokens, heads, dim)
    k = torch.nn.functional.normalize(normal(batch, tokens, heads, dim), dim=-1)
    beta = torch.rand(batch, tokens, heads, generator=generator, dtype=torch.float64)
    return q, k, v, beta, 0.3 * normal(batch, heads, dim, dim)


def heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


@pytest.mark.parametrize("dim", [1, 3, 5, pytest.param(130, marks=pytest.mark.slow)])
@pytest.mark.parametrize(("kernel", "rule"), PATHS)
def test_deltanet_at_untried_head_sizes(dim, kernel, rule):
    q, k, v, beta, start = draws(dim, dim)
    q, k, v, beta = map(heads_first, (q, k, v, beta))  # delta_rule_recurrence takes [B, H, T, ...]
    out, state = reference("delta_rule_recurrence")(q, k, v, beta, initial_state=start.clone())
    mine, weights = scan(
        dim**-0.5 * q, k, v, beta, inner_model="matrix", update_rule=rule, mini_batch_size=1,
        inner_norm=False, inner_residual=False, initial={"W": start}, kernel=kernel,
    )  # fmt: skip
    assert relative_error(mine, out) <= TOLERANCE
    assert relative_error(weights["W"], state) <= TOLERANCE


# slow: 0.33-0.65 s each at dims 1, 3, 5 (two sequences of three heads) on the 2-core host at load ~8,
# over the 0.3 s of a fast test (s52p, --durations=0 -n 0); dim 130 is one head and was already slow
@pytest.mark.slow
@pytest.mark.parametrize("dim", [1, 3, 5, 130])
@pytest.mark.parametrize(("kernel", "rule"), [path for path in PATHS if path[1] != "minibatch_gd"])
def test_gated_deltanet_at_untried_head_sizes(dim, kernel, rule):
    """The mapping of test_fla.py's test_gated_deltanet (ZOO.md (c)): lr = a beta, values v / a."""
    q, k, v, beta, start = draws(dim + 100, dim)
    generator = torch.Generator().manual_seed(dim)
    log_keep = torch.log(0.3 + 0.7 * torch.rand(beta.shape, generator=generator, dtype=torch.float64))
    out, state = reference("naive_recurrent_gated_delta_rule")(
        q, k, v, beta, log_keep, scale=dim**-0.5, initial_state=start.clone(), output_final_state=True
    )
    keep = heads_first(log_keep.exp())
    mine, weights = scan(
        heads_first(dim**-0.5 * q), heads_first(k), heads_first(v) / keep[..., None], keep * heads_first(beta),
        inner_model="matrix", update_rule=rule, mini_batch_size=1, inner_norm=False, inner_residual=False,
        decay=1.0 - keep, initial={"W": start}, kernel=kernel,
    )  # fmt: skip
    assert relative_error(heads_first(mine), out) <= TOLERANCE
    assert relative_error(weights["W"], state) <= TOLERANCE
