"""Review s17 (hostile inputs), core: a state of the wrong dtype, ``init_state``'s arguments, and
``ops.scan`` on an empty batch. Each case was accepted (silently wrong numbers) or failed deep in torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.family_layers import DeltaNetLayer, GatedDeltaNetLayer, LinearAttentionLayer, TitansLayer
from innerloop.core.state import TTTState
from innerloop.ops import scan

D, H = 16, 2
FAMILY = (LinearAttentionLayer, DeltaNetLayer, GatedDeltaNetLayer, TitansLayer)


def _layer(cls: type = TTTLayer, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(D, H, **options)


# --- H2: every state tensor in the layer's dtype ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float16])
def test_a_state_of_another_dtype_is_refused_by_name(dtype: torch.dtype) -> None:
    layer = _layer(mini_batch_size=4)
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        _, state = layer(x)
        with pytest.raises(
            TypeError,
            match=rf"state tensor params\.W1 is {dtype} but the layer keeps its state in torch\.float32",
        ):
            layer(x, state.to(dtype))


@pytest.mark.parametrize("group", ["pending", "momentum", "decay"])
def test_one_integer_tensor_in_any_group_is_refused(group: str) -> None:
    """Only the named group is cast: the check is not the params' alone."""
    layer = _layer(TitansLayer) if group != "pending" else _layer(mini_batch_size=4)
    x = torch.randn(1, 5, D)
    with torch.no_grad():
        _, state = layer(x)
    tensors = getattr(state, group)
    assert tensors, f"this layer's state has no {group}"
    name = next(iter(tensors))
    tensors[name] = tensors[name].long()
    with torch.no_grad(), pytest.raises(TypeError, match=rf"state tensor {group}\.{name} is torch\.int64"):
        layer(x, state)


def test_an_integer_loss_carry_is_refused() -> None:
    layer = _layer(inner_loss="next_token", mini_batch_size=4)
    x = torch.randn(1, 5, D)
    with torch.no_grad():
        _, state = layer(x)
    state.loss_carry["has_previous"] = state.loss_carry["has_previous"].long()
    with torch.no_grad(), pytest.raises(TypeError, match=r"loss_carry\.has_previous is torch\.int64"):
        layer(x, state)


@pytest.mark.parametrize("cls", FAMILY, ids=lambda c: c.__name__)
def test_family_layers_refuse_an_integer_state_by_name(cls: type) -> None:
    layer = _layer(cls)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        _, state = layer(x)
        with pytest.raises(
            TypeError,
            match=r"state tensor params\.W is torch\.int64 but the layer keeps its state in torch\.float32",
        ):
            layer(x, state.to(torch.int64))


@pytest.mark.parametrize("cls", [TTTLayer, *FAMILY], ids=lambda c: c.__name__)
def test_init_state_refuses_a_non_floating_like(cls: type) -> None:
    layer = _layer(cls)
    for like in (torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool), [0.0]):
        with pytest.raises(TypeError, match="like must be a floating-point torch.Tensor"):
            layer.init_state(3, like=like)


def test_init_state_with_a_float_like_still_works() -> None:
    layer = _layer(mini_batch_size=4)
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        expected, _ = layer(x)
        given, _ = layer(x, layer.init_state(2, like=x))
    assert torch.equal(given, expected)


# --- M4: init_state's batch_size ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [TTTLayer, *FAMILY], ids=lambda c: c.__name__)
@pytest.mark.parametrize("batch_size", [-1, 2.0, "2", None, True])
def test_init_state_refuses_a_bad_batch_size(cls: type, batch_size: object) -> None:
    with pytest.raises(ValueError, match=rf"batch_size must be an integer >= 0, got {batch_size!r}"):
        _layer(cls).init_state(batch_size)


@pytest.mark.parametrize("cls", [TTTLayer, *FAMILY], ids=lambda c: c.__name__)
def test_init_state_takes_zero_and_numpy_batch_sizes(cls: type) -> None:
    # kernel="torch": the delta_chunk kernel's first-use check fails on an empty batch and then stays
    # off for the process (a KernelCheckWarning), which is the kernels' to fix, not init_state's
    layer = _layer(cls, kernel="torch")
    state = layer.init_state(np.int64(3))
    assert state.batch_size == 3 and type(state.signature.batch_size) is int
    assert all(t.shape[0] == 3 for name, t in state.tensors().items() if not name.startswith("loss_carry"))
    empty = layer.init_state(0)
    with torch.no_grad():
        y, _ = layer(torch.randn(0, 4, D), empty)
    assert y.shape == (0, 4, D)


# --- L7 (and L5): ops.scan on an empty batch, and its dispatches argument -----------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"inner_model": "mlp"},
        {"update_rule": "momentum", "momentum": "per_token"},
        {"decay": "per_token"},
    ],
    ids=["linear", "mlp", "momentum", "decay"],
)
def test_scan_takes_an_empty_batch(options: dict) -> None:
    q = torch.randn(0, 2, 12, 8)
    per_token = torch.rand(0, 2, 12)
    options = {k: per_token if v == "per_token" else v for k, v in options.items()}
    outputs, weights = scan(q, q, q, per_token, **options)
    assert outputs.shape == (0, 2, 12, 8)
    assert weights and all(w.shape[:2] == (0, 2) for w in weights.values())


def test_scan_still_refuses_empty_heads_and_head_size() -> None:
    """T = 0 is an empty piece (tests/test_review_s49_s49a.py); no head or a head of no feature is refused."""
    for shape in ((1, 0, 12, 8), (1, 2, 12, 0)):
        q = torch.randn(*shape)
        with pytest.raises(ValueError, match=r"q must have shape \[B, H, T, f\] with H, f >= 1"):
            scan(q, q, q, torch.rand(*shape[:3]))


def test_scan_refuses_a_dispatches_that_is_no_list() -> None:
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(TypeError, match="dispatches must be a list"):
        scan(q, q, q, torch.rand(1, 2, 4), dispatches="x")


# --- L5: TTTState.from_tensors names a bad metadata value ---------------------------------------------------


@pytest.mark.parametrize("key", ["position", "batch_size", "num_heads"])
def test_from_tensors_names_a_metadata_value_that_is_no_integer(key: str) -> None:
    layer = _layer(mini_batch_size=4)
    with torch.no_grad():
        _, state = layer(torch.randn(1, 3, D))
    metadata = {**state.metadata(), key: "garbage"}
    with pytest.raises(ValueError, match=rf"state metadata {key}='garbage' must be an integer"):
        TTTState.from_tensors(state.tensors(), metadata)
