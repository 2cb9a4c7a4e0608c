"""Review s60 r4: the TTT family and the plugin path, attacked with odd shapes, hostile gates and broken
plugins.

Checked and found right (scripts in the review's scratch folder, not repeated here): ``ops.scan`` against a
float64 token loop of docs/family.md's equations (matrix model, dual_form and momentum, K in {1, 4, 16}, T in
{1, 5, 17}, head dims 1 and 3, batch 1 and 5, 1 and 7 heads, decay 0 / 1 / 1e-300, the gate as ``decay``
and as ``decay_log`` with ``-inf``, splits with the state carried): 6e-14; the ``delta_chunk`` kernel against
the torch path at T = 1, 63, 64, 65, 130 (chunk edges), head dims 1 / 3 / 5, beta 0 and 1, full resets:
1e-14; gradcheck of scan (every tensor argument, decay and momentum included) on dual_form / momentum /
minibatch_gd, matrix / linear / mlp, both kernels; the four family layers decoded token by token and split
at random against the whole sequence (hidden/heads 3/3, 6/2, 7/1, 12/4, batch 1 and 5, T 1 / 7 / 19, the
MLP memory, elu features, base_lr 2): 2e-14; float32 / bfloat16 / float16 layers against float64 (2e-7,
1e-2, 1e-3); base_lr=0 freezes the memory; linear attention's outputs do not depend on mini_batch_size; the
gate hooks set on the layer, on a subclass, and removed again reach the scan as docs/family.md says; every
broken plugin tried (a loss not reduced over f, NaN, detached or integer-valued, a wrong closed-form
gradient, bad pairs, an empty or non-string name, a built-in's name; a model of the wrong output shape,
dtype, NaN, unread weight, mixing tokens, writing in place, a wrong activation derivative; a rule ignoring
decay or tau, detaching lr or decay, mixing sequences, scaling lr by 1e-4, NaN, the wrong dtype, not
advancing its state; a misspelt hook; two entry points with one name) is refused by name, at registration
and when passed to ``scan`` unregistered.

Found: a layer's gate hooks (``forgetting`` / ``log_forgetting``, overridden in a subclass or set on the
layer) were not checked: a decay outside [0, 1] or a ``log a > 0`` ran (on the torch paths) a memory that
flips sign or grows at every token, where ``ops.scan`` refuses the same gates; a float, a tensor or a triple
returned failed deep inside with an AttributeError or an unpacking error, and so did a float learning rate
from ``inner_learning_rates`` (a bare lr tensor was unpacked along its batch into a wrong shape error); a
Gated DeltaNet ``log_decay_factor`` override of the wrong shape failed inside ``v / a`` unnamed; a plugin
loss whose pairs give NaN was refused as "not deterministic" (NaN != NaN).
"""

from __future__ import annotations

import re

import pytest
import torch

from innerloop.core.family_layers import DeltaNetLayer, GatedDeltaNetLayer, TitansLayer
from innerloop.core.layer import TTTLayer
from innerloop.ops import scan

B, H, T, D = 2, 2, 9, 16


def _titans(hook: str, gates) -> TitansLayer:  # noqa: ANN001 (a hook's return, of any type)
    layer = TitansLayer(D, H, mini_batch_size=4).double()
    setattr(layer, hook, lambda x: gates(x))
    return layer


def _full(value: float) -> torch.Tensor:
    return torch.full((B, H, T), value, dtype=torch.float64)


