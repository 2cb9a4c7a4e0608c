"""Review s37a: core numerics at configurations no other test used (all found right; kept as guards).

The compiled CPU kernels through a layer, against the torch path in float64: a state carried from the
middle of a mini-batch whose weights *and pending sums* are leaves of the graph (their gradients go
through the kernel's hand-written backward), the call split again inside a mini-batch, the gate and
shared QK on, batch rows of different content; and parameters frozen in subsets (requires_grad mixes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from innerloop import TTTLayer

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skips, with the reason, where nothing compiles

FLOAT64 = 1e-10  # relative to each tensor's largest entry; observed <= 3e-14


def perturbed(model: str, kernel: str) -> TTTLayer:
    """A float64 layer (head_dim 4, mini-batch 3) with every parameter moved off its init, and one
    token-index offset below -1 (its tau is clamped to 0, so its gradient is cut)."""
    torch.manual_seed(0)
    layer = TTTLayer(8, 2, inner_model=model, mini_batch_size=3, kernel=kernel, use_gate=True, share_qk=True)
    layer = layer.double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.1)
        layer.learnable_token_idx[1] = -2.0
    return layer


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def carried_state_run(layer: TTTLayer, frozen: tuple[str, ...] = ()) -> tuple[torch.Tensor, list]:
    """Outputs and gradients (input, state leaves, trainable parameters) of a run from a state left
    4 tokens in (mid mini-batch), split 2 + 7 (the second part ends inside a mini-batch)."""
    for name, p in layer.named_parameters():
        p.requires_grad_(name not in frozen)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 13, 8, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        _, state = layer(x[:, :4])
    names = sorted(state.params)
    params = {n: state.params[n].clone().requires_grad_() for n in names}
    pending = {n: state.pending[n].clone().requires_grad_() for n in names}
    state = dataclasses.replace(state, params=params, pending=pending)
    inputs = x[:, 4:].clone().requires_grad_("x" not in frozen)
    y1, state = layer(inputs[:, :2], state)
    y2, state = layer(inputs[:, 2:], state)
    y = torch.cat([y1, y2], 1)
    cotangent = torch.randn(y.shape, generator=generator, dtype=y.dtype)
    loss = (y * cotangent).sum() + sum((state.params[n] ** 2).sum() for n in names)
    leaves = [*params.values(), *pending.values(), *(p for p in layer.parameters() if p.requires_grad)]
    leaves += [inputs] if inputs.requires_grad else []
    return y, list(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_the_cpu_kernels_backward_from_a_carried_mid_mini_batch_state_equals_torch(model):
    kernel_layer = perturbed(model, f"cpu_ttt_{model}")
    y, grads = carried_state_run(kernel_layer)
    assert any(path == f"cpu_ttt_{model}" for path, _ in kernel_layer.dispatches)  # the kernel ran
    y_ref, grads_ref = carried_state_run(perturbed(model, "torch"))
    assert relative(y, y_ref) <= FLOAT64
    for got, want in zip(grads, grads_ref, strict=True):
        assert relative(got, want) <= FLOAT64


@pytest.mark.parametrize(
    "frozen",
    [("x",), ("learnable_token_idx", "learnable_ttt_lr_weight"), ("initial_params.W1", "ttt_norm_weight")],
)
def test_the_cpu_kernel_with_frozen_parameters_equals_torch(frozen):
    y, grads = carried_state_run(perturbed("linear", "cpu_ttt_linear"), frozen)
    y_ref, grads_ref = carried_state_run(perturbed("linear", "torch"), frozen)
    assert relative(y, y_ref) <= FLOAT64
    for got, want in zip(grads, grads_ref, strict=True):
        assert relative(got, want) <= FLOAT64


KERNELS_README = Path(__file__).resolve().parents[1] / "innerloop" / "kernels" / "README.md"
FUSED_README = KERNELS_README.parent / "fused_torch" / "README.md"


def test_a_training_only_kernels_blocks_without_a_graph_run_where_auto_would_as_its_readmes_say():
    """kernels/README.md's table said ``compiled_torch_*`` ran inference "as ``fused_torch``", and
    fused_torch/README.md that "inference keeps the in-place scan"; dispatch sends those blocks where
    ``kernel="auto"`` would (the CPU kernel on CPU), as README.md and docs/architecture.md say."""
    paths = []
    for kernel in ("compiled_torch_linear", "auto"):
        torch.manual_seed(0)
        layer = TTTLayer(8, 2, mini_batch_size=2, kernel=kernel)
        with torch.no_grad():
            layer(torch.randn(1, 4, 8))
        paths.append([path for path, _ in layer.dispatches])
    assert paths[0] == paths[1] == ["cpu_ttt_linear"]
    row = next(line for line in KERNELS_README.read_text().splitlines() if "`compiled_torch_linear`" in line)
    assert "inference as `fused_torch`" not in row and "where `kernel='auto'` would" in row
    fused = " ".join(FUSED_README.read_text().split())
    assert "inference keeps the in-place scan" not in fused
    assert 'go where `kernel="auto"` would' in fused


def test_an_inference_mode_x_in_a_call_that_records_a_graph_is_one_clear_error():
    """The state got this message (``_check_state_is_recordable``); an ``x`` made under
    ``torch.inference_mode`` met torch's bare RuntimeError from inside the first projection."""
    layer = TTTLayer(8, 2, mini_batch_size=2, kernel="torch")
    with torch.inference_mode():
        x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match=r"^x is an inference tensor .*torch\.no_grad\(\)"):
        layer(x)
    with torch.no_grad():  # no graph: accepted, as are a clone and a layer with nothing to train
        expected, _ = layer(x)
    assert torch.equal(layer(x.clone())[0].detach(), expected)
    layer.requires_grad_(False)
    assert torch.equal(layer(x)[0], expected)


def test_inference_mode_arguments_of_ops_scan_in_a_call_that_records_a_graph_are_one_clear_error():
    from innerloop import ops

    with torch.inference_mode():
        q, lr = torch.randn(1, 1, 2, 4), torch.full((1, 1, 2), 0.1)
    k = torch.randn(1, 1, 2, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"^q, lr: inference tensors .*records a graph"):
        ops.scan(q, k, k, lr, mini_batch_size=2, kernel="torch")
    with torch.no_grad():
        expected, _ = ops.scan(q, k, k, lr, mini_batch_size=2, kernel="torch")
    got, _ = ops.scan(q, k.detach(), k.detach(), lr, mini_batch_size=2, kernel="torch")  # nothing to record
    assert torch.equal(got, expected)


@pytest.mark.parametrize("mixer", ["ttt", "e2e"])
@pytest.mark.filterwarnings("ignore::innerloop.models.e2e.OneChunkTrainingWarning")  # a sequence of one chunk
def test_inference_mode_token_ids_in_a_call_that_records_a_graph_are_one_clear_error(mixer):
    """The same kind at the models' entry: torch's embedding raised its bare RuntimeError."""
    from innerloop.models.factory import build_model

    torch.manual_seed(0)
    layers = 1 if mixer == "ttt" else 2
    model = build_model(dict(mixer=mixer, vocab_size=8, hidden_size=8, num_layers=layers, num_heads=2))
    with torch.inference_mode():
        ids = torch.randint(0, 8, (1, 3))
    with pytest.raises(ValueError, match=r"^input_ids is an inference tensor .*torch\.no_grad\(\)"):
        model(ids)
    with torch.no_grad():  # no graph: accepted
        model(ids)
