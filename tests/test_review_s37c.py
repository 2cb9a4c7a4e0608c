"""Review s37c (docs, plugins and the house): the plugin testing kit's own inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import innerloop
from innerloop.config import validate_run_config
from innerloop.hf import InnerloopConfig, InnerloopForCausalLM  # transformers: imported once, at collection
from innerloop.testing import make_problem, run_in_chunks, run_layer_in_chunks
from innerloop.train import (
    build_datamodule,
    build_module,
    build_trainer,
)  # Lightning: imported once, at collection


@pytest.fixture(scope="module")
def layer_and_input():
    torch.manual_seed(0)
    return innerloop.TTTLayer(8, 2, mini_batch_size=4), torch.randn(1, 6, 8)


@pytest.mark.parametrize("cut_points", [None, 5, torch.tensor(3), {3: 1}, "35"], ids=repr)
def test_cut_points_that_are_not_a_list_are_one_line_naming_them(layer_and_input, cut_points) -> None:
    """run_layer_in_chunks / run_in_chunks with None or one int gave Python's bare "'NoneType' object
    is not iterable" (or "iteration over a 0-d tensor"), and a dict was read as its keys."""
    layer, x = layer_and_input
    expected = r"run_layer_in_chunks: cut_points must be a list of token indices .* got "
    with pytest.raises(TypeError, match=expected):
        run_layer_in_chunks(layer, x, cut_points)
    registry = innerloop.get_registry()
    problem = make_problem(registry.inner_model("linear"), registry.inner_loss("reconstruction"), tokens=6)
    with pytest.raises(TypeError, match=r"run_in_chunks: cut_points must be a list of token indices"):
        run_in_chunks(registry.update_rule("dual_form"), problem, cut_points)


@pytest.mark.parametrize(
    "cut_points", [[2, 4], (2, 4), range(2, 5, 2), torch.tensor([2, 4]), np.array([2, 4])], ids=repr
)
def test_cut_points_in_any_sequence_still_cut(layer_and_input, cut_points) -> None:
    layer, x = layer_and_input
    with torch.no_grad():
        whole, _ = layer(x)
        pieces, _ = run_layer_in_chunks(layer, x, cut_points)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_e2e():
    from innerloop.models import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig(
        mixer="e2e", hidden_size=8, num_heads=2, num_layers=4, intermediate_size=16, vocab_size=16
    )
    return build_model(config)


@pytest.mark.parametrize("method", ["stream", "stream_losses"])
@pytest.mark.parametrize("pieces", [None, 5, "ab", torch.ones(1, 5, dtype=torch.long)], ids=repr)
def test_e2e_streaming_pieces_that_are_not_an_iterable_of_pieces_are_one_line(
    tiny_e2e, method, pieces
) -> None:
    """E2ELM.stream / stream_losses(None) gave Python's bare "'NoneType' object is not iterable"; one
    [B, T] tensor (the ids themselves, not their pieces) was iterated row by row and blamed as
    'pieces[0] must be [batch, length], got shape (5,)'."""
    with pytest.raises(
        TypeError, match=rf"{method}: pieces must be an iterable of token id tensors \[batch, length\]"
    ):
        list(getattr(tiny_e2e, method)(pieces))


def test_e2e_streaming_still_takes_any_iterable_of_pieces(tiny_e2e) -> None:
    ids = torch.randint(0, 16, (1, 5))
    with torch.no_grad():
        whole, _ = tiny_e2e(ids)
    for pieces in (iter(ids.split(3, dim=1)), ids[None]):  # an iterator; a [P, B, n] tensor of pieces
        logits = torch.cat([out for out, _ in tiny_e2e.stream(pieces)], dim=1)
        torch.testing.assert_close(logits, whole)


@pytest.mark.parametrize("given", [None, "model.safetensors", 5], ids=repr)
def test_reference_interop_refuses_a_state_dict_or_config_that_is_not_a_mapping(given) -> None:
    """README's ``layer_state_dict(weights, 0)`` with weights None or a file name gave Python's bare
    "'NoneType' object has no attribute 'items'"; ``model_config`` and ``special_token_ids`` of a
    config that is not a dict gave "'NoneType' object is not a mapping" / "has no attribute 'get'"."""
    from innerloop.interop.ttt_lm_pytorch import layer_state_dict, model_config, special_token_ids

    with pytest.raises(TypeError, match=r"model_state_dict must be a dict of tensors .* got "):
        layer_state_dict(given, 0)
    for function in (model_config, special_token_ids):
        with pytest.raises(TypeError, match=r"config must be a dict of TTTConfig fields, got "):
            function(given)


