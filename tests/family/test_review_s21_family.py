"""Review s21 (the family layers against an independent float64 reading of ../shared/ZOO.md).

The references below are written from ZOO.md, docs/family.md and the layers' docstrings only: they read
q, k, v and the gates from the layer's parameters with plain torch ops (no innerloop code), run each
member's recurrence one token at a time, and apply the output norm and o_proj. They are checked on
shapes and gates the other family tests do not use (T = 1, T shorter than / not a multiple of K, head
widths 1, 3 and 5, one head and many, beta 0 and 1, forgetting factors at Gated DeltaNet's floor and
near 1, Titans' decay near 0 and 1 and momentum 0 and 1), with different carried states per batch
row. ``scan`` itself is checked against ZOO.md's formulas with decay, tau and K > 1 (partial last
mini-batches included). The two xfail tests are the review's findings (docs: /work/notes/review_s21_family.md).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from innerloop.core.family_layers import (
    DeltaNetLayer,
    FamilyLayer,
    GatedDeltaNetLayer,
    LinearAttentionLayer,
    TitansLayer,
)
from innerloop.ops import scan

# ----------------------------------------------------------------------------------------------
# The references (float64, token by token)
# ----------------------------------------------------------------------------------------------


def _linear(x: torch.Tensor, module: torch.nn.Linear) -> torch.Tensor:
    out = x.double() @ module.weight.double().T
    return out if module.bias is None else out + module.bias.double()


def _causal_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv, zeros before the sequence: y_t = sum_j w[j] x_{t - (k-1) + j}."""
    kernel = weight.shape[-1]
    padded = torch.cat([x.new_zeros(x.shape[0], kernel - 1, x.shape[2]), x], dim=1)
    return sum(weight[:, 0, j].double() * padded[:, j : j + x.shape[1]] for j in range(kernel))


def _layer_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = z.mean(-1, keepdim=True)
    var = ((z - mean) ** 2).mean(-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps) * weight + bias


def _read(layer: FamilyLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, T, f] as the family layers' docstrings describe them (from the sequence start)."""
    batch, tokens, _ = x.shape
    projected = {n: _linear(x, getattr(layer, f"{n}_proj")) for n in "qkv"}
    if layer.short_conv:
        projected = {n: _causal_conv(t, getattr(layer, f"{n}_conv").weight) for n, t in projected.items()}

    def heads(t, activation):
        t = F.silu(t) if activation == "silu" else t
        return t.reshape(batch, tokens, layer.num_heads, layer.head_dim).transpose(1, 2)

    q, k = heads(projected["q"], layer.qk_activation), heads(projected["k"], layer.qk_activation)
    v = heads(projected["v"], layer.value_activation)

    def feature_map(t, which):
        if layer.feature_map == "elu":
            return F.elu(t) + 1
        if layer.feature_map == "relu":
            return torch.relu(t)
        if layer.feature_map == "elementwise_product":
            m = getattr(layer, f"{which}_feature_map")
            return _linear(t, m.layer1) * _linear(t, m.layer2)
        return t

    q, k = feature_map(q, "q"), feature_map(k, "k")
    if layer.qk_l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    if layer.scale_query:
        q = q * layer.head_dim**-0.5
    return q, k, v


def _gate_logits(layer: FamilyLayer, x: torch.Tensor, name: str) -> torch.Tensor:
    return _linear(x, getattr(layer, f"{name}_proj")).transpose(1, 2)  # [B, H, T]


def _log_forget(layer: FamilyLayer, x: torch.Tensor) -> torch.Tensor:
    """log a = -exp(A_log) softplus(a_proj(x) + dt_bias) [B, H, T]."""
    logits = _gate_logits(layer, x, "a") + layer.dt_bias.double()[:, None]
    return -torch.exp(layer.A_log.double())[:, None] * F.softplus(logits)


