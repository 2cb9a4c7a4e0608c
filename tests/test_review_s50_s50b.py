"""Review s50b: the family's gate precision. The scan took every forgetting gate as ``decay = 1 - a``, and
float32 holds a ``decay`` near 1 to ``u / a`` relative in ``a`` (u = 2^-24): under strong gates (``log a``
of -5 to -12) the gradient w.r.t. ``log a`` was 8.7e-6 to 1.3e-5 from float64's (150 to 220 units of
float32's roundoff), gated linear attention's gradient w.r.t. the initial state 8e-6, and the Titans
layer's gate gradients 100% off (``log a`` near -34, where ``decay`` rounds to 1 and torch's ``expm1``
backward, ``expm1 + 1``, is 0). The gate now reaches the scan as ``decay_log = log a`` (FLA's ``g``) and its products are ``exp`` of differences of cumulated logs
(:func:`innerloop.core.scan.log_running_products`, in float64; the chunked delta rule already cumulated in
float64 but received ``log1p(-decay)`` of the rounded decay). Measured after: 9e-8 to 9e-7.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from innerloop.core.family_layers import GatedDeltaNetLayer, TitansLayer
from innerloop.core.protocol import UpdateRule
from innerloop.core.scan import log_running_products, run_scan, running_products
from innerloop.kernels.delta_chunk.adapter import delta_rule_kernel_forward
from innerloop.ops import scan
from innerloop.plugins.optimizers.dual_form import DualForm

FP32_UNIT = 2.0**-24
GATED_DELTA = dict(
    inner_model="matrix", update_rule="dual_form", mini_batch_size=1, inner_norm=False, inner_residual=False
)
GATED_LINEAR_ATTENTION = dict(
    inner_model="matrix",
    inner_loss="dot_product",
    update_rule="dual_form",
    mini_batch_size=64,
    inner_norm=False,
    inner_residual=False,
)
TITANS = dict(inner_model="matrix", update_rule="momentum", mini_batch_size=16)


def _relative(value: torch.Tensor, exact: torch.Tensor) -> float:
    return ((value.double() - exact).norm() / exact.norm()).item()


def _problem(tokens: int, log_low: float, log_high: float, heads: int = 2, width: int = 16) -> tuple:
    """Seeded float64 ``q, k (unit rows), v, lr, g (log gates in [log_low, log_high]), momentum, W0``."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, heads, tokens, width, generator=generator, dtype=torch.float64) for _ in range(3)
    )
    k = k / k.norm(dim=-1, keepdim=True)
    lr = 0.05 + 0.9 * torch.rand(1, heads, tokens, generator=generator, dtype=torch.float64)
    g = log_low + (log_high - log_low) * torch.rand(
        1, heads, tokens, generator=generator, dtype=torch.float64
    )
    momentum = torch.rand(1, heads, tokens, generator=generator, dtype=torch.float64)
    w0 = torch.randn(1, heads, width, width, generator=generator, dtype=torch.float64)
    return q, k, v, lr, g, momentum, w0


def _scan_gradients(
    config: dict, problem: tuple, dtype: torch.dtype, as_log: bool, kernel: str = "auto"
) -> tuple:
    """``(outputs, d/d log a, d/d W0)`` of a weighted sum of the outputs, the gate given as ``decay_log``
    (``as_log``) or as ``decay = -expm1(g)``, in ``dtype``."""
    q, k, v, lr, g, momentum, w0 = (t.detach().to(dtype).requires_grad_() for t in problem)
    extra = {"momentum": momentum} if config["update_rule"] == "momentum" else {}
    gate = {"decay_log": g} if as_log else {"decay": -torch.expm1(g)}
    out, _ = scan(q, k, v, lr, **config, **gate, **extra, initial={"W": w0}, kernel=kernel)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * weights.to(dtype)).sum().backward()
    return out.detach(), g.grad, w0.grad


