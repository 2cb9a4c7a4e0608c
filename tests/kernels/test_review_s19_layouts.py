"""The fast paths that run on a CPU without Triton (``fused_torch_*`` and the compiled ``cpu_ttt_*``)
equal ``kernel="torch"`` whatever the memory behind their arguments: aliased q/k/v, strided, stride-0
and offset views, a non-contiguous carried state and incoming gradients that are not contiguous. Outputs,
returned weights and every gradient, float64 to 1e-10; each comparison asserts that the fast path ran
(a silent fall-back to torch would compare torch with itself)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from innerloop import TTTLayer
from innerloop.core.state import TTTState
from innerloop.ops import scan
from innerloop.testing import FLOAT64_TOLERANCE
from innerloop.testing.checks import assert_close, assert_layers_train_alike, twin_layers

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skips, with the reason, where nothing compiles

BATCH, HEADS, TOKENS, HEAD_DIM, MINI_BATCH = 2, 2, 8, 4, 4
FAST_KERNELS = [
    ("linear", "fused_torch_linear"),
    ("linear", "cpu_ttt_linear"),
    ("mlp", "fused_torch_mlp"),
    ("mlp", "cpu_ttt_mlp"),
]


def make_leaves(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor the layouts below are built from, as float64 leaves that require grad."""
    generator = torch.Generator().manual_seed(seed)
    views = (BATCH, HEADS, TOKENS, HEAD_DIM)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    flat_size = 3 * BATCH * HEADS * TOKENS * HEAD_DIM + BATCH * HEADS * TOKENS + 5
    tensors = {
        "a": rnd(*views),
        "b": rnd(*views),
        "c": rnd(*views),
        "lr": 0.05 + 0.2 * torch.rand(BATCH, HEADS, TOKENS, generator=generator, dtype=torch.float64),
        "longer": rnd(BATCH, HEADS, TOKENS + 1, HEAD_DIM),  # for overlapping windows
        "tokens_first": rnd(BATCH, TOKENS, HEADS, HEAD_DIM),  # a projection's [B, T, H, f] memory
        "wide": rnd(BATCH, HEADS, TOKENS, 2 * HEAD_DIM),  # for a last dim with a step
        "flat": rnd(flat_size),  # for offset views into one buffer
        "norm_weight": 1 + rnd(HEADS, HEAD_DIM, scale=0.1),
        "norm_bias": rnd(HEADS, HEAD_DIM, scale=0.1),
    }
    return {name: t.requires_grad_() for name, t in tensors.items()}


def _offset_views(flat: torch.Tensor, lr: torch.Tensor):
    """q, k, v and lr as views at odd offsets into one flat buffer (lr keeps its scale)."""
    size = BATCH * HEADS * TOKENS * HEAD_DIM
    shape = (BATCH, HEADS, TOKENS, HEAD_DIM)
    q, k, v = (flat[1 + i * size : 1 + (i + 1) * size].view(shape) for i in range(3))
    lr_part = flat[3 * size + 2 : 3 * size + 2 + lr.numel()].view(lr.shape)
    return q, k, v, lr + 0.01 * lr_part


LAYOUTS = {
    "q_is_k": lambda t: (t["a"], t["a"], t["b"], t["lr"]),
    "k_is_v": lambda t: (t["a"], t["b"], t["b"], t["lr"]),
    "q_is_k_is_v": lambda t: (t["a"], t["a"], t["a"], t["lr"]),
    "overlapping_windows": lambda t: (t["longer"][:, :, 1:], t["longer"][:, :, :-1], t["b"], t["lr"]),
    "permuted_from_tokens_first": lambda t: (
        t["tokens_first"].transpose(1, 2),
        t["tokens_first"].flip(1).transpose(1, 2),
        (2 * t["tokens_first"]).transpose(1, 2),
        t["lr"],
    ),
    "last_dim_with_a_step": lambda t: (t["wide"][..., ::2], t["wide"][..., 1::2], t["b"], t["lr"]),
    "batch_stride_0": lambda t: tuple(x[:1].expand_as(x) for x in (t["a"], t["b"], t["c"], t["lr"])),
    "offset_views_of_one_buffer": lambda t: _offset_views(t["flat"], t["lr"]),
}


def run_scan(kernel: str, model: str, leaves: dict, layout, initial=None) -> tuple[torch.Tensor, dict]:
    """``ops.scan`` on the views ``layout`` builds from ``leaves``; a fast kernel must have run."""
    q, k, v, lr = layout(leaves)
    dispatches: list[tuple[str, str]] = []
    out, weights = scan(
        q, k, v, lr, inner_model=model, mini_batch_size=MINI_BATCH, norm_weight=leaves["norm_weight"],
        norm_bias=leaves["norm_bias"], initial=initial, kernel=kernel, dispatches=dispatches,
    )  # fmt: skip
    paths = {path for path, _ in dispatches}
    assert paths == {kernel}, f"expected only {kernel!r} to run, the scan took {dispatches}"
    return out, weights