@pytest.mark.parametrize("index", [-1, "0", 1.0, True], ids=repr)
def test_reference_layer_index_must_be_a_layer_number(index) -> None:
    """A str '0' was formatted into the key prefix and read as layer 0; -1 was searched for."""
    from innerloop.interop.ttt_lm_pytorch import layer_state_dict

    weights = {"model.layers.0.seq_modeling_block.q_proj.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=rf"index must be a layer number, an int >= 0, got {index!r}"):
        layer_state_dict(weights, index)
    assert list(layer_state_dict(weights, np.int64(0))) == ["q_proj.weight"]


@pytest.fixture(scope="module")
def boundary_state():
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(8, 2, mini_batch_size=4)
    with torch.no_grad():
        _, state = layer(torch.randn(1, 4, 8))
    return state


@pytest.mark.parametrize("given", [None, [], "x"], ids=repr)
def test_state_serialisation_names_tensors_and_metadata_that_are_not_dicts(boundary_state, given) -> None:
    """docs/architecture.md's TTTState.from_tensors(tensors, metadata) with None or a list gave Python's
    bare "'NoneType' object has no attribute 'items'" / "'NoneType' object is not subscriptable" (and
    a str metadata "string indices must be integers"); with_weights(None) "'NoneType' object is not
    iterable", and with_weights('x') read the str as the names ['x']."""
    from innerloop.core.state import TTTState

    tensors, metadata = boundary_state.tensors(), boundary_state.metadata()
    with pytest.raises(TypeError, match=r"^tensors must be a dict of tensors by name .* got "):
        TTTState.from_tensors(given, metadata)
    with pytest.raises(TypeError, match=r"^metadata must be a dict of strings .* got "):
        TTTState.from_tensors(tensors, given)
    with pytest.raises(TypeError, match=r"^with_weights: weights must be a dict of tensors by name .* got "):
        boundary_state.with_weights(given)
    with pytest.raises(TypeError, match=r"its entry 'W1' is a float"):
        boundary_state.with_weights({"W1": 1.0, "b1": boundary_state.params["b1"]})
    again = TTTState.from_tensors(tensors, metadata)  # what they take still round-trips
    assert torch.equal(again.params["W1"], boundary_state.params["W1"])
    assert torch.equal(
        boundary_state.with_weights(boundary_state.scan_weights()).params["W1"], boundary_state.params["W1"]
    )


@pytest.mark.parametrize("given", [None, "tiny"], ids=repr)
def test_model_config_entry_points_name_a_config_that_is_not_one(given) -> None:
    """build_model took a ModelConfig or a mapping of its fields and named anything else; its siblings
    in innerloop.models' public API (validate_model_config, validate_e2e_config, build_mixer, Block)
    gave Python's bare "'NoneType' object has no attribute 'mixer'" (or 'hidden_size', 'e2e')."""
    from innerloop.models import Block, build_mixer, validate_e2e_config, validate_model_config

    for function in (validate_model_config, validate_e2e_config, build_mixer, Block):
        with pytest.raises(TypeError, match=r"^config must be a ModelConfig, or a mapping of its fields"):
            function(given)


def test_model_config_entry_points_take_a_mapping_as_build_model_does() -> None:
    from innerloop.models import Block, build_mixer, validate_model_config

    fields = {"hidden_size": 8, "num_heads": 2, "intermediate_size": 16}
    validate_model_config(fields)
    assert isinstance(build_mixer(fields), innerloop.TTTLayer)
    assert Block(fields).mixer.hidden_size == 8


@pytest.mark.parametrize("given", [None, {"model": {}}], ids=repr)
def test_run_config_entry_points_name_a_run_that_is_not_a_run_config(given) -> None:
    """train() named a run that is not a RunConfig; validate_run_config, build_datamodule, build_module
    and build_trainer (innerloop.config / innerloop.train's public API) gave Python's bare
    "'NoneType' object has no attribute 'data'" ('optim', 'trainer', ...)."""
    for function in (validate_run_config, build_datamodule, build_module, build_trainer):
        with pytest.raises(TypeError, match=r"^run must be a RunConfig \(innerloop.config.load_config"):
            function(given)


def test_kit_helpers_name_an_input_that_is_not_a_tensor(layer_and_input) -> None:
    """run_layer_in_chunks(layer, None, ...) gave "'NoneType' object has no attribute 'shape'", and a
    [B, D] input was cut along its features and blamed by the layer as shape (B, 1);
    causal_linear_attention(None, ...) the same bare AttributeError."""
    from innerloop.testing import causal_linear_attention

    layer, x = layer_and_input
    with pytest.raises(
        TypeError, match=r"run_layer_in_chunks: x must be a torch.Tensor \[B, T, D\] .* got NoneType"
    ):
        run_layer_in_chunks(layer, None, [2])
    with pytest.raises(ValueError, match=r"run_layer_in_chunks: x must be \[B, T, D\] .* got shape \[1, 8\]"):
        run_layer_in_chunks(layer, x[:, 0], [2])
    with pytest.raises(TypeError, match=r"causal_linear_attention: key must be a torch.Tensor"):
        causal_linear_attention(torch.zeros(1, 1, 2, 2), None, torch.zeros(1, 1, 2, 2))


def test_an_hf_config_json_that_is_not_an_object_is_one_line(tmp_path) -> None:
    """A folder whose config.json holds a JSON list (or InnerloopConfig.from_dict(None)) reached
    InnerloopConfig.from_dict's ``config_dict.get`` and gave "'list' object has no attribute 'get'"
    from from_pretrained of InnerloopConfig and InnerloopForCausalLM."""
    (tmp_path / "config.json").write_text("[1, 2]")
    expected = r"^InnerloopConfig: config.json must hold a JSON object .* got "
    for load in (InnerloopConfig.from_pretrained, InnerloopForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=expected + "list"):
            load(tmp_path)
    with pytest.raises(ValueError, match=expected + "NoneType"):
        InnerloopConfig.from_dict(None)


def test_an_hf_generation_config_that_is_not_an_object_is_one_line(tmp_path) -> None:
    """A generation_config.json holding a JSON list failed inside transformers' loader, which
    InnerloopForCausalLM.from_pretrained runs after the weights: "'list' object is not a mapping"."""
    model = InnerloopForCausalLM(
        InnerloopConfig(model={"hidden_size": 8, "num_heads": 2, "num_layers": 1, "intermediate_size": 16})
    )
    model.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"generation_config.json' must hold a JSON object .* got list"):
        InnerloopForCausalLM.from_pretrained(tmp_path)