@pytest.mark.parametrize(
    ("config", "kernel"),
    [
        (GATED_DELTA, "torch"),
        (GATED_DELTA, "delta_chunk"),
        (GATED_LINEAR_ATTENTION, "auto"),
        (TITANS, "auto"),
    ],
    ids=["gated_delta_torch", "gated_delta_chunked", "gated_linear_attention", "titans"],
)
@pytest.mark.slow  # four scans with a backward: 0.2 to 1 s
def test_float32_gate_gradients_under_strong_gates(config: dict, kernel: str) -> None:
    """``log a`` in [-12, -5], 64 tokens: float32 against float64 (the float64 runs of both gate forms agree
    to 3e-13). Measured with ``decay_log``: outputs 1.0e-7 to 2.1e-7, d/d log a 8.8e-8 to 6.2e-7, d/dW0 1.9e-7
    to 8.8e-7; with the gate as ``decay = -expm1(g)`` (before): d/d log a 8.7e-6 to 1.3e-5 (146 to 220
    units of float32's roundoff), gated linear attention's d/dW0 8.2e-6."""
    problem = _problem(64, -12.0, -5.0)
    exact = _scan_gradients(config, problem, torch.float64, as_log=True, kernel=kernel)
    out, gate_gradient, start_gradient = _scan_gradients(config, problem, torch.float32, True, kernel)
    assert _relative(out, exact[0]) <= 8 * FP32_UNIT
    assert _relative(gate_gradient, exact[1]) <= 32 * FP32_UNIT  # Titans' 6.2e-7: 10 units
    assert _relative(start_gradient, exact[2]) <= 32 * FP32_UNIT  # Titans' 8.8e-7: 15 units
    as_decay = _scan_gradients(config, problem, torch.float64, as_log=False, kernel=kernel)
    assert _relative(as_decay[1], exact[1]) <= 1e-11  # one function, two ways to give its gate


@pytest.mark.slow  # two layers, forward and backward: 0.3 s
def test_titans_gate_gradients_float32_under_strong_forgetting() -> None:
    """Titans with ``log(1 - alpha)`` near -34 (``A_log = log 16``, ``dt_bias = 2``): a float32 ``decay``
    is 1 there, and the gradients of the forgetting gate's parameters were 100% from float64's (measured
    1.0 for A_log and a_proj at 16 and 32 tokens); from the log gate, 4.8e-7 and 4.6e-7."""
    torch.manual_seed(0)
    layer = TitansLayer(16, 2)
    with torch.no_grad():
        layer.A_log.fill_(math.log(16.0))
        layer.dt_bias.fill_(2.0)
    layer64 = copy.deepcopy(layer).double()
    x = torch.randn(1, 32, 16)
    y, y64 = layer(x)[0], layer64(x.double())[0]
    weights = torch.randn(y.shape)
    (y * weights).sum().backward()
    (y64 * weights.double()).sum().backward()
    assert _relative(y, y64) <= 16 * FP32_UNIT
    for name in ("A_log", "dt_bias", "a_proj.weight"):
        got, exact = layer.get_parameter(name).grad, layer64.get_parameter(name).grad
        assert _relative(got, exact) <= 1e-5, name  # measured 5e-7; 1.0 before


def test_log_running_products_are_the_products_and_take_a_full_reset() -> None:
    """In float64 the log-space products equal the linear ones (3e-16); a ``-inf`` log (``a = 0``, a full
    reset) gives exact zeros and a finite gradient (no ``-inf - -inf``), and 20 strong factors keep their
    product (1e-80) where float32 factors of ``1 - decay`` would hold each to 6e-4."""
    generator = torch.Generator().manual_seed(0)
    logs = -3 * torch.rand(2, 3, 7, generator=generator, dtype=torch.float64)
    within, cumulative = log_running_products(logs)
    expected_within, expected_cumulative = running_products(logs.exp())
    torch.testing.assert_close(within, expected_within, rtol=1e-13, atol=0)
    torch.testing.assert_close(cumulative, expected_cumulative, rtol=1e-13, atol=0)
    reset = logs.clone().requires_grad_()
    with torch.no_grad():
        reset[..., 3] = -torch.inf
    within, cumulative = log_running_products(reset)
    assert within[..., 3:, :3].eq(0).all() and cumulative[..., 3:].eq(0).all()
    (within.sum() + cumulative.sum()).backward()
    assert reset.grad.isfinite().all()
    strong = torch.full((1, 1, 20), math.log(1e-4))
    assert log_running_products(strong)[1][0, 0, 3].item() == pytest.approx(1e-16, rel=4 * FP32_UNIT)


