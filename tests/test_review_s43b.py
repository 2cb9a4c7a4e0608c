"""Review s43b: the grader of issues 2 (core, registry, TTT-Linear/MLP) and 12 (the family against FLA).

Checked and found right (scripts in the session's report, not kept: each repeats a cell an earlier
test holds at other shapes): FLA's naive DeltaNet, Gated DeltaNet, simple GLA and linear attention
(with an initial state, under the dot_product loss at K = 3) against scan at head dims 1, 2, 3, 5, 7,
T from 1 to 66 and two batch rows, on every rule and kernel, outputs, final states and autograd
gradients (1e-9); every model x loss x rule x wrapping x forced CPU kernel against the torch path
with decay, momentum, token scale, LN affine and initial weights, gradients included (1e-10); the
conformance vectors in float64 through every CPU kernel, whole, split and decoded; each parameter
alone requiring grad; dual_form = minibatch_gd = momentum(None) with decay; gradgradcheck through
scan with decay and momentum; inference chunk sizes against K; float16 layers.

The defects kept here, each a regression test seen failing without its fix:

- the plugin checks ran in the caller's context. The registry is built on first use, so in a fresh
  process the first ``innerloop.ops.scan`` (or ``TTTLayer``) inside ``torch.autocast("cpu",
  torch.bfloat16)`` refused the built-in ``linear`` ("fails a conformance check: forward in float32 vs
  in float64 ... 2.5e-03": the checks' float32 matmuls ran in bfloat16), and inside
  ``torch.utils.checkpoint(..., use_reentrant=False)`` ("failed its smoke test (gradient):
  _StopRecomputationError()": the checkpoint's saved-tensor hooks took the checks' own tensors); a
  plugin checked there was refused the same way;
- a layer whose scan runs ``torch.func.grad`` (``minibatch_gd``, a plugin loss without a closed-form
  gradient) failed inside a non-reentrant activation checkpoint with torch's bare "don't yet support
  saved tensor hooks", and a TTT-E2E model there with a CheckpointError (issue 5's, found on the way);
- a rotary layer (``TTTLayer``, ``CausalSelfAttention``) refusing ``num_heads`` listed every divisor of
  the width as valid, head counts it then refused for their odd head widths;
- ``layer_configs`` drew update rules that cannot run the drawn inner model (``dual_form`` for a plugin
  model that is no stack), which ``TTTLayer`` then refused.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings

import innerloop
from innerloop.core.protocol import InnerModel, LossPairs, Params
from innerloop.models.attention import CausalSelfAttention
from innerloop.plugins.models.matrix import MatrixModel
from innerloop.registry import isolated_registry
from innerloop.testing.strategies import layer_configs


class _ScaledMatrix(MatrixModel):
    """A correct third-party stack model: the built-in matrix model's bias-free ``x W``, started at 0.1 * I."""

    name = "s43b_scaled_matrix"

    def init_params(self, num_heads: int, head_dim: int, generator: torch.Generator | None = None) -> Params:
        return {"W": 0.1 * torch.eye(head_dim).expand(num_heads, head_dim, head_dim).clone()}