def _output(layer: FamilyLayer, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Per-head RMSNorm, swish gate (output_gate), o_proj."""
    batch, _, tokens, _ = o.shape
    o = o.transpose(1, 2)
    o = o * torch.rsqrt((o * o).mean(-1, keepdim=True) + layer.norm_eps) * layer.post_norm.weight.double()
    o = o.reshape(batch, tokens, layer.hidden_size)
    if layer.output_gate:
        o = o * F.silu(_linear(x, layer.g_proj))
    return _linear(o, layer.o_proj)


def _start(layer: FamilyLayer, batch: int) -> dict[str, torch.Tensor]:
    return {n: p.double().expand(batch, *p.shape).clone() for n, p in layer.initial_params.items()}


def reference_linear_attention(layer: LinearAttentionLayer, x: torch.Tensor) -> torch.Tensor:
    """S_t = S_{t-1} + base_lr k_t^T v_t; o_t = q_t S_t."""
    q, k, v = _read(layer, x)
    S, outputs = _start(layer, x.shape[0])["W"], []
    for t in range(x.shape[1]):
        S = S + layer.base_lr * k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append(torch.einsum("bhi,bhij->bhj", q[:, :, t], S))
    return _output(layer, x, torch.stack(outputs, 2))


def reference_delta(layer: DeltaNetLayer, x: torch.Tensor) -> torch.Tensor:
    """FLA's (gated) delta rule: S' = a S; S = S' + beta k^T (v - k S'); o = q S, with
    beta = base_lr sigmoid(b_proj x), a = max(exp(log a), 1e-4) (Gated DeltaNet; 1 for DeltaNet and
    while base_lr = 0)."""
    q, k, v = _read(layer, x)
    beta = layer.base_lr * torch.sigmoid(_gate_logits(layer, x, "b"))
    gated = isinstance(layer, GatedDeltaNetLayer) and layer.base_lr != 0
    a = torch.exp(_log_forget(layer, x)).clamp_min(1e-4) if gated else torch.ones_like(beta)
    S, outputs = _start(layer, x.shape[0])["W"], []
    for t in range(x.shape[1]):
        S = a[:, :, t, None, None] * S
        error = v[:, :, t] - torch.einsum("bhi,bhij->bhj", k[:, :, t], S)
        S = S + beta[:, :, t, None, None] * k[:, :, t, :, None] * error[:, :, None, :]
        outputs.append(torch.einsum("bhi,bhij->bhj", q[:, :, t], S))
    return _output(layer, x, torch.stack(outputs, 2))


def _gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


def reference_titans(layer: TitansLayer, x: torch.Tensor) -> torch.Tensor:
    """ZOO.md's momentum rule: S_t = m_t S_{t-1} - lr_t grad_t(W_b), W_t = a_t W_{t-1} + S_t, the
    gradient of 1/2 ||k + LN(g(k; W)) - v||^2 at the mini-batch start W_b (exact, by autograd);
    out_t = q_t + LN(g(q_t; W_t)). lr = base_lr sigmoid(theta_proj x), a = exp(log a), m = sigmoid(eta_proj x)."""
    q, k, v = _read(layer, x)
    lr = layer.base_lr * torch.sigmoid(_gate_logits(layer, x, "theta"))
    if layer.base_lr != 0:
        a, m = torch.exp(_log_forget(layer, x)), torch.sigmoid(_gate_logits(layer, x, "eta"))
    else:
        a, m = torch.ones_like(lr), torch.zeros_like(lr)
    norm = (layer.ttt_norm_weight.double()[None], layer.ttt_norm_bias.double()[None], layer.norm_eps)

    def memory(P, inputs):  # inputs [B, H, f]
        if "W" in P:
            z = torch.einsum("bhi,bhij->bhj", inputs, P["W"])
        else:
            hidden = _gelu_tanh(torch.einsum("bhi,bhij->bhj", inputs, P["W1"]) + P["b1"][:, :, 0])
            z = torch.einsum("bhi,bhij->bhj", hidden, P["W2"]) + P["b2"][:, :, 0]
        return inputs + _layer_norm(z, *norm)

    W = _start(layer, x.shape[0])
    S = {n: torch.zeros_like(w) for n, w in W.items()}
    outputs, K = [], layer.mini_batch_size
    for t in range(x.shape[1]):
        if t % K == 0:
            W_b = {n: w.detach().clone() for n, w in W.items()}
        P = {n: w.clone().requires_grad_(True) for n, w in W_b.items()}
        with torch.enable_grad():
            loss = 0.5 * ((memory(P, k[:, :, t].detach()) - v[:, :, t].detach()) ** 2).sum()
            grads = dict(zip(P, torch.autograd.grad(loss, list(P.values())), strict=True))
        at, mt, lt = (g[:, :, t, None, None] for g in (a, m, lr))
        S = {n: mt * S[n] - lt * grads[n] for n in W}
        W = {n: at * W[n] + S[n] for n in W}
        outputs.append(memory(W, q[:, :, t]))
    return _output(layer, x, torch.stack(outputs, 2))


REFERENCES = {
    LinearAttentionLayer: reference_linear_attention,
    DeltaNetLayer: reference_delta,
    GatedDeltaNetLayer: reference_delta,
    TitansLayer: reference_titans,
}


def _reference(layer: FamilyLayer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return REFERENCES[type(layer)](layer, x)


def _perturbed(layer: FamilyLayer, scale: float = 0.3) -> FamilyLayer:
    generator = torch.Generator().manual_seed(0)
    layer = layer.double()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return layer


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# ----------------------------------------------------------------------------------------------
# Differential tests (passing)
# ----------------------------------------------------------------------------------------------

SHAPES = [(5, 1), (9, 3), (6, 6)]  # (hidden, heads): head widths 5, 3, 1
MEMBERS = {
    "linear_attention_K3_elu": lambda d, h: LinearAttentionLayer(d, h, mini_batch_size=3, feature_map="elu"),
    "linear_attention_default": lambda d, h: LinearAttentionLayer(d, h),
    "deltanet_conv2_gate": lambda d, h: DeltaNetLayer(d, h, conv_kernel=2, output_gate=True),
    "deltanet_raw_keys": lambda d, h: DeltaNetLayer(d, h, short_conv=False, qk_l2norm=False, base_lr=0.1),
    "gated_deltanet": lambda d, h: GatedDeltaNetLayer(d, h),
    "titans_K1": lambda d, h: TitansLayer(d, h, mini_batch_size=1),
    "titans_K4": lambda d, h: TitansLayer(d, h, mini_batch_size=4),
}


# Titans has the inner LayerNorm, which heads of one feature cannot take (it would ignore the memory): the
# layer refuses that width (tests/test_review_s48_s48d.py), so Titans is read at head widths 5 and 3
REFERENCE_CASES = [
    (member, hidden, heads)
    for hidden, heads in SHAPES
    for member in sorted(MEMBERS)
    if not (member.startswith("titans") and hidden == heads)
]


@pytest.mark.parametrize("member,hidden,heads", REFERENCE_CASES)
def test_each_member_equals_an_independent_float64_reference(member, hidden, heads) -> None:
    """T = 1, T < K and T not a multiple of K, whole and split with the state carried."""
    torch.manual_seed(1)
    layer = _perturbed(MEMBERS[member](hidden, heads))
    x = torch.randn(2, 7, hidden, dtype=torch.float64)
    expected = _reference(layer, x)
    assert _rel(layer(x[:, :1])[0], expected[:, :1]) < 1e-13
    assert _rel(layer(x[:, :3])[0], expected[:, :3]) < 1e-13
    whole, _ = layer(x)
    assert _rel(whole, expected) < 1e-13
    first, state = layer(x[:, :2])
    second, state = layer(x[:, 2:3], state)
    third, _ = layer(x[:, 3:], state)
    assert _rel(torch.cat([first, second, third], 1), expected) < 1e-13


def _set_gate(projection_owner: FamilyLayer, name: str, value: float) -> None:
    """Make the gate logit of ``name`` constant (a bias-free projection gets one)."""
    old = getattr(projection_owner, f"{name}_proj")
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True).double()
    with torch.no_grad():
        new.weight.zero_()
        new.bias.fill_(value)
    setattr(projection_owner, f"{name}_proj", new)


EXTREMES = {
    "deltanet_beta_0": (lambda: DeltaNetLayer(8, 2), lambda l: _set_gate(l, "b", -60.0)),
    "deltanet_beta_1": (lambda: DeltaNetLayer(8, 2), lambda l: _set_gate(l, "b", 60.0)),
    "gated_deltanet_at_floor": (
        lambda: GatedDeltaNetLayer(8, 2),
        lambda l: (l.A_log.data.fill_(math.log(16)), l.dt_bias.data.fill_(30.0)),
    ),
    "gated_deltanet_a_near_1": (
        lambda: GatedDeltaNetLayer(8, 2),
        lambda l: (l.A_log.data.fill_(-20.0), l.dt_bias.data.fill_(-20.0)),
    ),
    "gated_deltanet_lr_0": (lambda: GatedDeltaNetLayer(8, 2, base_lr=0.0), lambda l: None),
    "titans_decay_1": (
        lambda: TitansLayer(8, 2, mini_batch_size=3),
        lambda l: (l.A_log.data.fill_(math.log(16)), l.dt_bias.data.fill_(30.0)),
    ),
    "titans_decay_0": (
        lambda: TitansLayer(8, 2, mini_batch_size=3),
        lambda l: (l.A_log.data.fill_(-20.0), l.dt_bias.data.fill_(-20.0)),
    ),
    "titans_momentum_1": (lambda: TitansLayer(8, 2, mini_batch_size=3), lambda l: _set_gate(l, "eta", 60.0)),
    "titans_momentum_0": (lambda: TitansLayer(8, 2, mini_batch_size=3), lambda l: _set_gate(l, "eta", -60.0)),
    "titans_tiny_lr": (lambda: TitansLayer(8, 2, mini_batch_size=3, base_lr=1e-9), lambda l: None),
}


@pytest.mark.parametrize("case", sorted(EXTREMES))
def test_extreme_gates_equal_the_reference_whole_and_decoded(case) -> None:
    make, set_gates = EXTREMES[case]
    torch.manual_seed(2)
    layer = _perturbed(make())
    set_gates(layer)
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    expected = _reference(layer, x)
    whole, _ = layer(x)
    state, pieces = None, []
    with torch.no_grad():
        for t in range(x.shape[1]):
            y, state = layer(x[:, t : t + 1], state)
            pieces.append(y)
    assert _rel(whole, expected) < 1e-12
    assert _rel(torch.cat(pieces, 1), expected) < 1e-12


def _zoo_scan(q, k, v, lr, *, model, K, rule, tau=None, decay=None, momentum=None, initial):
    """ZOO.md's dual_form / momentum for the bare matrix or linear model, token by token."""
    a = 1 - decay
    W = {n: t.clone() for n, t in initial.items()}
    S = {n: torch.zeros_like(w) for n, w in W.items()}

    def g(P, inputs):
        if model == "matrix":
            return torch.einsum("bhi,bhij->bhj", inputs, P["W"])
        return torch.einsum("bhi,bhij->bhj", inputs, P["W1"]) + P["b1"][:, :, 0]

    outputs = []
    for t in range(q.shape[2]):
        i = t % K
        if i == 0:
            W_b = {n: w.clone() for n, w in W.items()}
            acc = {n: torch.zeros_like(w) for n, w in W.items()}
            product = torch.ones_like(lr[:, :, 0])
        P = {n: w.clone().requires_grad_(True) for n, w in W_b.items()}
        with torch.enable_grad():
            loss = 0.5 * ((g(P, k[:, :, t]) - v[:, :, t]) ** 2).sum()
            grads = dict(zip(P, torch.autograd.grad(loss, list(P.values())), strict=True))
        at, lt = a[:, :, t, None, None], lr[:, :, t, None, None]
        if rule == "dual_form":
            product = product * a[:, :, t]
            acc = {n: at * acc[n] + lt * grads[n] for n in W}
            W = {n: product[:, :, None, None] * W_b[n] - tau[i] * acc[n] for n in W}
        else:
            mt = momentum[:, :, t, None, None]
            S = {n: mt * S[n] - lt * grads[n] for n in W}
            W = {n: at * W[n] + S[n] for n in W}
        outputs.append(g(W, q[:, :, t]))
    return torch.stack(outputs, 2), W, S


