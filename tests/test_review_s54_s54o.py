"""Review s54o: the test-time-regression family (linear attention, DeltaNet, Gated DeltaNet, Titans)
against float64 token loops, at hostile gates and shapes.

- Log-space decay products (``decay_log``) in float64 were ``exp`` of differences of long cumulated
  sums: each factor lost ``|G| eps`` (``G`` the sum of the logs since the segment's start), and a full
  reset (``-inf``, clamped to -800) put 800 into ``|G|`` for every later token. Measured before the fix
  (float64, against the product of the factors): the scan's torch path 1.2e-11 relative per token
  (T = 512 in one mini-batch, a reset every 8 tokens), the chunked delta rule 2e-12 (T = 256, chunks
  of 64, a reset every 4 tokens). Each factor is now the sum of its own logs only.
- ``chunk_delta_rule`` / ``delta_rule_loop`` took any truthy ``decay_first`` (a string, None) silently.
"""

from __future__ import annotations

import pytest
import torch

from innerloop.kernels.delta_chunk import chunk_delta_rule, delta_rule_loop
from innerloop.ops import scan

FLOAT64 = torch.float64
# float64 rounding of a product of a few hundred factors and of a few hundred-term sums
ROUNDING = 1e-13


def _per_token_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item()


def _resetting_log_gates(shape: tuple[int, ...], every: int, generator: torch.Generator) -> torch.Tensor:
    """Weak log gates in [-0.01, 0] with a full reset (-inf) every ``every`` tokens."""
    logs = -0.01 * torch.rand(*shape, generator=generator, dtype=FLOAT64)
    logs[..., ::every] = -torch.inf
    return logs


@pytest.mark.slow  # 0.4 to 0.7 s on this shared machine (a 256-token mini-batch, twice)
def test_scan_log_gates_with_resets_keep_float64_precision():
    """Linear attention with a scalar gate, one mini-batch of 512 tokens: S_t = a_t S + k^T v."""
    generator = torch.Generator().manual_seed(0)
    tokens, width = 256, 4
    q, k, v = (torch.randn(1, 1, tokens, width, generator=generator, dtype=FLOAT64) for _ in range(3))
    logs = _resetting_log_gates((1, 1, tokens), 8, generator)
    out, _ = scan(
        q, k, v, torch.ones(1, 1, tokens, dtype=FLOAT64), inner_model="matrix", inner_loss="dot_product",
        mini_batch_size=tokens, inner_norm=False, inner_residual=False, decay_log=logs, kernel="torch",
    )  # fmt: skip
    expected, _ = scan(
        q, k, v, torch.ones(1, 1, tokens, dtype=FLOAT64), inner_model="matrix", inner_loss="dot_product",
        mini_batch_size=tokens, inner_norm=False, inner_residual=False, decay=1 - logs.exp(), kernel="torch",
    )  # fmt: skip  # the product form: products of the factors, 2e-16 from a token loop
    assert _per_token_error(out, expected) < ROUNDING


@pytest.mark.parametrize("decay_first", [True, False])
def test_chunked_delta_rule_log_gates_with_resets_keep_float64_precision(decay_first):
    generator = torch.Generator().manual_seed(1)
    shape = (1, 2, 128, 4)
    q, k, v = (torch.randn(*shape, generator=generator, dtype=FLOAT64) for _ in range(3))
    k = k / k.norm(dim=-1, keepdim=True)
    beta = torch.rand(shape[:3], generator=generator, dtype=FLOAT64)
    logs = _resetting_log_gates(shape[:3], 4, generator)
    out, final = chunk_delta_rule(q, k, v, beta, decay_log=logs, chunk_size=64, decay_first=decay_first)
    expected, expected_final = delta_rule_loop(q, k, v, beta, gate=logs.exp(), decay_first=decay_first)
    assert _per_token_error(out, expected) < ROUNDING
    assert ((final - expected_final).norm() / expected_final.norm()).item() < ROUNDING


@pytest.mark.parametrize("function", [chunk_delta_rule, delta_rule_loop])
@pytest.mark.parametrize("flag", ["no", None, 1, torch.tensor(True)])
def test_decay_first_must_be_a_bool(function, flag):
    q = torch.randn(1, 1, 3, 2)
    with pytest.raises(TypeError, match="decay_first"):
        function(q, q, q, torch.rand(1, 1, 3), decay_first=flag)


@pytest.mark.parametrize("function", [chunk_delta_rule, delta_rule_loop])
@pytest.mark.parametrize("name", ["beta", "decay_log", "initial_state"])
def test_a_float64_gate_or_state_with_float32_q_is_refused_by_name(function, name):
    """The chunked delta rule computes in float32 for float32 q: a float64 step, gate or start state
    was rounded to float32 silently (the final state came back float32). scan refuses the same."""
    q, beta, logs, start = (
        torch.randn(1, 1, 3, 2),
        torch.rand(1, 1, 3),
        -torch.rand(1, 1, 3),
        torch.zeros(1, 1, 2, 2),
    )
    arguments = {"beta": beta, "decay_log": logs, "initial_state": start}
    arguments[name] = arguments[name].to(FLOAT64)
    with pytest.raises(TypeError, match=rf"{name} .*float64.*float32"):
        function(q, q, q, arguments.pop("beta"), **arguments)


@pytest.mark.parametrize("function", [chunk_delta_rule, delta_rule_loop])
def test_float32_gates_and_state_with_bfloat16_q_are_taken(function):
    """The compute dtype of half-precision q is float32: gates and states in it are what a caller has."""
    q = torch.randn(1, 1, 3, 2, dtype=torch.bfloat16)
    out, final = function(
        q, q, q, torch.rand(1, 1, 3), decay_log=-torch.rand(1, 1, 3), initial_state=torch.zeros(1, 1, 2, 2)
    )
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
