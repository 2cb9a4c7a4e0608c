"""Review s47a (the core against cases nobody listed):

- the conformance vectors' intermediates (``intermediate.ttt_output_pre_post_norm``, the heads' inner
  outputs before the post-norm, and ``intermediate.o_proj_input``, after the post-norm and the gate) were
  read by no test: a layer whose output matched could not say where an error entered, and no test held
  the layer's parts to the reference's one by one;
- ``output_fp64`` was compared for the dual form through ``kernel="auto"`` without autograd only (the
  CPU kernel): the dual form's torch path, the primal form (``minibatch_gd``) and the paths taken while
  recording a graph never met the reference's float64 output.
"""

from __future__ import annotations

import pytest
import torch
from core.test_conformance import CASES, FP64_RELATIVE, IN_REPOSITORY, case_directory, load_case

import innerloop
from innerloop.core.functional import relative_error
from innerloop.core.state import StateSignature, TTTState
from innerloop.interop.ttt_lm_pytorch import load_layer
from innerloop.plugins.losses.next_token import NextToken
from innerloop.plugins.models.linear import LinearModel
from innerloop.registry import PluginError, isolated_registry

# The reference's intermediates are float32, as its output: the same bound as the output's
# (tests/core/test_conformance.py; fp32 against fp64 they differ by about 1e-6).
FP32_MAX_ABS = 1e-5


def _inner_outputs_and_o_proj_input(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The layer's output, the post-norm's input (the heads' inner outputs, concatenated) and the
    output projection's input, read with forward hooks."""
    seen: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def keep(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:  # None: output kept
            seen[name] = args[0].detach().clone()

        return keep

    hooks = [
        layer.post_norm.register_forward_hook(keeper("inner")),
        layer.o_proj.register_forward_hook(keeper("o_proj_input")),
    ]
    try:
        with torch.no_grad():
            y, _ = layer(x)
    finally:
        for hook in hooks:
            hook.remove()
    return y, seen["inner"], seen["o_proj_input"]


@pytest.mark.slow  # 0.4 to 1 s a case (the c1/c2 cases, read from ../shared, 2 to 5 s on the first kernel build)
@pytest.mark.parametrize("name", CASES)
def test_the_intermediates_of_every_vector_match_the_reference(request, name):
    meta, tensors, params = load_case(case_directory(request, name), name)
    layer = load_layer(meta["layer_config"], params)
    y, inner, o_proj_input = _inner_outputs_and_o_proj_input(layer, tensors["input.hidden_states"])
    assert (y - tensors["output"]).abs().max().item() <= FP32_MAX_ABS
    expected_inner = tensors["intermediate.ttt_output_pre_post_norm"]
    assert inner.shape == expected_inner.shape
    assert (inner - expected_inner).abs().max().item() <= FP32_MAX_ABS
    expected_o_proj_input = tensors["intermediate.o_proj_input"]
    assert (o_proj_input - expected_o_proj_input).abs().max().item() <= FP32_MAX_ABS


@pytest.mark.parametrize("record_graph", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize(
    ("update_rule", "kernel"), [("dual_form", "torch"), ("dual_form", "auto"), ("minibatch_gd", "auto")]
)
@pytest.mark.slow  # 0.2 to 1 s each
@pytest.mark.parametrize("name", IN_REPOSITORY)  # c5 (share_qk, gate): the scan paths are those of c1/c2
def test_every_path_matches_the_float64_output(request, name, update_rule, kernel, record_graph):
    meta, tensors, params = load_case(case_directory(request, name), name)
    layer = load_layer(
        meta["layer_config"],
        {k: v.double() for k, v in params.items()},
        update_rule=update_rule,
        kernel=kernel,
    )
    x = tensors["input.hidden_states"].double().requires_grad_(record_graph)
    with torch.set_grad_enabled(record_graph):
        y, _ = layer(x)
    assert y.requires_grad == record_graph
    assert relative_error(y.detach(), tensors["output_fp64"]) <= FP64_RELATIVE


@pytest.mark.slow  # 2.5 s in a fresh process (the isolated registry's built-ins checked once)
def test_an_object_offered_as_another_kind_is_named_so_after_it_registered_as_its_own():
    """``register_<kind>(obj)`` of an object of another kind said so, except once the object was
    registered as its own kind: its default origin was taken then, and the error was that origin's
    clash (with the advice to remove the plugin, after which the same call fails for the kind)."""
    model = _ThirdPartyLinear()
    with isolated_registry():
        innerloop.register_inner_model(model)
        with pytest.raises(PluginError, match="is an instance of InnerModel, not of UpdateRule"):
            innerloop.register_update_rule(model)
        with pytest.raises(PluginError, match="is an instance of InnerModel, not of InnerLoss"):
            innerloop.register_inner_loss(_ThirdPartyLinear())


class _ThirdPartyLinear(LinearModel):
    """A third-party inner model (its class is not one of the built-in plugin modules')."""

    name = "s47a_linear"


class _PairWithParentheses(NextToken):
    """``next_token`` under a name a config can choose that holds ``" ("``."""

    name = "pair (previous key)"


@pytest.mark.parametrize("registered", [True, False], ids=["registered", "instance"])
def test_a_loss_whose_name_holds_a_parenthesis_selects_and_joins_its_rows(registered):
    """``index_select`` / ``cat`` compared the state's recorded inner loss with the given one's name cut at
    its first ``" ("`` (where an unregistered instance's class is appended): a loss named ``"pair
    (previous key)"``, passed as the message asks (the layer's ``inner_loss``), was refused as another."""
    loss = _PairWithParentheses()
    recorded = loss.name if registered else f"{loss.name} (unregistered tests._PairWithParentheses)"
    carry = loss.init_carry(2, 1, 2, torch.zeros(()))
    carry["previous_key"] = torch.arange(4.0).reshape(2, 1, 1, 2)
    weights = {"W1": torch.zeros(2, 1, 2, 2)}
    state = TTTState(
        params=weights,
        pending={k: torch.zeros_like(v) for k, v in weights.items()},
        position=3,
        signature=StateSignature(2, 1, 2, 4, "linear", recorded),
        loss_carry=carry,
    )
    swapped = state.index_select([1, 0], inner_loss=loss)
    assert torch.equal(swapped.loss_carry["previous_key"], carry["previous_key"][[1, 0]])
    assert TTTState.cat([state, swapped], inner_loss=loss).batch_size == 4
