"""Each member of the family, as an ``innerloop.ops.scan`` call, equals FLA 0.6.0's naive op in float64.

The mappings are ../shared/ZOO.md's (checked numerically there): FLA layouts are ``[B, T, H, d]``
(``delta_rule_recurrence``: ``[B, H, T, d]``); FLA scales q inside its ops and scan does not, so scan
gets ``s * q``; FLA's state ``S [d_k, d_v]`` with ``o = q S`` is our ``W``. Outputs and final states
agree to a relative RMS error <= 1e-9 (float64 rounding is ~1e-15), under hypothesis: shapes,
mini-batch sizes, T not a multiple of K where the reference allows it.
"""

from __future__ import annotations

import torch
from fla_float64 import reference
from hypothesis import given, settings
from hypothesis import strategies as st

from innerloop.core.functional import relative_error
from innerloop.ops import scan
from innerloop.testing.strategies import seeds

TOLERANCE = 1e-9
EXAMPLES = settings(max_examples=4, deadline=None)


def ours(x: torch.Tensor) -> torch.Tensor:
    """FLA's ``[B, T, H, ...]`` -> scan's ``[B, H, T, ...]`` (and back: the same transpose)."""
    return x.transpose(1, 2)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = relative_error(actual, expected)
    assert error <= TOLERANCE, f"{what}: relative RMS error {error:.2e} > {TOLERANCE:.0e}"


class Draw:
    """Random float64 tensors from one seed."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, dtype=torch.float64) * scale

    def uniform(self, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=self.generator, dtype=torch.float64)

    def unit_keys(self, *shape: int) -> torch.Tensor:
        """l2-normalised keys (as FLA's delta-rule layers use: the recurrence is then stable)."""
        return torch.nn.functional.normalize(self.normal(*shape), dim=-1)


shapes = st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 20), st.sampled_from([4, 6, 8]))


def read_prefix_weights(run, tokens: int) -> list[dict[str, torch.Tensor]]:
    """The weights after every token ``t``: scan over the first ``t + 1`` tokens returns the weights
    its last token read (the per-token weights FLA's ``Z + LN(Z)`` outputs need)."""
    return [run(t + 1)[1] for t in range(tokens)]


# ---- (a) linear attention and its scalar-gated form ---------------------------------------------


@EXAMPLES
@given(shape=shapes, extra=st.integers(0, 5), gated=st.booleans(), seed=seeds())
def test_linear_attention(shape, extra, gated, seed):
    batch, heads, tokens, dim = shape
    draw = Draw(seed)
    q, k, v = (draw.normal(batch, tokens, heads, dim) for _ in range(3))
    scale = dim**-0.5
    if gated:
        g = torch.log(draw.uniform(batch, tokens, heads, low=0.5, high=1.0))  # log-space gate
        out, state = reference("naive_recurrent_simple_gla")(q, k, v, g, scale=scale, output_final_state=True)
    else:
        out, state = reference("naive_recurrent_linear_attn")(q, k, v, scale=scale, output_final_state=True)
    mine, weights = scan(
        ours(scale * q),
        ours(k),
        ours(v),
        torch.ones(batch, heads, tokens, dtype=torch.float64),
        inner_model="matrix",
        mini_batch_size=tokens + extra,  # one mini-batch: every gradient at W = 0 is -k^T v
        inner_norm=False,
        inner_residual=False,
        decay=ours(1.0 - g.exp()) if gated else None,
    )
    assert_close(ours(mine), out, "outputs")
    assert_close(weights["W"], state, "final state")


# ---- (b) DeltaNet, (c) Gated DeltaNet --------------------------------------------------------------


@EXAMPLES
@given(shape=shapes, rule=st.sampled_from(["dual_form", "minibatch_gd", "momentum"]), seed=seeds())
def test_deltanet(shape, rule, seed):
    batch, heads, tokens, dim = shape
    draw = Draw(seed)
    q, v = draw.normal(batch, heads, tokens, dim), draw.normal(batch, heads, tokens, dim)
    k = draw.unit_keys(batch, heads, tokens, dim)
    beta, start = draw.uniform(batch, heads, tokens), draw.normal(batch, heads, dim, dim, scale=0.3)
    out, state = reference("delta_rule_recurrence")(q, k, v, beta, initial_state=start.clone())
    mine, weights = scan(
        dim**-0.5 * q, k, v, beta, inner_model="matrix", update_rule=rule, mini_batch_size=1,
        inner_norm=False, inner_residual=False, initial={"W": start},
    )  # fmt: skip
    assert_close(mine, out, "outputs")
    assert_close(weights["W"], state, "final state")