@pytest.mark.slow  # gradcheck: 1 to 3 s
@pytest.mark.parametrize("rule", ["dual_form", "minibatch_gd", "momentum"])
def test_gradcheck_of_the_log_gate_path(rule: str) -> None:
    """float64 gradcheck of ``ops.scan`` with ``decay_log`` w.r.t. every gate input (lr, the log gates,
    momentum) and the initial state (weights and momentum) at once, 5 tokens in mini-batches of 2 (a
    partial one) with a key, value and query of their own."""
    generator = torch.Generator().manual_seed(1)
    shape = (1, 1, 5)
    q, k, v = (torch.randn(*shape, 2, generator=generator, dtype=torch.float64) for _ in range(3))
    lr = 0.1 + 0.5 * torch.rand(*shape, generator=generator, dtype=torch.float64)
    g = -0.05 - 2 * torch.rand(*shape, generator=generator, dtype=torch.float64)
    momentum = torch.rand(*shape, generator=generator, dtype=torch.float64)
    w0 = torch.randn(1, 1, 2, 2, generator=generator, dtype=torch.float64)
    s0 = torch.randn(1, 1, 2, 2, generator=generator, dtype=torch.float64)
    tensors = [t.requires_grad_() for t in (lr, g, momentum, w0, s0)]
    options = dict(
        inner_model="matrix", update_rule=rule, mini_batch_size=2, inner_norm=False, inner_residual=False
    )

    def run(lr, g, momentum, w0, s0):
        if rule == "momentum":
            initial = {"W": w0, "momentum.W": s0}
            out, weights = scan(q, k, v, lr, decay_log=g, momentum=momentum, initial=initial, **options)
            return out, weights["W"], weights["momentum.W"]
        out, weights = scan(
            q, k, v, lr, decay_log=g, initial={"W": w0 + 0 * s0 + 0 * momentum.sum()}, **options
        )
        return out, weights["W"]

    assert torch.autograd.gradcheck(run, tensors)


