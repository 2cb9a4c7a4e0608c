"""Review s17 (mutation round 4): the CPU kernel's decode never writes into the state it started from.

The kernel updates the weights in place when a token closes its mini-batch, so it must do that on
fresh copies (mutant K2 passed the caller's own tensors). A kept state (beam search, two continuations
of one prompt, a retry) must give the same numbers however often it is continued.
"""

from __future__ import annotations

import pytest
import torch

from innerloop import TTTLayer

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skips, with the reason, where nothing compiles

MINI_BATCH = 4
HIDDEN = 32


def _layer(inner_model: str) -> TTTLayer:
    torch.manual_seed(0)
    return TTTLayer(hidden_size=HIDDEN, num_heads=2, inner_model=inner_model, mini_batch_size=MINI_BATCH)


def _decode(layer: TTTLayer, inner_model: str, token: torch.Tensor, state):
    """One token through the layer, which must have run the compiled CPU kernel's decode."""
    out, new_state = layer(token, state)
    chosen = [name for name, _ in layer.dispatches]
    assert chosen == [f"cpu_ttt_{inner_model}.decode"], layer.dispatches
    return out, new_state


def _continue(layer: TTTLayer, inner_model: str, tokens: torch.Tensor, state) -> torch.Tensor:
    outputs = []
    for index in range(tokens.shape[1]):
        out, state = _decode(layer, inner_model, tokens[:, index : index + 1], state)
        outputs.append(out)
    return torch.cat(outputs, dim=1)


def _snapshot(state) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in state.tensors().items()}


def _assert_unchanged(state, before: dict[str, torch.Tensor], what: str) -> None:
    now = state.tensors()
    assert set(now) == set(before)
    changed = [name for name in before if not torch.equal(now[name], before[name])]
    assert not changed, f"{what} changed the kept state's {changed}"


@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
@pytest.mark.parametrize(
    ("batch", "prefix"),
    [
        # one sequence: the state's weights are still the layer's initial ones, contiguous as they are
        (1, MINI_BATCH - 1),
        # two sequences after a closed mini-batch: weights of their own per sequence
        (2, 2 * MINI_BATCH - 1),
        (2, MINI_BATCH + 1),
    ],
    ids=["closes-first-mini-batch", "closes-second-mini-batch", "mid-mini-batch"],
)
def test_cpu_decode_leaves_the_kept_state_unchanged(inner_model, batch, prefix):
    layer = _layer(inner_model).float().eval()
    x = torch.randn(batch, prefix + 1, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, state = layer(x[:, :prefix])
        before = _snapshot(state)
        out, new_state = _decode(layer, inner_model, x[:, prefix : prefix + 1], state)
        _assert_unchanged(state, before, f"decoding token {prefix}")
        if (prefix + 1) % MINI_BATCH == 0:  # the token closed its mini-batch: the new state has new weights
            moved = [k for k in state.params if not torch.equal(new_state.params[k], before[f"params.{k}"])]
            assert moved, "closing a mini-batch should have updated the weights of the new state"
        # the same token again from the same kept state: the same output and the same new state
        again, again_state = _decode(layer, inner_model, x[:, prefix : prefix + 1], state)
        assert torch.equal(again, out)
        for name, tensor in new_state.tensors().items():
            assert torch.equal(again_state.tensors()[name], tensor), name


@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
def test_two_continuations_of_one_kept_state_across_a_mini_batch_boundary_are_equal(inner_model):
    layer = _layer(inner_model).float().eval()
    x = torch.randn(1, MINI_BATCH + 3, HIDDEN, generator=torch.Generator().manual_seed(2))
    prefix = MINI_BATCH - 1  # the first decoded token closes the mini-batch
    with torch.no_grad():
        _, state = layer(x[:, :prefix])
        before = _snapshot(state)
        first = _continue(layer, inner_model, x[:, prefix:], state)
        _assert_unchanged(state, before, "the first continuation")
        second = _continue(layer, inner_model, x[:, prefix:], state)
        _assert_unchanged(state, before, "the second continuation")
    assert torch.equal(first, second), f"max difference {(first - second).abs().max().item()}"