@pytest.mark.parametrize("model", ["matrix", "linear"])
@pytest.mark.parametrize("rule", ["dual_form", "minibatch_gd", "momentum"])
@pytest.mark.parametrize("K,T", [(3, 7), (4, 2), (1, 1)])
def test_scan_with_decay_tau_and_momentum_equals_zoo(model, rule, K, T) -> None:
    """Decay with tau at K > 1 (dual_form, minibatch_gd), momentum across mini-batches, different
    initial weights per batch row, partial last mini-batch (its weights are the ones it read)."""
    torch.manual_seed(3)
    B, H, f = 2, 2, 3
    q, k, v = (torch.randn(B, H, T, f, dtype=torch.float64) for _ in range(3))
    lr, decay, momentum = (torch.rand(B, H, T, dtype=torch.float64) for _ in range(3))
    decay[..., 0] = 1 - 1e-9  # a near-reset at the first token
    tau = torch.rand(K, dtype=torch.float64) + 0.5
    if model == "matrix":
        initial = {"W": torch.randn(B, H, f, f, dtype=torch.float64)}
    else:
        initial = {
            "W1": torch.randn(B, H, f, f, dtype=torch.float64),
            "b1": torch.randn(B, H, 1, f, dtype=torch.float64),
        }
    options = dict(
        inner_model=model, update_rule=rule, mini_batch_size=K, inner_norm=False, inner_residual=False
    )
    if rule == "momentum":
        options["momentum"] = momentum
    else:
        options["token_scale"] = tau
    out, weights = scan(q, k, v, lr, decay=decay, initial=initial, **options)
    expected, final, surprise = _zoo_scan(
        q,
        k,
        v,
        lr,
        model=model,
        K=K,
        rule="momentum" if rule == "momentum" else "dual_form",
        tau=tau,
        decay=decay,
        momentum=momentum,
        initial=initial,
    )
    assert _rel(out, expected) < 1e-13
    for name in final:
        assert _rel(weights[name], final[name]) < 1e-13
        if rule == "momentum":
            assert _rel(weights[f"momentum.{name}"], surprise[name]) < 1e-13