def random_cotangents(out: torch.Tensor, weights: dict, seed: int = 1) -> list[torch.Tensor]:
    """Contiguous random cotangents for the outputs and each returned weight (sorted by name)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [out, *(weights[name] for name in sorted(weights))]
    return [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in tensors]


def gradients(out, weights, cotangents, leaves: dict) -> list[torch.Tensor | None]:
    """The gradients of ``<out, g_out> + sum <w, g_w>`` w.r.t. every leaf (None where unused)."""
    tensors = [out, *(weights[name] for name in sorted(weights))]
    return torch.autograd.grad(tensors, list(leaves.values()), cotangents, allow_unused=True)


def assert_scans_equal(model: str, kernel: str, layout, cotangent_layout=lambda g: g, initial_layout=None):
    """The fast ``kernel`` against the torch path: outputs, weights, every leaf's gradient."""
    results = []
    for name in ("torch", kernel):
        leaves = make_leaves()
        initial = None if initial_layout is None else initial_layout(leaves, model)
        out, weights = run_scan(name, model, leaves, layout, initial)
        cotangents = [cotangent_layout(g) for g in random_cotangents(out, weights)]
        results.append((out, weights, gradients(out, weights, cotangents, leaves), list(leaves)))
    (out_ref, weights_ref, grads_ref, names), (out, weights, grads, _) = results
    assert_close(out, out_ref, f"{kernel} output", FLOAT64_TOLERANCE)
    for name in weights_ref:
        assert_close(weights[name], weights_ref[name], f"{kernel} weight {name}", FLOAT64_TOLERANCE)
    for name, grad, grad_ref in zip(names, grads, grads_ref, strict=True):
        assert (grad is None) == (grad_ref is None), f"{kernel}: gradient of {name} present on one path only"
        if grad_ref is not None:
            assert_close(grad, grad_ref, f"{kernel} gradient of {name}", FLOAT64_TOLERANCE)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(("model", "kernel"), FAST_KERNELS)
def test_aliased_and_strided_views_scan_equal_to_torch(model, kernel, layout):
    assert_scans_equal(model, kernel, LAYOUTS[layout])


COTANGENT_LAYOUTS = {
    "transposed": lambda g: g.transpose(-1, -2).contiguous().transpose(-1, -2),
    "expanded_over_all_but_the_last_dim": lambda g: g[:1, :1, :1].expand_as(g),
    "stepped": lambda g: torch.stack([g, torch.zeros_like(g)], dim=-1)[..., 0],
    "batch_stride_0": lambda g: g[:1].expand_as(g),
}


@pytest.mark.parametrize("cotangent", sorted(COTANGENT_LAYOUTS))
@pytest.mark.parametrize(("model", "kernel"), FAST_KERNELS)
def test_incoming_gradients_of_any_layout_give_torchs_gradients(model, kernel, cotangent):
    """The backward reads the incoming gradients (of the outputs and of the returned weights) by their
    strides: transposed, stride 0 or with gaps, they give the torch path's gradients."""
    assert_scans_equal(model, kernel, LAYOUTS["permuted_from_tokens_first"], COTANGENT_LAYOUTS[cotangent])


def _initial_weights(leaves: dict, model: str, layout: str) -> dict[str, torch.Tensor]:
    """Initial weights ``[B, H, *shape]`` in ``layout``; their leaves are added to ``leaves``."""
    generator = torch.Generator().manual_seed(7)
    hidden = HEAD_DIM if model == "linear" else 4 * HEAD_DIM
    shapes = {"W1": (HEAD_DIM, hidden), "b1": (1, hidden)}
    if model == "mlp":
        shapes |= {"W2": (hidden, HEAD_DIM), "b2": (1, HEAD_DIM)}
    initial = {}
    for name, (rows, cols) in shapes.items():
        leaf = 0.3 * torch.randn(BATCH, HEADS, cols, rows, generator=generator, dtype=torch.float64)
        leaves[f"initial.{name}"] = leaf.requires_grad_()
        transposed = leaf.transpose(-1, -2)  # [B, H, rows, cols], not contiguous
        initial[name] = transposed[:1].expand_as(transposed) if layout == "batch_stride_0" else transposed
    return initial


@pytest.mark.parametrize("layout", ["transposed", "batch_stride_0"])
@pytest.mark.parametrize(("model", "kernel"), FAST_KERNELS)
def test_a_non_contiguous_initial_state_scans_equal_to_torch(model, kernel, layout):
    def initial_layout(leaves, model_name):
        return _initial_weights(leaves, model_name, layout)

    assert_scans_equal(model, kernel, LAYOUTS["q_is_k"], initial_layout=initial_layout)


