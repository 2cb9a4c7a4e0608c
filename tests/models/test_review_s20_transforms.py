"""Review s20: the TTT layer and the language models under PyTorch's transforms and precision modes,
checked against the same computation eagerly in float64 (or float32 where the mode is float32).

Covers what tests/kernels/test_functorch_dispatch.py (ops.scan level), tests/models/test_compile.py
(aot_eager backend), tests/core/test_bf16.py and tests/models/test_autocast_dtypes.py leave out: a
whole ``TTTLayer`` with ``kernel="auto"`` under vmap(grad(functional_call)), jacrev and
functional_call; double backward through the layer and the models (auto equals torch, or a clear
refusal); no_grad / inference_mode against grad mode and a state moved between the modes; float16
overflow; and the default (inductor) backend on a layer with two shapes and a carried state.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

from innerloop import TTTLayer
from innerloop.config import load_config
from innerloop.core.functional import relative_error
from innerloop.models import build_model

FLOAT64_EQUAL = 1e-12  # measured 1e-16..1e-14 (a few hundred float64 roundings)
FLOAT32_EQUAL = 1e-5  # measured 2e-7..1e-6 against float64


def _layer(inner_model: str = "linear", kernel: str = "auto", **options) -> TTTLayer:
    torch.manual_seed(0)
    return TTTLayer(16, 2, inner_model=inner_model, mini_batch_size=4, kernel=kernel, **options).double()


def _max_error(actual, expected) -> float:
    return max(relative_error(a, e) for a, e in zip(actual, expected, strict=True))


@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
def test_per_sample_gradients_by_vmap_of_grad_equal_a_loop(inner_model, cpu_kernels):
    layer = _layer(inner_model)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    xs = torch.randn(3, 1, 10, 16, dtype=torch.float64)

    def loss(p, x):
        return functional_call(layer, (p,), (x,))[0].square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for index, x in enumerate(xs):
        leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
        want = torch.autograd.grad(loss(leaves, x), list(leaves.values()))  # kernel="auto": the CPU kernel
        got = [per_sample[name][index] for name in leaves]
        assert _max_error(got, want) < FLOAT64_EQUAL


def test_jacrev_of_a_layer_equals_its_rows_by_autograd(cpu_kernels):
    layer = _layer("mlp")
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    jacobian = jacrev(lambda inputs: layer(inputs)[0])(x)
    leaf = x.clone().requires_grad_()
    y, _ = layer(leaf)
    rows = [torch.autograd.grad(y.reshape(-1)[i], leaf, retain_graph=True)[0] for i in range(y.numel())]
    assert relative_error(jacobian, torch.stack(rows).reshape(jacobian.shape)) < FLOAT64_EQUAL


def test_functional_call_with_substituted_parameters_equals_a_loaded_layer(cpu_kernels):
    layer, loaded = _layer("linear"), _layer("linear", kernel="torch")
    torch.manual_seed(1)
    substitute = {
        name: (p.detach() + 0.05 * torch.randn_like(p)).requires_grad_()
        for name, p in layer.named_parameters()
    }
    loaded.load_state_dict({name: p.detach() for name, p in substitute.items()}, strict=False)
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    y, _ = functional_call(layer, substitute, (x,))
    got = torch.autograd.grad(y.square().sum(), list(substitute.values()))
    want_y, _ = loaded(x)
    want_y.square().sum().backward()
    assert relative_error(y, want_y) < FLOAT64_EQUAL
    assert relative_error(y, layer(x)[0]) > 0.1  # the substitute was used, not the layer's own weights
    assert _max_error(got, [p.grad for p in loaded.parameters()]) < FLOAT64_EQUAL


def _gradient_penalty(layer: TTTLayer, x: torch.Tensor):
    leaf = x.clone().requires_grad_()
    y, _ = layer(leaf)
    (g,) = torch.autograd.grad(y.square().sum(), leaf, create_graph=True)
    penalty = g.square().sum()
    return penalty.detach(), torch.autograd.grad(penalty, list(layer.parameters()))


@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
def test_double_backward_with_auto_is_refused_or_equals_the_torch_path(inner_model, cpu_kernels):
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"differentiable once only; pass needs_double_backward=True"):
        _gradient_penalty(_layer(inner_model), x)
    got = _gradient_penalty(_layer(inner_model, needs_double_backward=True), x)
    want = _gradient_penalty(_layer(inner_model, kernel="torch"), x)
    assert relative_error(got[0], want[0]) < FLOAT64_EQUAL
    assert _max_error(got[1], want[1]) < FLOAT64_EQUAL


@pytest.mark.parametrize("preset", ["titans-tiny", "deltanet-tiny"])
def test_a_gradient_penalty_through_a_family_model_with_auto_equals_torch(preset, cpu_kernels):
    ids = torch.randint(0, 200, (2, 12))
    results, paths = [], []
    for kernel in ("auto", "torch"):
        config, _ = load_config(preset, ["model.hidden_size=32", "model.num_layers=1"], model_only=True)
        torch.manual_seed(0)
        model = build_model(config.model).double()
        model.blocks[
            0
        ].mixer.kernel = kernel  # family configs have no kernel key (model.ttt.kernel is unread)
        params = list(model.parameters())
        logits, _ = model(ids)
        grads = torch.autograd.grad(logits.square().mean(), params, create_graph=True, allow_unused=True)
        penalty = sum(g.square().sum() for g in grads if g is not None)
        results.append(torch.autograd.grad(penalty, params, allow_unused=True))
        paths.append({path for path, _ in model.blocks[0].mixer.dispatches})
    assert paths[1] == {"torch"}  # deltanet's auto runs delta_chunk (any order of autograd), titans' torch
    pairs = [(a, b) for a, b in zip(*results, strict=True) if b is not None and b.norm() > 0]
    assert pairs and _max_error(*zip(*pairs, strict=True)) < FLOAT64_EQUAL


def test_no_grad_and_inference_mode_equal_grad_mode_and_an_inference_state_is_refused_by_grad_mode(
    cpu_kernels,
):
    layer = _layer("mlp")
    x, more = torch.randn(2, 13, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    y, state = layer(x)
    want, _ = layer(more, state)
    with torch.no_grad():
        y_no_grad, state_no_grad = layer(x)
    with torch.inference_mode():
        y_inference, state_inference = layer(x)
        continued_inference, _ = layer(more, state_no_grad)  # a no_grad state inside inference mode
    with torch.no_grad():
        continued_no_grad, _ = layer(more, state_inference)  # an inference state under no_grad
    for got in (y_no_grad, y_inference):
        assert relative_error(got, y.detach()) < FLOAT64_EQUAL
    for got in (continued_inference, continued_no_grad):
        assert relative_error(got, want.detach()) < FLOAT64_EQUAL
    with pytest.raises(ValueError, match=r"state holds inference tensors .*made under torch.inference_mode"):
        layer(more, state_inference)
    continued, _ = layer(more, state_inference.clone())  # the documented way out
    assert relative_error(continued, want) < FLOAT64_EQUAL


@pytest.mark.parametrize("mode", ["half weights", "float16 autocast"])
def test_float16_overflow_in_the_layer_is_an_error_not_nan(mode, cpu_kernels):
    torch.manual_seed(0)
    layer = TTTLayer(32, 2, mini_batch_size=8)
    x = torch.randn(2, 16, 32) * 1e5
    with pytest.raises(ValueError, match=r"projections Q, K, V overflowed float16"):
        if mode == "half weights":
            layer.half()(x.clamp(-6e4, 6e4).half())
        else:
            with torch.autocast("cpu", dtype=torch.float16):
                layer(x)


# reason: inductor (the default backend) compiles the layer's graphs (between its deliberate breaks) and
# their backwards for a first shape, then again with dynamic shapes and a given state: ~40 s of CPU
@pytest.mark.slow
def test_an_inductor_compiled_layer_equals_float64_eager_across_shapes_and_a_carried_state(cpu_kernels):
    torch.manual_seed(0)
    layer = TTTLayer(32, 2, inner_model="linear", mini_batch_size=8)
    reference = copy.deepcopy(layer).double()
    compiled = torch.compile(layer)

    def step(module, x, state=None):
        leaf = x.clone().requires_grad_()
        y, new_state = module(leaf, state)
        loss = y.double().square().sum() + sum(v.double().square().sum() for v in new_state.params.values())
        grads = torch.autograd.grad(loss, [leaf, *module.parameters()], allow_unused=True)  # a carried state
        return y.detach(), [torch.zeros(()) if g is None else g for g in grads], new_state  # skips the inits

    # one shape per kind of graph: the first call (13 tokens: a mini-batch and a part of one, no state)
    # compiles for its shape; the second (27 tokens, from the first's state, its 5 pending tokens
    # included) recompiles with dynamic shapes for a given state. Before s59c the test also ran two more
    # state-free shapes; they compiled only graphs of the kinds these two do (~12 s of CPU)
    x = torch.randn(2, 40, 32)
    y, grads, state = step(compiled, x[:, :13])
    want_y, want_grads, want_state = step(reference, x[:, :13].double())
    assert relative_error(y, want_y) < FLOAT32_EQUAL
    assert _max_error(grads, want_grads) < FLOAT32_EQUAL
    y, grads, end = step(compiled, x[:, 13:], state.detach())
    want_y, want_grads, want_end = step(reference, x[:, 13:].double(), want_state.detach())
    assert relative_error(y, want_y) < FLOAT32_EQUAL
    assert _max_error(grads, want_grads) < FLOAT32_EQUAL
    for states in ((state, want_state), (end, want_end)):
        got, want = (s.params for s in states)
        assert max(relative_error(got[k].detach(), want[k].detach()) for k in want) < FLOAT32_EQUAL