@pytest.mark.parametrize(
    ("hook", "gates", "what"),
    [
        ("forgetting", lambda x: (_full(1.5), _full(0.2)), "decay outside [0, 1]"),
        ("forgetting", lambda x: (_full(-0.25), _full(0.2)), "decay outside [0, 1]"),
        ("log_forgetting", lambda x: (_full(0.3), _full(0.2)), "log_a outside (-inf, 0]"),
        ("log_forgetting", lambda x: (_full(torch.inf), _full(0.2)), "log_a outside (-inf, 0]"),
    ],
)
def test_a_gate_hook_out_of_range_is_refused_naming_it(hook, gates, what) -> None:  # noqa: ANN001
    """Before the fix these ran: decay 1.5 gives a_t = -0.5 (the memory flips sign every token), log a = 0.3
    gives a_t = 1.35 (it grows): finite, wrong outputs. ``ops.scan`` refuses the same gates."""
    x = torch.randn(B, T, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape(f"TitansLayer.{hook}(x) gave {what}")):
        _titans(hook, gates)(x)
    decay, momentum = gates(x)
    q = torch.randn(B, H, T, D // H, dtype=torch.float64)
    gate = {"decay": decay} if hook == "forgetting" else {"decay_log": decay}
    with pytest.raises(ValueError, match="decay"):  # the same gates given to scan: refused there too
        scan(q, q, q, _full(0.1), inner_model="matrix", update_rule="momentum", momentum=momentum, **gate)


@pytest.mark.parametrize(
    ("hook", "gates"),
    [
        ("forgetting", lambda x: (_full(0.0), _full(0.2))),  # no forgetting
        ("forgetting", lambda x: (_full(1.0), _full(0.2))),  # a full reset every token
        ("log_forgetting", lambda x: (_full(-torch.inf), _full(0.2))),  # the same as a log
        ("log_forgetting", lambda x: (_full(0.0), None)),
    ],
)
def test_a_gate_hook_at_its_range_ends_runs(hook, gates) -> None:  # noqa: ANN001
    y, _ = _titans(hook, gates)(torch.randn(B, T, D, dtype=torch.float64))
    assert torch.isfinite(y).all()


def test_a_nan_gate_under_non_finite_ignore_spreads_as_before() -> None:
    """NaN is not a range error: under ``non_finite='ignore'`` it spreads to the outputs, as on every path."""
    layer = _titans("forgetting", lambda x: (_full(float("nan")), _full(0.2)))
    layer.non_finite = "ignore"
    y, _ = layer(torch.randn(B, T, D, dtype=torch.float64))
    assert torch.isnan(y).any()


@pytest.mark.parametrize(
    ("gates", "got"),
    [
        (lambda x: 0.3, "got a float"),
        (lambda x: _full(0.3), "got a Tensor"),
        (lambda x: (_full(0.3), _full(0.2), None), "got a tuple of 3"),
        (lambda x: (0.3, _full(0.2)), "got decay = a float"),
    ],
)
def test_a_gate_hook_of_the_wrong_type_is_refused_naming_it(gates, got) -> None:  # noqa: ANN001
    """Before the fix: ``'float' object has no attribute 'to'``, ``too many values to unpack``, or a shape
    error about a decay of shape [B, T] (a bare tensor unpacked along its batch)."""
    with pytest.raises(TypeError, match=rf"TitansLayer\.forgetting\(x\) must return a pair .*{got}"):
        _titans("forgetting", gates)(torch.randn(B, T, D, dtype=torch.float64))


@pytest.mark.parametrize("layer_class", [TTTLayer, DeltaNetLayer, TitansLayer])
@pytest.mark.parametrize(
    ("rates", "got"),
    [
        (
            lambda layer, x: (0.1, layer.token_scale if hasattr(layer, "token_scale") else None),
            "got lr = a float",
        ),
        (lambda layer, x: torch.full((B, H, x.shape[1]), 0.1, dtype=torch.float64), "got a Tensor"),
        (
            lambda layer, x: (torch.full((B, H, x.shape[1]), 0.1, dtype=torch.float64), 1.0),
            "got tau = a float",
        ),
    ],
)
def test_an_inner_learning_rates_hook_of_the_wrong_type_is_refused_naming_it(layer_class, rates, got) -> None:  # noqa: ANN001
    """Before the fix: ``'float' object has no attribute 'to'``, or the bare tensor unpacked along its batch
    into "lr must have shape [B, H, T] = [2, 2, 9], got [2, 9]"."""
    layer = layer_class(D, H).double()
    layer.inner_learning_rates = lambda x: rates(layer, x)
    name = layer_class.__name__
    with pytest.raises(TypeError, match=rf"{name}\.inner_learning_rates\(x\) must return a pair .*{got}"):
        layer(torch.randn(B, T, D, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(B, T, H), (B, H), (H, T)])
def test_a_log_decay_factor_of_the_wrong_shape_is_refused_naming_it(shape) -> None:  # noqa: ANN001
    """Gated DeltaNet's gate, overridden as docs/family.md says (``log_decay_factor``), of another shape than
    [B, H, T]: before, a broadcasting RuntimeError inside ``v / a`` ([B, T, H]), or ([H, T], [B, H]: where
    it broadcast) a shape error from the scan about ``decay_log`` that does not name the override."""

    class Gated(GatedDeltaNetLayer):
        def log_decay_factor(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full(shape, -0.2, dtype=x.dtype)

    with pytest.raises(
        ValueError, match=re.escape("Gated.log_decay_factor(x) must give log a of shape [B, H, T]")
    ):
        Gated(D, H).double()(torch.randn(B, T, D, dtype=torch.float64))


@pytest.mark.parametrize("field", ["valid", "targets", "inputs"])
def test_an_inner_loss_whose_pairs_give_nan_is_refused_as_such(field: str) -> None:
    """Before: refused, but as "pairs() is not deterministic ... use a fixed corruption instead of fresh
    random noise" (NaN != NaN between the two calls the check compares), which sends the author to look for
    randomness that is not there."""
    import innerloop
    from innerloop.core.protocol import InnerLoss, LossPairs
    from innerloop.registry import PluginError, isolated_registry

    class NaNPairs(InnerLoss):
        name = f"nan_{field}_r4"

        def pairs(self, views, carry):  # noqa: ANN001, ANN201
            fields = {
                "inputs": views.key,
                "targets": views.value,
                "valid": views.key.new_ones(views.key.shape[:3]),
            }
            fields[field] = fields[field] * float("nan")
            return LossPairs(**fields, carry={})

        def token_loss(self, prediction, target):  # noqa: ANN001, ANN201
            return 0.5 * (prediction - target).pow(2).sum(dim=-1)

    with (
        isolated_registry(),
        pytest.raises(PluginError, match=rf"pairs\(\) gave NaN in {field} for finite views"),
    ):
        innerloop.register_inner_loss(NaNPairs())


def test_a_subclass_gate_out_of_range_is_refused_and_the_built_in_gates_are_not_checked(monkeypatch) -> None:  # noqa: ANN001
    """A gate changed in a subclass (Titans' ``log_decay_factor``, the family's documented override) is
    checked as one set on the layer; a built-in layer's gates (in range by construction) are not read back."""

    class Growing(TitansLayer):
        def log_decay_factor(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], H, x.shape[1]), 0.3, dtype=x.dtype)

    x = torch.randn(B, T, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape("Growing.log_forgetting(x) gave log_a outside (-inf, 0]")):
        Growing(D, H, mini_batch_size=4).double()(x)
    read = []
    original = torch.Tensor.any
    monkeypatch.setattr(
        torch.Tensor, "any", lambda self, *a, **k: read.append(self.shape) or original(self, *a, **k)
    )
    TitansLayer(D, H, mini_batch_size=4, non_finite="ignore").double()(x)
    assert (B, H, T) not in read  # the range check reads a [B, H, T] gate; a built-in Titans' is not read