@pytest.mark.parametrize(("model", "kernel"), FAST_KERNELS)
def test_changing_initial_after_the_forward_keeps_the_gradients_of_the_call(model, kernel):
    """docs/architecture.md: the fast paths copy ``initial`` at the call (the fused path for stacks whose
    layers all have a bias, as the built-in models'). Changed in place before the backward, the torch path
    raises torch's in-place error; the fast paths give the gradients of the values at the call (the torch
    path's without the change)."""
    results = {}
    for name, mutate in (("torch", False), ("torch", True), (kernel, True)):
        leaves = make_leaves()
        initial = {n: t * 1 for n, t in _initial_weights(leaves, model, "transposed").items()}
        out, weights = run_scan(name, model, leaves, LAYOUTS["q_is_k"], initial)
        if mutate:
            with torch.no_grad():
                initial["W1"].mul_(1.5)
        cotangents = random_cotangents(out, weights)
        if name == "torch" and mutate:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                gradients(out, weights, cotangents, leaves)
            continue
        results[name] = dict(zip(leaves, gradients(out, weights, cotangents, leaves), strict=True))
    for leaf, grad_ref in results["torch"].items():
        if grad_ref is not None:
            assert_close(results[kernel][leaf], grad_ref, f"{kernel} gradient of {leaf}", FLOAT64_TOLERANCE)


def _non_contiguous(state: TTTState) -> TTTState:
    """The same state with every batched matrix stored transposed, every other row of a larger buffer."""

    def relayout(t: torch.Tensor) -> torch.Tensor:
        if t.dim() < 2 or t.shape[0] != BATCH:
            return t
        storage = torch.zeros((2 * BATCH + 1, *t.shape[1:-2], t.shape[-1], t.shape[-2]), dtype=t.dtype)
        storage = storage.index_copy(0, torch.arange(1, 2 * BATCH, 2), t.transpose(-1, -2))
        return storage[1::2].transpose(-1, -2)

    relaid = {n: relayout(t) for n, t in state.tensors().items()}
    assert not any(t.is_contiguous() for t in relaid.values() if t.dim() >= 2)
    return TTTState.from_tensors(relaid, state.metadata())


def _layer_dispatches(layer: TTTLayer) -> set[str]:
    return {path for path, _ in layer.dispatches}


@pytest.mark.parametrize(("model", "kernel"), FAST_KERNELS)
def test_a_non_contiguous_carried_state_continues_equal_to_torch(model, kernel):
    """A layer split at a mini-batch boundary (so that the kernel reads the carried state), its state
    relaid (transposed, at an offset) between the calls: outputs, final state and every gradient equal
    the torch path's on the same state."""
    config = dict(hidden_size=16, num_heads=HEADS, inner_model=model, mini_batch_size=MINI_BATCH)
    reference, fast = twin_layers(config, seed=0, kernel=kernel)
    x = torch.randn(BATCH, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for layer in (reference, fast):
        inputs = x.clone().requires_grad_()
        first, state = layer(inputs[:, :MINI_BATCH])
        second, final = layer(inputs[:, MINI_BATCH:], _non_contiguous(state))
        if layer is fast:
            assert kernel in _layer_dispatches(layer), layer.dispatches
        y = torch.cat([first, second], dim=1)
        loss = y.square().sum() + sum(t.sum() for t in final.tensors().values() if t.requires_grad)
        results.append((y, final, torch.autograd.grad(loss, [inputs, *layer.parameters()])))
    (y_ref, final_ref, grads_ref), (y, final, grads) = results
    assert_close(y, y_ref, "output", FLOAT64_TOLERANCE)
    for name, t in final_ref.tensors().items():
        if t.is_floating_point():
            assert_close(final.tensors()[name], t, f"state {name}", FLOAT64_TOLERANCE)
    names = ["x", *(name for name, _ in fast.named_parameters())]
    for name, grad, grad_ref in zip(names, grads, grads_ref, strict=True):
        assert_close(grad, grad_ref, f"gradient of {name}", FLOAT64_TOLERANCE)


class OneOutputForQKV(nn.Module):
    """One linear map whose output serves as Q, K and V: the three projections return the very same
    tensor (what a user's fused projection might do), so the layer's views alias one buffer."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not x:
            self._last = (x, self.linear(x))
        return self._last[1]


@pytest.mark.parametrize(("model", "kernel"), FAST_KERNELS)
def test_a_layer_whose_projections_return_one_tensor_trains_equal_to_torch(model, kernel):
    config = dict(hidden_size=16, num_heads=HEADS, inner_model=model, mini_batch_size=MINI_BATCH)
    reference, fast = twin_layers(config, seed=0, kernel=kernel)
    for layer in (reference, fast):
        shared = OneOutputForQKV(layer.q_proj)
        layer.q_proj = layer.k_proj = layer.v_proj = shared
    x = torch.randn(BATCH, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert_layers_train_alike(reference, fast, x.requires_grad_(), FLOAT64_TOLERANCE)
    assert kernel in _layer_dispatches(fast), fast.dispatches