@EXAMPLES
@given(shape=shapes, rule=st.sampled_from(["dual_form", "momentum"]), seed=seeds())
def test_gated_deltanet(shape, rule, seed):
    """FLA decays before the gradient: grad at a S = a * grad at S with target v / a, so scan gets
    lr = a beta and values v / a (ZOO.md (c))."""
    batch, heads, tokens, dim = shape
    draw = Draw(seed)
    q, v = draw.normal(batch, tokens, heads, dim), draw.normal(batch, tokens, heads, dim)
    k = draw.unit_keys(batch, tokens, heads, dim)
    beta = draw.uniform(batch, tokens, heads)
    g = torch.log(draw.uniform(batch, tokens, heads, low=0.3, high=1.0))
    start = draw.normal(batch, heads, dim, dim, scale=0.3)
    out, state = reference("naive_recurrent_gated_delta_rule")(
        q, k, v, beta, g, scale=dim**-0.5, initial_state=start.clone(), output_final_state=True
    )
    keep = ours(g.exp())  # a [B, H, T]
    mine, weights = scan(
        ours(dim**-0.5 * q), ours(k), ours(v) / keep[..., None], keep * ours(beta), inner_model="matrix",
        update_rule=rule, mini_batch_size=1, inner_norm=False, inner_residual=False, decay=1.0 - keep,
        initial={"W": start},
    )  # fmt: skip
    assert_close(ours(mine), out, "outputs")
    assert_close(weights["W"], state, "final state")


# ---- (d) TTT-Linear ----------------------------------------------------------------------------------