@pytest.mark.parametrize("name", ["forgetting", "log_forgetting", "inner_learning_rates"])
def test_a_hook_set_to_none_is_refused_naming_it(name) -> None:
    # review s60: `layer.forgetting = None` (the docs said the hooks were "each None by default") failed
    # "'NoneType' object is not callable"
    layer = TTTLayer(
        hidden_size=8, num_heads=2, inner_model="matrix", update_rule="momentum", mini_batch_size=4
    )
    setattr(layer, name, None)
    with pytest.raises(
        TypeError, match=rf"TTTLayer\.{name} is None, not a function of x: .*del layer\.{name}"
    ):
        layer(torch.randn(1, 8, 8))
    delattr(layer, name)  # what the message says: the class's own again
    layer(torch.randn(1, 8, 8))


def test_a_decay_factor_override_of_the_wrong_shape_is_refused_naming_it() -> None:
    # last look s60: the shape check named log_decay_factor also where decay_factor itself was overridden
    class Gated(GatedDeltaNetLayer):
        def decay_factor(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], x.shape[1], 2), 0.5, dtype=x.dtype)  # [B, T, H]: not [B, H, T]

    with pytest.raises(
        ValueError, match=re.escape("Gated.decay_factor(x) must give a of shape [B, H, T] = [1, 2, 8]")
    ):
        Gated(8, 2)(torch.randn(1, 8, 8))