@pytest.mark.slow  # gradcheck through two calls of a layer; about 2 s each
@pytest.mark.parametrize(
    "make",
    [
        # D = 4 (two heads of 2): element by element, a pair of calls per element of every parameter (at
        # D = 6 the D x D projections held 2.25x the elements, ~6.6 s)
        lambda: GatedDeltaNetLayer(4, 2, conv_kernel=2),
        lambda: TitansLayer(6, 2, mini_batch_size=2, conv_kernel=2),
    ],
    ids=["gated_deltanet", "titans"],
)
def test_gradients_through_a_carried_state_pass_gradcheck(make) -> None:
    """Every parameter and the input, across a prefix call whose state the second call continues
    (inside a mini-batch for Titans: 3 tokens then 1 with K = 2)."""
    from torch.func import functional_call

    torch.manual_seed(4)
    layer = _perturbed(make())
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())
    width = layer.hidden_size
    prefix = torch.randn(2, 3, width, dtype=torch.float64)
    x = torch.randn(2, 1, width, dtype=torch.float64, requires_grad=True)

    def f(x, *values):
        weights = dict(zip(names, values, strict=True))
        _, state = functional_call(layer, weights, (prefix,))
        y, state = functional_call(layer, weights, (x, state))
        return y, *state.params.values()

    # Titans element by element took ~10 s: in fast mode (a random direction of every input, projected
    # on a random vector of the outputs) as tests/core/test_review_s23_gradcheck.py checks it too
    fast_mode = isinstance(layer, TitansLayer)
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast_mode)