@EXAMPLES
@given(shape=shapes, mini_batch=st.integers(1, 6), seed=seeds())
def test_ttt_linear(shape, mini_batch, seed):
    """FLA's eta belongs to the query token: eta_t = c_n tau_{t mod K} (c per mini-batch) is scan's
    lr = c_n, token_scale = tau. FLA outputs Z + LN(Z) with Z = s q W_t + b_t, we q + LN(Z)."""
    batch, heads, tokens, dim = shape
    draw = Draw(seed)
    q, k, v = (draw.normal(batch, tokens, heads, dim) for _ in range(3))
    w, b = 1.0 + draw.normal(heads, dim, scale=0.2), draw.normal(heads, dim, scale=0.2)
    h0, hb0 = draw.normal(batch, heads, dim, dim, scale=0.1), draw.normal(batch, heads, 1, dim, scale=0.1)
    num_mini_batches = -(-tokens // mini_batch)
    per_mini_batch = draw.uniform(batch, heads, num_mini_batches, low=0.05, high=0.5)  # c_n
    tau = draw.uniform(mini_batch, low=0.2, high=1.0)
    lr = per_mini_batch.repeat_interleave(mini_batch, dim=-1)[..., :tokens]  # [B, H, T]
    eta = ours(lr * tau.repeat(num_mini_batches)[:tokens])[..., None]  # [B, T, H, 1]
    scale = dim**-0.5
    out, h, hb = reference("chunk_ttt_linear_ref")(
        q.clone(), k, v, w, b, eta, scale=scale, mini_batch_size=mini_batch,
        initial_state=h0.clone(), initial_state_bias=hb0.clone(), output_final_state=True,
    )  # fmt: skip

    def run(length: int):
        return scan(
            ours(scale * q)[:, :, :length], ours(k)[:, :, :length], ours(v)[:, :, :length], lr[:, :, :length],
            mini_batch_size=mini_batch, token_scale=tau, norm_weight=w, norm_bias=b,
            initial={"W1": h0, "b1": hb0},
        )  # fmt: skip

    mine, weights = run(tokens)
    per_token = read_prefix_weights(run, tokens)
    z = torch.stack(
        [ours(scale * q)[:, :, t : t + 1] @ p["W1"] + p["b1"] for t, p in enumerate(per_token)], 2
    )
    assert_close(ours(mine - ours(scale * q) + z[:, :, :, 0]), out, "outputs")
    assert_close(weights["W1"], h, "final W1")
    if tokens % mini_batch == 0:  # otherwise FLA's zero-padded tokens add their gradients to hb
        assert_close(weights["b1"], hb, "final b1")


# ---- (e) momentum DeltaNet, (f) Titans ---------------------------------------------------------------


@EXAMPLES
@given(shape=shapes, seed=seeds())
def test_momentum_deltanet(shape, seed):
    """S_t = alpha S - beta M_t, M_t = mu M + eta k^T (k S - v): W = S, momentum.W = -beta_t M_t,
    lr = eta beta, decay = 1 - alpha, momentum = mu beta_t / beta_{t-1} (ZOO.md (e))."""
    batch, heads, tokens, dim = shape
    draw = Draw(seed)
    q, v = draw.normal(batch, tokens, heads, dim), draw.normal(batch, tokens, heads, dim)
    k = draw.unit_keys(batch, tokens, heads, dim)
    log_alpha = torch.log(draw.uniform(batch, tokens, heads, low=0.5, high=1.0))
    log_mu = torch.log(draw.uniform(batch, tokens, heads, low=0.1, high=0.9))
    beta, eta = draw.uniform(batch, tokens, heads, low=0.1), draw.uniform(batch, tokens, heads, low=0.1)
    s0, m0 = draw.normal(batch, heads, dim, dim, scale=0.3), draw.normal(batch, heads, dim, dim, scale=0.3)
    out, state = reference("recurrent_momentum_delta_rule_ref")(
        q, k, v, log_alpha, log_mu, k, beta=beta, eta=eta, scale=dim**-0.5,
        initial_S=s0.clone(), initial_M=m0.clone(), output_final_state=True,
    )  # fmt: skip
    previous_beta = torch.cat([torch.ones_like(beta[:, :1]), beta[:, :-1]], dim=1)
    mine, weights = scan(
        ours(dim**-0.5 * q), ours(k), ours(v), ours(eta * beta), inner_model="matrix", update_rule="momentum",
        mini_batch_size=1, inner_norm=False, inner_residual=False, decay=ours(1.0 - log_alpha.exp()),
        momentum=ours(log_mu.exp() * beta / previous_beta), initial={"W": s0, "momentum.W": -m0},
    )  # fmt: skip
    assert_close(ours(mine), out, "outputs")
    assert_close(weights["W"], state[0], "final S")
    assert_close(weights["momentum.W"], -ours(beta)[:, :, -1, None, None] * state[1], "final M")


@EXAMPLES
@given(shape=shapes, chunk=st.integers(1, 5), use_chunk=st.booleans(), seed=seeds())
def test_titans(shape, chunk, use_chunk, seed):
    """FLA's chunked Titans with LN (its missing parenthesis restored): lr = 2 theta, decay = alpha,
    momentum = eta, K = chunk_size; FLA outputs Z + LN(Z), Z = q M_t (ZOO.md (e))."""
    check_titans(shape, chunk, use_chunk, seed, as_shipped=False)


def test_titans_as_shipped_is_not_a_gradient():
    """The comparison sees FLA's missing parenthesis: as shipped, its Titans differs from ours."""
    try:
        check_titans((1, 2, 12, 8), chunk=4, use_chunk=False, seed=0, as_shipped=True)
    except AssertionError as error:
        assert "relative RMS error" in str(error)
    else:
        raise AssertionError("FLA's Titans without the parenthesis agreed with scan: the test cannot fail")


def check_titans(shape, chunk, use_chunk, seed, as_shipped):
    batch, heads, tokens, dim = shape
    draw = Draw(seed)
    q, k, v = (draw.normal(batch, tokens, heads, dim) for _ in range(3))
    w, b = 1.0 + draw.normal(heads, dim, scale=0.2), draw.normal(heads, dim, scale=0.2)
    theta = draw.uniform(batch, tokens, heads, 1, low=0.01, high=0.2)
    alpha = draw.uniform(batch, tokens, heads, 1, low=0.0, high=0.3)
    eta = draw.uniform(batch, tokens, heads, 1, low=0.1, high=0.9)
    m0 = draw.normal(batch, heads, dim, dim, scale=0.2)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # titans/log_impl.py builds a tensor in the default dtype
    try:
        out, state = reference("chunk_titans_linear_ref", as_shipped)(
            q, k, v, w, b, theta, alpha, eta, chunk_size=chunk, initial_state=m0.clone(),
            output_final_state=True, use_chunk=use_chunk,
        )  # fmt: skip
    finally:
        torch.set_default_dtype(default)

    def run(length: int):
        return scan(
            ours(q)[:, :, :length], ours(k)[:, :, :length], ours(v)[:, :, :length], 2 * ours(theta)[:, :, :length, 0],
            inner_model="matrix", update_rule="momentum", mini_batch_size=chunk, norm_weight=w, norm_bias=b,
            decay=ours(alpha)[:, :, :length, 0], momentum=ours(eta)[:, :, :length, 0], initial={"W": m0},
        )  # fmt: skip

    mine, weights = run(tokens)
    z = torch.cat(
        [ours(q)[:, :, t : t + 1] @ p["W"] for t, p in enumerate(read_prefix_weights(run, tokens))], 2
    )
    assert_close(ours(mine - ours(q) + z), out, "outputs")
    if tokens % chunk == 0:  # otherwise FLA's padding adds a decay (and a momentum step) to its final M
        assert_close(weights["W"], state, "final M")
