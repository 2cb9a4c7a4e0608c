"""Review s57c: the plugin protocol's checks for third-party inner models and kernels: forward_unchecked
against forward for every kind of model (not only StackModels), the smoke test on one token and on every
declared weight, the Triton references' dtype rule, and check_kernel's large-rates case on a kernel of the
bare g at K > 1."""

from __future__ import annotations

import pytest
import torch
from plugin_testing import One

from innerloop.core.protocol import InnerModel
from innerloop.registry import PluginError, build_registry
from innerloop.testing import check_inner_model

KIT_SHAPE = {"batch": 2, "heads": 2, "head_dim": 4, "tokens": 6, "mini_batch_size": 2}


class Affine(InnerModel):
    """``g(x) = x @ W + b``, not a StackModel: its forward checks its arguments, then runs its own
    ``forward_unchecked`` (the protocol's pattern for a model of one's own)."""

    name = "s57c_affine"

    def param_shapes(self, head_dim):
        return {"W": (head_dim, head_dim), "b": (1, head_dim)}

    def init_params(self, num_heads, head_dim, generator=None):
        w = 0.1 * torch.randn(num_heads, head_dim, head_dim, generator=generator)
        return {"W": w, "b": torch.zeros(num_heads, 1, head_dim)}  # the bias starts at zero

    def forward(self, params, x):
        self.check_forward_arguments(params, x)
        return self.forward_unchecked(params, x)

    def forward_unchecked(self, params, x):
        return x @ params["W"] + params["b"]


class ForgetsBias(Affine):
    """forward adds the bias itself; forward_unchecked (what the scans run) forgets it: equal on
    init_params' zero bias, so the smoke test's bitwise comparison there passed it."""

    name = "s57c_forgets_bias"

    def forward(self, params, x):
        self.check_forward_arguments(params, x)
        return self.forward_unchecked(params, x) + params["b"]

    def forward_unchecked(self, params, x):
        return x @ params["W"]


class WrongFastPath(Affine):
    """forward_unchecked takes a 'fast path' (wrong: W transposed) on calls of more than 4 tokens only,
    which registration's 3-token inputs never reach."""

    name = "s57c_wrong_fast_path"

    def forward(self, params, x):
        self.check_forward_arguments(params, x)
        return x @ params["W"] + params["b"]

    def forward_unchecked(self, params, x):
        w = params["W"].transpose(-1, -2) if x.shape[-2] > 4 else params["W"]
        return x @ w + params["b"]


@pytest.mark.slow  # ~2.7 s: a registry and two models' registration checks (~1 s each on this CPU)
def test_registration_refuses_a_forward_unchecked_that_forgets_a_zero_initialised_weight():
    """Seen failing without the fix: the model registered (the smoke test compared the two at
    init_params' weights, where the forgotten bias is zero); the scans would train x @ W."""
    registry = build_registry(include_external=False)
    registry.add_plugin(One("inner_models", Affine()), origin="test.affine")  # the right one registers
    with pytest.raises(
        PluginError, match=r"'s57c_forgets_bias'.*forward_unchecked \(what the update rules run\) vs forward"
    ):
        registry.add_plugin(One("inner_models", ForgetsBias()), origin="test.forgets_bias")


@pytest.mark.parametrize("model", [ForgetsBias(), WrongFastPath()], ids=lambda m: m.name)
def test_check_inner_model_names_a_forward_unchecked_that_differs_from_forward(model):
    """Seen failing without the fix: the wrong fast path passed the kit (the rules and their references
    both run forward_unchecked, the forward checks forward); the forgotten bias failed inside the naive
    loop's autograd with a raw RuntimeError ('not used in the graph')."""
    with pytest.raises(
        AssertionError, match=r"forward_unchecked \(what the update rules run\) vs forward on x"
    ):
        check_inner_model(model, **KIT_SHAPE)


class IgnoresBias(Affine):
    name = "s57c_ignores_bias"

    def forward_unchecked(self, params, x):
        return x @ params["W"]


class SqueezesOneToken(Affine):
    name = "s57c_squeezes_one_token"

    def forward_unchecked(self, params, x):
        out = x @ params["W"] + params["b"]
        return out.squeeze(-2) if x.shape[-2] == 1 else out


class Float64OnOneToken(Affine):
    name = "s57c_float64_on_one_token"

    def forward_unchecked(self, params, x):
        out = x.double() @ params["W"].double() + params["b"].double()
        return out if x.shape[-2] == 1 else out.to(x.dtype)


@pytest.mark.parametrize(
    "model, message",
    [
        (IgnoresBias(), r"forward never reads the weight\(s\) \['b'\]"),
        (SqueezesOneToken(), r"forward maps \[heads, N, f\] = \(2, 1, 4\) to \(2, 4\)"),
        (
            Float64OnOneToken(),
            r"forward returns torch.float64 for float32 input and weights \(1 token\(s\)\)",
        ),
    ],
    ids=lambda p: getattr(p, "name", ""),
)
def test_the_smoke_test_names_a_model_wrong_on_one_token_or_reading_no_weight(model, message):
    """The smoke test (registration's, and check_inner_model's first step) ran forward on 3 tokens only and
    asked for a gradient w.r.t. any weight. Seen failing without it: the float64 one registered and passed
    check_inner_model; the squeezing one was refused with a raw 'size of tensor a (3) must match' and failed
    the kit with it; the one ignoring its bias registered and failed the kit with autograd's 'appears to not
    have been used in the graph'."""
    from innerloop.registry.kinds import smoke_test

    with pytest.raises(PluginError, match=message):
        smoke_test("inner_model", model)
    with pytest.raises(AssertionError, match=message):
        check_inner_model(model, **KIT_SHAPE)