@pytest.mark.slow  # gradcheck: 1 s
def test_gradcheck_of_the_chunked_kernel_with_log_gates() -> None:
    """The chunked delta rule takes ``decay_log`` as given (no ``log1p(-decay)``); float64 gradcheck of it in
    chunks of 2 over 5 tokens, and its numbers equal the token loop's (the torch path) at 1e-12."""
    generator = torch.Generator().manual_seed(2)
    shape = (1, 2, 5)
    q, k, v = (torch.randn(*shape, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    lr = 0.2 + 0.5 * torch.rand(*shape, generator=generator, dtype=torch.float64)
    g = -4 * torch.rand(*shape, generator=generator, dtype=torch.float64)
    w0 = torch.randn(1, 2, 3, 3, generator=generator, dtype=torch.float64)
    tau, norm = torch.ones(1, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)

    def run(lr, g, w0):
        out, weights = delta_rule_kernel_forward(
            q, k, v, lr, tau, {"W": w0}, norm, 0 * norm, 1e-6, chunk_size=2, decay_log=g
        )
        return out, weights["W"]

    tensors = [t.requires_grad_() for t in (lr, g, w0)]
    assert torch.autograd.gradcheck(run, tensors)
    out, weights = scan(q, k, v, lr, decay_log=g, initial={"W": w0}, kernel="torch", **GATED_DELTA)
    torch.testing.assert_close(run(*tensors)[0], out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run(*tensors)[1], weights["W"], rtol=1e-12, atol=1e-12)


def test_scan_refuses_a_bad_log_gate_naming_it() -> None:
    """``decay_log`` must be ``<= 0`` (NaN and ``+inf`` refused), not given with ``decay``; ``-inf`` is a
    full reset and equals ``decay = 1``."""
    q, k, v, lr, g, _, w0 = _problem(6, -2.0, -0.1, heads=1, width=4)
    with pytest.raises(ValueError, match="decay and decay_log were both given"):
        scan(q, k, v, lr, decay=-torch.expm1(g), decay_log=g, **GATED_DELTA)
    for bad in (0.5, math.nan, math.inf):
        wrong = g.clone()
        wrong[0, 0, 2] = bad
        with pytest.raises(ValueError, match="decay_log must be <= 0"):
            scan(q, k, v, lr, decay_log=wrong, **GATED_DELTA)
    reset = g.clone()
    reset[0, 0, 3] = -math.inf
    for kernel in ("torch", "delta_chunk"):
        out, weights = scan(q, k, v, lr, decay_log=reset, initial={"W": w0}, kernel=kernel, **GATED_DELTA)
        expected, expected_weights = scan(
            q, k, v, lr, decay=-torch.expm1(reset), initial={"W": w0}, kernel="torch", **GATED_DELTA
        )
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(weights["W"], expected_weights["W"], rtol=1e-12, atol=1e-12)


def test_a_rule_without_decay_log_gets_the_decay() -> None:
    """A plugin rule that forgets but names no ``decay_log`` parameter gets ``decay = -expm1(decay_log)``."""
    seen = {}

    class DecayOnly(DualForm):
        def forward(self, state, task, views, lr, tau, decay=None):  # type: ignore[override]
            seen["decay"] = decay
            return super().forward(state, task, views, lr, tau, decay=decay)

    layer = GatedDeltaNetLayer(8, 2).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    expected = layer(x)[0]
    state = layer.init_state(1)
    views, lr, tau, _ = layer._read(x, state)
    g = layer.log_decay_factor(x)
    rule: UpdateRule = DecayOnly()
    run_scan(rule, state, layer.inner_task(), views, lr, tau, decay_log=g)
    torch.testing.assert_close(seen["decay"], -torch.expm1(g), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        run_scan(rule, state, layer.inner_task(), views, lr, tau, -torch.expm1(g), decay_log=g)
    assert expected.isfinite().all()


@pytest.mark.parametrize("member", [GatedDeltaNetLayer, TitansLayer])
def test_log_gates_stay_float32_under_bfloat16_autocast(member: type) -> None:
    """float32 inputs under bfloat16 autocast: the log gate the scan takes is float32 and equal to the one
    computed without autocast to float32's rounding of the bfloat16 projection (its logits), not rounded to
    bfloat16 itself (2^-8 relative)."""
    torch.manual_seed(0)
    layer = member(32, 2)
    x = torch.randn(1, 12, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decay, _, decay_log = layer.scan_gates(x)
        y = layer(x)[0]
    assert decay is None and decay_log.dtype == torch.float32
    assert y.dtype == torch.bfloat16 or y.dtype == torch.float32
    plain = layer.scan_gates(x)[2]
    assert decay_log.ne(decay_log.to(torch.bfloat16).float()).any()  # not bfloat16 values
    torch.testing.assert_close(decay_log, plain, rtol=0.05, atol=0)  # the bfloat16 projection's logits only


@pytest.mark.parametrize("member", [GatedDeltaNetLayer, TitansLayer])
def test_forgetting_gradient_survives_a_decay_of_one(member: type) -> None:
    """``forgetting(x)``'s decay ``-expm1(log a)``: torch's ``expm1`` backward takes ``exp`` as ``expm1 + 1``,
    0 in float32 once ``log a < -17`` (decay 1.0): the gate parameters' gradient through the decay was 0 in
    float32 (relative error 1), and ``eps / a`` off above (Gated DeltaNet's floor, 1e-4: 6e-4). Now from
    ``exp(log a)`` (:func:`~innerloop.core.functional.decay_from_log`): 3e-8 at either."""
    torch.manual_seed(0)
    layer = member(16, 2)
    with torch.no_grad():
        layer.A_log.fill_(math.log(16.0))
        layer.dt_bias.fill_(0.5)  # log a from -6 to -20 and below (Gated DeltaNet's floor at -9.2)
    layer64 = copy.deepcopy(layer).double()
    x = torch.randn(1, 8, 16)
    (layer.forgetting(x)[0].sum()).backward()
    (layer64.forgetting(x.double())[0].sum()).backward()
    assert _relative(layer.A_log.grad, layer64.A_log.grad) <= 16 * FP32_UNIT
    assert _relative(layer.a_proj.weight.grad, layer64.a_proj.weight.grad) <= 16 * FP32_UNIT


def test_bfloat16_scan_takes_its_gates_in_float32() -> None:
    """A bfloat16 scan computes in float32: its lr and gates may come in float32 (they were refused:
    "every tensor of a scan has q's dtype", which rounded a log gate of -10 to 2% of its factor), and give
    the float32 scan's numbers on the bfloat16 views; in bfloat16 they are still taken."""
    q, k, v, lr, g, momentum, _ = (t.float() for t in _problem(6, -10.0, -0.1, heads=1, width=4))
    low = [t.to(torch.bfloat16) for t in (q, k, v)]
    wide = [t.float() for t in low]
    out, weights = scan(*low, lr, decay_log=g, momentum=momentum, **TITANS)
    expected, expected_weights = scan(*wide, lr, decay_log=g, momentum=momentum, **TITANS)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(weights["W"], expected_weights["W"], rtol=0, atol=0)
    scan(*low, lr.to(torch.bfloat16), decay_log=g.to(torch.bfloat16), **GATED_DELTA)
    with pytest.raises(
        TypeError, match=r"decay_log is torch.float16; valid: torch.bfloat16 or torch.float32"
    ):
        scan(*low, lr, decay_log=g.half(), **GATED_DELTA)


@pytest.mark.parametrize(
    ("member", "gate"),
    [(GatedDeltaNetLayer, "b_proj"), (TitansLayer, "theta_proj"), (TitansLayer, "eta_proj")],
)
def test_saturated_sigmoid_gates_keep_their_gradient(member: type, gate: str) -> None:
    """A sigmoid gate held near 1 (DeltaNet's step beta at logits 17 to 21, Titans' step theta and momentum eta
    at 14 to 16): torch's sigmoid backward ``s (1 - s)`` from the rounded ``s`` put the float32 gradient of
    the gate's projection 100% (beta: every token past a logit of 17 gives 0) and 3.6e-2 (theta, eta) from
    float64's. From ``exp(logsigmoid)`` (:func:`~innerloop.core.functional.gate_sigmoid`, the same values):
    1.2e-7 and 1.3e-7."""
    torch.manual_seed(0)
    layer = member(16, 2)
    projection = layer.get_submodule(gate)
    with torch.no_grad():
        if projection.bias is not None:
            projection.weight.normal_(0.0, 0.3)
            projection.bias.fill_(17.0)
        else:  # Gated DeltaNet's b_proj has no bias
            projection.weight.normal_(1.2, 0.3)
    layer64 = copy.deepcopy(layer).double()
    x = torch.rand(1, 8, 16) + 0.5
    for model, inputs in ((layer, x), (layer64, x.double())):
        if gate == "eta_proj":
            model.scan_gates(inputs)[1].sum().backward()
        else:
            model.inner_learning_rates(inputs)[0].sum().backward()
    logits = projection(x)
    assert logits.min() > 14, logits.min()  # the case: every token's gate saturated
    got, exact = projection.weight.grad, layer64.get_submodule(gate).weight.grad
    # the gradient is ~exp(-logit): float32's rounding of a logit near 20 alone moves it ~20 units at worst
    assert _relative(got, exact) <= 16 * FP32_UNIT


def test_ttt_learning_rate_gate_keeps_its_gradient_when_saturated() -> None:
    """TTTLayer's ``lr = base_lr * sigmoid(x . w + c) / f`` at logits 15 to 20: torch's sigmoid backward gave
    the bias's float32 gradient 0 past a logit of 17 (and eps / (1 - s) off below); from
    :func:`~innerloop.core.functional.gate_sigmoid` it is float64's to float32's roundoff, values unchanged."""
    from innerloop import TTTLayer

    torch.manual_seed(0)
    layer = TTTLayer(16, 2)
    with torch.no_grad():
        layer.learnable_ttt_lr_bias.fill_(17.5)
    layer64 = copy.deepcopy(layer).double()
    x = 0.3 * torch.randn(1, 8, 16)
    for model, inputs in ((layer, x), (layer64, x.double())):
        model.inner_learning_rates(inputs)[0].sum().backward()
    got, exact = layer.learnable_ttt_lr_bias.grad, layer64.learnable_ttt_lr_bias.grad
    assert _relative(got, exact) <= 16 * FP32_UNIT
    logits = torch.nn.functional.linear(x, layer.learnable_ttt_lr_weight[:, 0]).transpose(1, 2)
    logits = logits + layer.learnable_ttt_lr_bias.reshape(1, 2, 1)  # [B, H, T], as the layer's
    assert logits.min() > 14, logits.min()  # the case: saturated
    expected = layer.base_lr * torch.sigmoid(logits) / layer.head_dim
    assert torch.equal(layer.inner_learning_rates(x)[0], expected)