def test_a_plugin_checked_under_autocast_is_checked_in_float32():
    """A plugin checked under ``torch.autocast("cpu", torch.bfloat16)`` (the first scan of a
    mixed-precision training step builds the registry, or checks an instance given directly) is
    checked as anywhere else: accepted, and it runs. Before the fix its float32-vs-float64 check read
    bfloat16 matmuls and refused it (in a fresh process, the built-in ``linear`` first)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = torch.randn(1, 2, 5, 4)
        lr = torch.full((1, 2, 5), 0.1)
        out, weights = innerloop.ops.scan(q, q, q, lr, inner_model=_ScaledMatrix(), mini_batch_size=5)
    assert out.shape == (1, 2, 5, 4) and weights["W"].dtype == torch.float32


@pytest.mark.parametrize(
    ("make", "hidden_size", "num_heads", "valid"),
    [
        (innerloop.TTTLayer, 10, 3, [1, 5]),  # 10 / 2 = 5 and 10 / 10 = 1 are odd widths RoPE refuses
        (innerloop.TTTLayer, 10, 2, [1, 5]),
        (CausalSelfAttention, 12, 5, [1, 2, 3, 6]),
        (CausalSelfAttention, 12, 4, [1, 2, 3, 6]),
    ],
)
def test_the_head_counts_a_rotary_layer_suggests_are_ones_it_takes(make, hidden_size, num_heads, valid):
    """A rotary layer's refusal of ``num_heads`` lists the head counts it takes: those that divide the
    width into heads of an even width. It listed every divisor (``TTTLayer(10, 3)``: "valid num_heads for
    this width: [1, 2, 5, 10]", and 2 and 10 were then refused for their odd head widths), and the odd-width
    refusal named none."""
    with pytest.raises(ValueError, match=rf"valid num_heads for this width: {re.escape(str(valid))}$"):
        make(hidden_size, num_heads)
    for heads in valid:
        make(hidden_size, heads)  # each one suggested is taken


class _HalfMatrix(_ScaledMatrix):
    """Another correct stack model (a class of its own: its checks are not reused from another's)."""

    name = "s43b_half_matrix"

    def init_params(self, num_heads: int, head_dim: int, generator: torch.Generator | None = None) -> Params:
        return {"W": 0.5 * torch.eye(head_dim).expand(num_heads, head_dim, head_dim).clone()}


def test_a_plugin_checked_inside_an_activation_checkpoint_is_accepted_and_trains():
    """The first ``scan`` of a training step may build the registry, or check a plugin instance given
    directly, inside ``torch.utils.checkpoint(..., use_reentrant=False)`` (transformers' and Lightning's
    gradient checkpointing). The checks take gradients of their own: under the checkpoint's saved-tensor
    hooks each saved tensor was unpacked by recomputing the checkpointed function, and the built-in
    ``linear`` (or the plugin) was refused ("failed its smoke test (gradient): _StopRecomputationError()").
    They keep their saved tensors themselves now, as the kernels' first-use probe does; the step's
    gradients equal those without the checkpoint."""
    from torch.utils.checkpoint import checkpoint

    model = _HalfMatrix()
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True)

    def step(q: torch.Tensor) -> torch.Tensor:
        lr = torch.full((1, 2, 6), 0.1, dtype=torch.float64)
        return innerloop.ops.scan(q, q, q, lr, inner_model=model, mini_batch_size=3)[0]

    checkpointed = torch.autograd.grad(checkpoint(step, q, use_reentrant=False).sum(), q)[0]
    plain = torch.autograd.grad(step(q).sum(), q)[0]
    assert torch.allclose(checkpointed, plain, rtol=1e-12, atol=0)


class _NotAStack(InnerModel):
    """A correct third-party model that is no stack of affine maps (``x W * sigmoid(x U)``): the dual
    form cannot run it, mini-batch gradient descent and momentum can."""

    name = "s43b_gated"

    def param_shapes(self, head_dim: int) -> dict[str, tuple[int, ...]]:
        return {"W": (head_dim, head_dim), "U": (head_dim, head_dim)}

    def init_params(self, num_heads: int, head_dim: int, generator: torch.Generator | None = None) -> Params:
        shape = (num_heads, head_dim, head_dim)
        return {
            "W": 0.1 * torch.randn(*shape, generator=generator),
            "U": 0.1 * torch.randn(*shape, generator=generator),
        }

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return (x @ params["W"]) * torch.sigmoid(x @ params["U"])


def test_layer_configs_draws_only_rules_that_run_the_drawn_model():
    """``layer_configs(inner_models=("my_model",))`` for a plugin model that is not a stack drew the
    default ``update_rule="dual_form"`` in about half of its examples, and ``TTTLayer`` refused each
    ("update_rule='dual_form' cannot run inner_model=..."): the plugin's hypothesis test failed on the
    kit's draw. Now each drawn rule runs the drawn model, and a choice with no such pair is named."""
    with isolated_registry():
        innerloop.register_inner_model(_NotAStack())
        drawn = []

        @given(config=layer_configs(inner_models=("s43b_gated", "linear"), max_heads=1, head_dims=(2,)))
        @settings(max_examples=30, deadline=None, database=None)
        def build(config: dict) -> None:
            innerloop.TTTLayer(**config)  # refuses a rule that cannot run the model
            drawn.append((config["inner_model"], config["update_rule"]))

        build()
        assert {("s43b_gated", "minibatch_gd"), ("linear", "dual_form")} <= set(drawn)

        @given(config=layer_configs(inner_models=("s43b_gated",), update_rules=("dual_form",)))
        @settings(max_examples=1, deadline=None, database=None)
        def nothing_runs(config: dict) -> None:
            pass

        with pytest.raises(ValueError, match=r"layer_configs: no update rule of \('dual_form',\) runs"):
            nothing_runs()


class _HuberNoClosedForm(innerloop.InnerLoss):
    """A plugin loss without ``token_loss_grad``: its gradient comes from ``torch.func`` (the default)."""

    name = "s43b_huber"

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.huber_loss(prediction, target, reduction="none").sum(-1)


@pytest.mark.parametrize(
    "options",
    [dict(update_rule="minibatch_gd"), dict(inner_loss=_HuberNoClosedForm(), kernel="torch")],
    ids=["minibatch_gd", "loss_gradient_by_torch_func"],
)
def test_a_layer_whose_scan_runs_torch_func_trains_inside_an_activation_checkpoint(options):
    """``torch.utils.checkpoint(..., use_reentrant=False)`` around a TTT layer whose scan runs
    ``torch.func.grad`` (the primal form's per-token gradients, an inner loss's default gradient) failed
    with torch's bare "torch.func.{grad, vjp, jacrev, hessian} don't yet support saved tensor hooks" (the
    dual form with a closed-form loss ran). Those calls now run with the hooks suspended (their tensors
    are kept, not recomputed); the gradients equal those without the checkpoint."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = innerloop.TTTLayer(8, 2, mini_batch_size=3, **options).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    parameters = [x, *layer.parameters()]
    checkpointed = torch.autograd.grad(
        checkpoint(lambda x: layer(x)[0], x, use_reentrant=False).sum(), parameters
    )
    plain = torch.autograd.grad(layer(x)[0].sum(), parameters)
    for got, want in zip(checkpointed, plain, strict=True):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)


def test_a_ttt_e2e_model_trains_inside_an_activation_checkpoint():
    """TTT-E2E's inner step takes ``torch.autograd.grad`` through its scoring during the forward. Inside
    ``torch.utils.checkpoint(..., use_reentrant=False)`` the checkpoint's hooks held the scoring's saved
    tensors, the step's unpacking recomputed the checkpointed function mid-forward, and the backward failed
    ("CheckpointError: Recomputed values for the following tensors have different metadata"). The step
    runs with the hooks suspended now; the gradients equal those without the checkpoint."""
    from torch.utils.checkpoint import checkpoint

    from innerloop.models import ModelConfig, build_model
    from innerloop.models.config import E2EConfig

    torch.manual_seed(0)
    config = ModelConfig(
        mixer="e2e", hidden_size=16, num_heads=2, intermediate_size=32, num_layers=2, window=4
    )
    model = build_model(replace(config, e2e=E2EConfig(chunk_size=4))).double()
    ids = torch.randint(0, 256, (2, 11))
    parameters = list(model.parameters())

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return logits.logsumexp(-1).mean()

    checkpointed = torch.autograd.grad(
        loss(checkpoint(lambda i: model(i)[0], ids, use_reentrant=False)), parameters, allow_unused=True
    )
    plain = torch.autograd.grad(loss(model(ids)[0]), parameters, allow_unused=True)
    for got, want in zip(checkpointed, plain, strict=True):
        assert (got is None) == (want is None)
        assert got is None or torch.allclose(got, want, rtol=1e-12, atol=1e-15)