class Noisy(Affine):
    name = "s57c_noisy"

    def forward_unchecked(self, params, x):
        return x @ params["W"] + params["b"] + 1e-3 * torch.randn_like(x)


def test_the_smoke_test_names_a_non_deterministic_model_as_such():
    """Seen failing without it: the refusal blamed forward_unchecked ('differs from forward'), which a
    model whose forward calls it cannot make sense of."""
    from innerloop.registry.kinds import smoke_test

    with pytest.raises(PluginError, match=r"'s57c_noisy': forward gave two outputs for one input"):
        smoke_test("inner_model", Noisy())


def _naive_inputs(naive, tokens, views, weights, norm, rates, B=1, H=2, f=4, K=2):
    g = torch.Generator().manual_seed(0)
    xq, xk, xv = (torch.randn(B, H, tokens, f, generator=g).to(views) for _ in range(3))
    lr, tau = (0.1 * torch.rand(B, H, tokens, generator=g)).to(rates), torch.ones(K, dtype=rates)
    params = {
        k: (0.1 * torch.randn(s, generator=g)).to(weights) for k, s in naive.param_shapes(B, H, f).items()
    }
    return xq, xk, xv, lr, tau, params, torch.ones(H, f, dtype=norm), torch.zeros(H, f, dtype=norm)


@pytest.mark.parametrize("naive", ["ttt_linear", "ttt_mlp"])
@pytest.mark.parametrize(
    "views, weights, norm, rates",
    [
        (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32),  # ran, in float32 at T > 0 only
        (torch.float32, torch.float64, torch.float32, torch.float32),  # raised torch's unnamed error
        (torch.float32, torch.float32, torch.float32, torch.float64),
    ],
)
def test_naive_triton_references_return_the_given_dtypes_at_every_length(naive, views, weights, norm, rates):
    """One rule, the fused kernels': out in xq's dtype, the new weights in the given ones', at T = 0 and
    T > 0, computed in the inputs' promoted dtype (the numbers: the reference on the promoted inputs).
    Seen failing without it: bfloat16 views with a float32 LayerNorm gave bfloat16 at T = 0 and float32
    at T = 2, and the other mixes raised 'expected scalar type Float but found Double'."""
    import importlib

    module = importlib.import_module(f"innerloop.kernels.triton.{naive}.naive")
    for tokens in (0, 2):
        inputs = _naive_inputs(module, tokens, views, weights, norm, rates)
        out, new = module.forward(*inputs)
        assert out.dtype == views and {v.dtype for v in new.values()} == {weights}, tokens
        wide = torch.float64 if torch.float64 in (views, weights, norm, rates) else torch.float32
        promoted = [
            {k: v.to(wide) for k, v in t.items()} if isinstance(t, dict) else t.to(wide) for t in inputs
        ]
        expected, _ = module.forward(*promoted)
        torch.testing.assert_close(out, expected.to(views), rtol=0, atol=0)
    xq, xk, xv, lr, tau, params, ln_weight, ln_bias = inputs  # decode: one token, the same rule
    pending = {k: torch.zeros_like(v) for k, v in params.items()}
    token = (xq[:, :, 0], xk[:, :, 0], xv[:, :, 0], lr[:, :, 0], tau[0], params, pending, ln_weight, ln_bias)
    out, new, new_pending = module.decode(*token, is_last=True)
    assert out.dtype == views and {v.dtype for v in (*new.values(), *new_pending.values())} == {weights}


def _bare_linear_dual_form(clamp_rates: bool):
    """A plugin kernel of the bare ``g`` (no inner LayerNorm or residual) at any mini-batch size: the
    torch scan itself, rates clamped at 1 first when ``clamp_rates`` (the mutant)."""
    from innerloop.core.ops import scan

    def forward(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
        lr = lr.clamp(max=1.0) if clamp_rates else lr
        out, weights = scan(
            xq, xk, xv, lr, inner_model="linear", mini_batch_size=tau.shape[0], token_scale=tau,
            inner_norm=False, inner_residual=False, initial=params, kernel="torch",
        )  # fmt: skip
        return out, dict(weights)

    return forward


@pytest.mark.slow  # ~2.6 s: the registry's build, then the large-rates case fails the kernel (the rest of the check is ~95 s)
@pytest.mark.usefixtures("fresh_global_registry")
def test_check_kernel_fails_a_bare_kernel_clamping_rates_at_one_at_mini_batches_of_four():
    """s56v's large-rates case was shown failing a rate-clamping kernel with the inner LayerNorm (K = 4) and
    without it at K = 1 only (delta_chunk). A kernel of the bare g at K = 4 that clamps rates at 1 fails it
    too (output off by 15%); the same kernel unclamped passes the whole check (measured, 95 s: not run here)."""
    import innerloop
    from innerloop.kernels.spec import KernelSpec
    from innerloop.testing import check_kernel

    spec = KernelSpec(
        name="s57c_bare_clamped", inner_model="linear", inner_loss="reconstruction", update_rule="dual_form",
        forward=_bare_linear_dual_form(clamp_rates=True), verify=lambda inputs: None, priority=10**6,
        fuses_inner_norm=False, check_wrapping=lambda norm, residual: "bare g only" if norm or residual else None,
    )  # fmt: skip
    innerloop.register_kernel(spec)
    with pytest.raises(
        AssertionError, match=r"the large-rates case: per-token rates up to 2.5\), .*: output"
    ):
        check_kernel("s57c_bare_clamped", head_dims=(4,), mini_batch_size=4)
