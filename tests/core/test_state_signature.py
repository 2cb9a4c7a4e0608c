"""A state records the update rule and the layer that wrote it: another rule's or another family
member's state is refused by name, while the state itself still round-trips (to, detach, save/load)."""

from __future__ import annotations

from dataclasses import replace
from itertools import permutations

import pytest
import torch

from innerloop.core.family_layers import (
    DeltaNetLayer,
    GatedDeltaNetLayer,
    LinearAttentionLayer,
    TitansLayer,
)
from innerloop.core.layer import TTTLayer
from innerloop.core.state import TTTState
from innerloop.models import ModelConfig, TTTConfig, build_model

D, H = 16, 2


def made(factory) -> torch.nn.Module:
    torch.manual_seed(0)
    return factory().double()


def state_after(layer: torch.nn.Module, tokens: int = 5, batch: int = 2) -> TTTState:
    torch.manual_seed(1)
    with torch.no_grad():
        _, state = layer(torch.randn(batch, tokens, D, dtype=torch.float64))
    return state


def refusal(layer: torch.nn.Module, state: TTTState) -> str:
    with torch.no_grad(), pytest.raises(ValueError, match="state does not belong to this layer") as error:
        layer(torch.randn(state.batch_size, 3, D, dtype=torch.float64), state)
    return str(error.value)


def test_a_state_of_another_update_rule_is_refused_naming_it():
    dual = made(lambda: TTTLayer(D, H, inner_model="linear", update_rule="dual_form", mini_batch_size=4))
    momentum = made(lambda: TTTLayer(D, H, inner_model="linear", update_rule="momentum", mini_batch_size=4))
    assert "'update_rule': ('dual_form', 'momentum')" in refusal(momentum, state_after(dual))
    assert "'update_rule': ('momentum', 'dual_form')" in refusal(dual, state_after(momentum))


def test_a_state_of_another_family_member_with_the_same_shapes_is_refused_naming_the_layer():
    # Same inner model, loss, rule, mini-batch size and conv histories: only the layer differs.
    pairs = [
        (lambda: DeltaNetLayer(D, H), lambda: GatedDeltaNetLayer(D, H)),
        (
            lambda: DeltaNetLayer(D, H, inner_loss="dot_product", short_conv=False),
            lambda: LinearAttentionLayer(D, H, mini_batch_size=1),
        ),
        (
            lambda: TTTLayer(
                D, H, inner_model="matrix", mini_batch_size=1, inner_norm=False, inner_residual=False
            ),
            lambda: DeltaNetLayer(D, H, short_conv=False),
        ),
    ]
    for first, second in pairs:
        a, b = made(first), made(second)
        for writer, reader in ((a, b), (b, a)):
            message = refusal(reader, state_after(writer))
            assert f"'layer': ({writer.state_layer_label()!r}, {reader.state_layer_label()!r})" in message
            assert writer.state_layer_label().startswith(type(writer).__name__)
            assert "update_rule" not in message and "mini_batch_size" not in message


LAYERS = {
    "ttt": lambda: TTTLayer(D, H, mini_batch_size=4),
    "linear_attention": lambda: LinearAttentionLayer(D, H, mini_batch_size=4),
    "deltanet": lambda: DeltaNetLayer(D, H),
    "gated_deltanet": lambda: GatedDeltaNetLayer(D, H),
    "titans": lambda: TitansLayer(D, H, mini_batch_size=4),
}


@pytest.mark.parametrize(("writer", "reader"), list(permutations(LAYERS, 2)))
def test_no_member_takes_another_members_state(writer: str, reader: str):
    state = state_after(made(LAYERS[writer]))
    with torch.no_grad(), pytest.raises(ValueError, match="state does not belong to this layer"):
        made(LAYERS[reader])(torch.randn(2, 3, D, dtype=torch.float64), state)


def test_a_model_refuses_a_state_of_another_rule_or_member():
    def model(**options) -> torch.nn.Module:
        torch.manual_seed(0)
        base = {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
        return build_model(ModelConfig(**base, **options)).double().eval()

    ids, following = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 3))
    cases = [
        (model(mixer="ttt", ttt=TTTConfig(mini_batch_size=4)), model(mixer="ttt", ttt=TTTConfig(mini_batch_size=4, update_rule="momentum")), "update_rule"),
        (model(mixer="deltanet"), model(mixer="gated_deltanet"), "layer"),
    ]  # fmt: skip
    for writer, reader, field in cases:
        with torch.no_grad():
            _, state = writer(ids)
            with pytest.raises(ValueError, match=f"differ in {{'{field}'"):
                reader(following, state)


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_state_still_continues_its_own_layer_after_to_detach_clone_and_save_load(name: str):
    layer = made(LAYERS[name])
    torch.manual_seed(2)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = layer(x)
        _, state = layer(x[:, :5])
    assert state.signature.update_rule == layer.update_rule.name
    assert state.signature.layer == layer.state_layer_label()
    assert state.signature.layer.startswith(type(layer).__name__)
    loaded = TTTState.from_tensors(state.tensors(), state.metadata())
    assert loaded.signature == state.signature
    variants = {
        "itself": state,
        "detach": state.detach(),
        "clone": state.clone(),
        "to float32 and back": state.to(torch.float32).to(torch.float64),
        "saved and loaded": loaded,
    }
    for label, variant in variants.items():
        with torch.no_grad():
            rest, _ = layer(x[:, 5:], variant)
        torch.testing.assert_close(rest, whole[:, 5:], atol=1e-5, rtol=0, msg=label)


def test_a_state_that_does_not_record_its_rule_and_layer_is_refused_with_a_hint():
    layer = made(LAYERS["ttt"])
    state = state_after(layer)
    metadata = {k: v for k, v in state.metadata().items() if k not in ("update_rule", "layer")}
    old = TTTState.from_tensors(state.tensors(), metadata)  # a file written before they were recorded
    assert old.signature == replace(state.signature, update_rule=None, layer=None)
    message = refusal(layer, old)
    assert "'update_rule': (None, 'dual_form')" in message and "'layer': (None, 'TTTLayer')" in message
    assert "does not record ['layer', 'update_rule']" in message and "state=None" in message


OUTPUTS = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize(("writer", "reader"), list(permutations(OUTPUTS, 2)))
def test_a_state_of_another_inner_layernorm_or_residual_is_refused(writer, reader) -> None:
    """Its pending sums are gradients of the other f(x) = [x +] [LN](g(x)): a layer with the other
    options continued it silently into other numbers."""

    def layer(options):
        norm, residual = options
        return made(
            lambda: TTTLayer(
                D, H, inner_model="mlp", mini_batch_size=4, inner_norm=norm, inner_residual=residual
            )
        )

    state = state_after(layer(writer))
    x = torch.randn(2, 1, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"differ in \{'inner_output': "):
        layer(reader)(x, state=state)
    saved = TTTState.from_tensors(state.tensors(), state.metadata())
    assert saved.signature == state.signature  # recorded through save and load
    layer(writer)(x, state=saved)
