"""Review s56r: the built-in inner models and inner losses called directly (property tests, notebooks)
refuse bad input naming the plugin, the parameter, what was given and what is valid (they gave torch's
own errors, a KeyError, or ran on inconsistent shapes)."""

from __future__ import annotations

import pytest
import torch

from innerloop.core.protocol import Views
from innerloop.plugins.losses.dot_product import DotProduct
from innerloop.plugins.losses.next_token import NextToken
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.models.matrix import MatrixModel
from innerloop.plugins.models.mlp import MLPModel

MODELS = [LinearModel(), MLPModel(), MatrixModel()]
LOSSES = [Reconstruction(), NextToken(), DotProduct()]


def _params(model, heads=2, head_dim=4):
    return model.init_params(heads, head_dim)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_model_forward_refuses_x_of_another_head_dim(model):
    with pytest.raises(
        ValueError, match=rf"inner model '{model.name}': forward: params\['W1?'\].*\[2, 8,.*got \[2, 4"
    ):
        model.forward(_params(model), torch.randn(2, 3, 8))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_model_forward_refuses_a_missing_weight(model):
    params = _params(model)
    missing = sorted(params)[0]
    del params[missing]
    with pytest.raises(ValueError, match=rf"'{model.name}': forward: params.*missing \['{missing}'\]"):
        model.forward(params, torch.randn(2, 3, 4))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_model_forward_refuses_integer_x(model):
    with pytest.raises(TypeError, match=rf"'{model.name}': forward: x must be.*floating.*got torch.int64"):
        model.forward(_params(model), torch.ones(2, 3, 4, dtype=torch.int64))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_model_forward_refuses_weights_of_another_batch(model):
    """params [2, ...] against x [1, N, f] broadcast silently: two outputs for one sequence."""
    with pytest.raises(ValueError, match=rf"'{model.name}': forward: params\[.*\[1, "):
        model.forward(_params(model, heads=2), torch.randn(1, 3, 4))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_model_forward_refuses_x_that_is_not_a_tensor_or_too_flat(model):
    with pytest.raises(TypeError, match=rf"'{model.name}': forward: x must be a torch.Tensor"):
        model.forward(_params(model), [[1.0] * 4])
    with pytest.raises(ValueError, match=rf"'{model.name}': forward: x must have shape \[\*batch, N, f\]"):
        model.forward(_params(model), torch.randn(4))
    with pytest.raises(TypeError, match=rf"'{model.name}': forward: params must be a mapping"):
        model.forward(list(_params(model).values()), torch.randn(2, 3, 4))


def _views(batch=2, heads=2, tokens=3, key_width=4, value_width=4):
    return Views(
        torch.randn(batch, heads, tokens, value_width),
        torch.randn(batch, heads, tokens, key_width),
        torch.randn(batch, heads, tokens, value_width),
    )


@pytest.mark.parametrize("loss", LOSSES, ids=lambda m: m.name)
def test_loss_pairs_refuse_a_key_of_another_width(loss):
    views = _views(key_width=3)
    carry = loss.init_carry(2, 2, 4, views.value)
    with pytest.raises(
        ValueError, match=rf"inner loss '{loss.name}': pairs: views.key must have shape.*got \[2, 2, 3, 3\]"
    ):
        loss.pairs(views, carry)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda m: m.name)
def test_loss_pairs_refuse_views_that_are_not_views(loss):
    with pytest.raises(
        TypeError, match=rf"inner loss '{loss.name}': pairs: views must be an innerloop Views"
    ):
        views = _views()
        loss.pairs((views.query, views.key, views.value), {})


def test_next_token_refuses_a_carry_of_another_batch_size():
    loss = NextToken()
    views = _views(batch=2)
    carry = loss.init_carry(3, 2, 4, views.key)
    with pytest.raises(
        ValueError,
        match=r"'next_token': pairs: carry\['previous_key'\] must have shape.*\[2, 2, 1, 4\], got \[3, 2, 1, 4\]",
    ):
        loss.pairs(views, carry)


def test_next_token_refuses_a_carry_missing_an_entry():
    loss = NextToken()
    with pytest.raises(
        ValueError, match=r"'next_token': pairs: carry.*missing \['has_previous'\].*init_carry"
    ):
        loss.pairs(_views(), {"previous_key": torch.zeros(2, 2, 1, 4)})


def test_next_token_refuses_an_empty_chunk():
    loss = NextToken()
    views = _views(tokens=0)
    with pytest.raises(
        ValueError, match=r"'next_token': pairs: views must hold at least one token, got T = 0"
    ):
        loss.pairs(views, loss.init_carry(2, 2, 4, views.key))


@pytest.mark.parametrize("loss", LOSSES, ids=lambda m: m.name)
@pytest.mark.parametrize("method", ["token_loss", "token_loss_grad"])
def test_token_loss_refuses_mismatched_shapes(loss, method):
    """A target of one token against a prediction of three broadcast silently (a loss per token of the
    wrong target), one of another width failed in torch."""
    prediction = torch.randn(2, 3, 4)
    for target in (torch.randn(2, 1, 4), torch.randn(2, 3, 5)):
        with pytest.raises(
            ValueError, match=rf"inner loss '{loss.name}': {method}: target must have.*\[2, 3, 4\]"
        ):
            getattr(loss, method)(prediction, target)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda m: m.name)
def test_token_loss_refuses_integer_prediction(loss):
    with pytest.raises(TypeError, match=rf"'{loss.name}': token_loss: prediction must be.*floating"):
        loss.token_loss(torch.ones(2, 4, dtype=torch.int64), torch.ones(2, 4, dtype=torch.int64))


_WRAPPED = r"delta_chunk: computes out = q W without the inner LayerNorm and residual"


@pytest.mark.parametrize("wrapping", [(True, False), (False, True), (True, True)])
def test_the_delta_rule_kernel_named_on_a_wrapped_layer_is_refused_at_construction(wrapping):
    """delta_chunk computes the bare ``q W``: a layer naming it with the inner LayerNorm or residual on
    was built and refused at its first call (its verify); the spec now says so (check_wrapping)."""
    import innerloop
    from innerloop.core.layer import TTTLayer

    norm, residual = wrapping
    delta = {"inner_model": "matrix", "inner_norm": norm, "inner_residual": residual}
    with pytest.raises(ValueError, match=rf"kernel='delta_chunk'.*{_WRAPPED}"):
        TTTLayer(16, 2, mini_batch_size=1, kernel="delta_chunk", **delta)
    layer = TTTLayer(16, 2, mini_batch_size=1, **delta)
    with pytest.raises(ValueError, match=_WRAPPED):
        layer.kernel = "delta_chunk"
    x = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match=_WRAPPED):
        innerloop.ops.scan(x, x, x, torch.zeros(1, 2, 4), mini_batch_size=1, kernel="delta_chunk", **delta)


def test_a_model_whose_forward_unchecked_differs_from_its_forward_is_refused_at_registration():
    """The scans run ``forward_unchecked``, the conformance checks ``forward``: a model whose two differ
    would be checked on one function and trained with another."""
    from plugin_testing import One

    from innerloop.registry import PluginError, build_registry

    class Drifting(LinearModel):
        name = "drifting_unchecked"

        def forward_unchecked(self, params, x):
            return 2 * super().forward_unchecked(params, x)

    registry = build_registry(include_external=False)
    with pytest.raises(PluginError, match=r"'drifting_unchecked'.*forward_unchecked.*forward"):
        registry.add_plugin(One("inner_models", Drifting()), origin="test.drifting")