# ----------------------------------------------------------------------------------------------
# Findings (xfail until fixed)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "writer,reader",
    [
        (lambda: DeltaNetLayer(8, 2), lambda: DeltaNetLayer(8, 2, qk_l2norm=False)),
        (lambda: DeltaNetLayer(8, 2), lambda: DeltaNetLayer(8, 2, feature_map="relu")),
        (
            lambda: LinearAttentionLayer(8, 2, mini_batch_size=4),
            lambda: LinearAttentionLayer(8, 2, mini_batch_size=4, feature_map="elu"),
        ),
    ],
    ids=["qk_l2norm", "deltanet_feature_map", "linear_attention_feature_map"],
)
def test_a_state_of_a_layer_that_reads_keys_differently_is_refused(writer, reader) -> None:
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    _, state = writer().double()(x)
    with pytest.raises(ValueError, match=r"state does not belong to this layer.*qk_l2norm="):
        reader().double()(x, state)


def test_titans_mlp_steps_along_the_reference_gelu_derivative_within_its_stated_bound() -> None:
    """docs/family.md: Titans' MLP memory is TTT-MLP's inner model, whose GELU derivative has the
    reference's truncated constants: the outputs are an exact-gradient memory's to ~1e-8 relative, not
    to float64 rounding."""
    torch.manual_seed(5)
    layer = _perturbed(TitansLayer(24, 4, inner_model="mlp", mini_batch_size=5))
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    difference = _rel(layer(x)[0], _reference(layer, x))
    assert 1e-13 < difference < 1e-7  # the truncation shows, and stays within the stated bound
