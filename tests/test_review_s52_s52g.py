"""Review s52g: TTT-Linear/MLP and the family layers at shapes earlier reviews did not draw.

Each fast path the dispatcher can pick on CPU (``fused_torch_*``, ``cpu_ttt_*``, ``delta_chunk``) is
held, in float64, to the torch path of the same layer: outputs and the gradients of the input and of
every parameter (learnable inner lr, its gate, the initial fast weights, projections) to 1e-10.
Shapes: one head of 130 features (not a power of two, above Triton's 128) and of 96; a mini-batch of 1,
one that does not divide T and one larger than T; a batch of 7. A state passed in mid-mini-batch whose
tensors require grad (the carried weights and pending sums as autograd leaves: the documented way to
carry gradients across a cut, ``state.detach()`` then leaves) gives the same gradients on every path.

Measured on this host (float64): worst output/gradient difference to the torch path 1.3e-13 (head
130) and 2.8e-14 (state leaves); float32 against float64 at head 130 the fast paths' relative errors
are within 1.5x of the torch path's (3.3e-7 outputs, 6.6e-7 gradients).
"""

from __future__ import annotations

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core import family_layers as FL

TOLERANCE = 1e-10


def perturbed(layer: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Every parameter moved off its init (so the learnable inner lr and W0 matter), in float64."""
    generator = torch.Generator().manual_seed(seed)
    layer = layer.double()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * scale)
    return layer


def outputs_and_gradients(layer: torch.nn.Module, x: torch.Tensor, state=None, leaves=()):
    """The layer's outputs and the gradients of a nonlinear scalar of them w.r.t. x, ``leaves`` and
    every parameter (by name)."""
    y, _ = layer(x, state)
    named = dict(layer.named_parameters())
    wrt = [x, *leaves, *named.values()]
    grads = torch.autograd.grad(y.sin().sum(), wrt, allow_unused=True)
    names = ["x", *(f"leaf{i}" for i in range(len(leaves))), *named]
    return y, dict(zip(names, grads, strict=True))


def assert_same(got, want, what: str) -> None:
    (y, grads), (y0, grads0) = got, want
    assert (y - y0).abs().max().item() <= TOLERANCE, f"{what}: outputs"
    for name, expected in grads0.items():
        actual = grads[name]
        if expected is None:
            assert actual is None, f"{what}: {name} has a gradient only on the fast path"
            continue
        error = (actual - expected).abs().max().item()
        assert error <= TOLERANCE, f"{what}: d/d{name} differs by {error:.1e}"


def ttt_layer(model: str, width: int, heads: int, mini_batch: int, kernel: str) -> TTTLayer:
    return TTTLayer(width, heads, inner_model=model, mini_batch_size=mini_batch, use_gate=True, kernel=kernel)


@pytest.mark.slow  # 1-3 s each on a loaded 2-core host: the first-use check runs the torch path again
@pytest.mark.parametrize("path", ["fused_torch", "cpu_ttt"])
@pytest.mark.parametrize(
    ("model", "width", "heads", "mini_batch", "tokens", "batch"),
    [
        ("linear", 130, 1, 4, 9, 1),  # one head of 130: not a power of two, beyond Triton's 128
        ("mlp", 96, 1, 3, 7, 1),  # 96 features; a mini-batch that does not divide T
        ("linear", 12, 2, 1, 5, 7),  # mini-batch 1, a batch of 7
        ("mlp", 12, 2, 8, 13, 2),  # T = mini-batch + 5: one kernel block, then a decoded tail
    ],
)
def test_ttt_fast_paths_equal_the_torch_path_at_untried_shapes(
    path, model, width, heads, mini_batch, tokens, batch
):
    torch.manual_seed(0)
    kernel = f"{path}_{model}"
    reference = perturbed(ttt_layer(model, width, heads, mini_batch, "torch"), seed=1)
    layer = ttt_layer(model, width, heads, mini_batch, kernel).double()
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(batch, tokens, width, dtype=torch.float64, requires_grad=True)
    assert_same(outputs_and_gradients(layer, x), outputs_and_gradients(reference, x), kernel)
    assert layer.dispatches[0][0] == kernel


@pytest.mark.slow  # 0.4-3 s on a loaded 2-core host
@pytest.mark.parametrize("member", [FL.DeltaNetLayer, FL.GatedDeltaNetLayer])
@pytest.mark.parametrize(("width", "heads"), [(130, 1), (15, 5), (9, 3)])
def test_delta_chunk_equals_the_torch_path_at_odd_head_sizes(member, width, heads):
    torch.manual_seed(0)
    reference = perturbed(member(width, heads, kernel="torch"), seed=1)
    layer = member(width, heads, kernel="delta_chunk").double()
    layer.load_state_dict(reference.state_dict())
    batch = 1 if width > 64 else 2  # one sequence at 130 features: 3-10 s with two on the loaded host (s52p)
    x = torch.randn(batch, 7, width, dtype=torch.float64, requires_grad=True)
    assert_same(outputs_and_gradients(layer, x), outputs_and_gradients(reference, x), member.__name__)
    assert layer.dispatches[0][0] == "delta_chunk"


def state_as_leaves(state):
    """A carried state cut from its graph, each float tensor a fresh leaf that requires grad."""
    return state.detach()._map(lambda t: t.clone().requires_grad_(t.is_floating_point()))


@pytest.mark.slow  # 0.5-3 s on a loaded 2-core host
@pytest.mark.parametrize("model", ["linear", "mlp"])
@pytest.mark.parametrize("prefix", [2, 4])  # a state inside a mini-batch (pending sums), and at a boundary
def test_gradients_into_a_state_passed_in_are_path_independent(model, prefix):
    torch.manual_seed(0)
    reference = perturbed(ttt_layer(model, 12, 2, 4, "torch"), seed=1)
    x = torch.randn(2, 11, 12, dtype=torch.float64)
    with torch.no_grad():
        _, carried = reference(x[:, :prefix])
    state = state_as_leaves(carried)
    leaves = [*state.params.values(), *state.pending.values()]
    tail = x[:, prefix:].clone().requires_grad_()
    want = outputs_and_gradients(reference, tail, state, leaves)
    assert all(want[1][f"leaf{i}"] is not None for i in range(len(state.params)))
    for kernel in (f"fused_torch_{model}", f"cpu_ttt_{model}"):
        layer = ttt_layer(model, 12, 2, 4, kernel).double()
        layer.load_state_dict(reference.state_dict())
        assert_same(outputs_and_gradients(layer, tail, state, leaves), want, f"{kernel} from {prefix} tokens")
        assert kernel in [path for path, _ in layer.dispatches]
