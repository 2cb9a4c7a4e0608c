"""The plugin kinds: the one place a kind is declared.

Each :class:`Kind` names its hook (what a plugin implements), the base class its objects follow, the
methods they must have, and the checks the registrar runs before accepting one. The hookspecs
(:mod:`innerloop.registry.hookspecs`), the registrars, the one-object registration functions
(``innerloop.register_inner_loss`` ...) and ``innerloop plugins`` are all made from :data:`KINDS`.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from innerloop.core.callers import warning_stacklevel
from innerloop.core.model_inner import ModelInnerLoss, ModelUpdateRule
from innerloop.core.protocol import InnerLoss, InnerModel, LossPairs, UpdateRule, Views
from innerloop.core.scan import CheckModelAnswerError, model_refusal
from innerloop.kernels.spec import KernelSpec
from innerloop.registry import verdicts
from innerloop.testing.checks import (
    MIXED_WRAPPINGS,
    NO_GRAD_MODES,
    REGISTRATION_TOLERANCE,
    InnerProblem,
    RaisedWithoutGradError,
    RuleOutputError,
    assert_close,
    check_activation_derivatives,
    check_autograd_by_differences,
    check_forward_batch_independent,
    check_forward_by_differences,
    check_forward_head_independent,
    check_forward_leaves_inputs,
    check_forward_token_independent,
    check_inner_loss_in_float32,
    check_inner_model_in_float32,
    check_loss_gradient,
    check_loss_gradient_at_zero_error,
    check_loss_leaves_inputs,
    check_model_inner_loss_batch_independent,
    check_model_update_rule_batch_independent,
    check_pairs_batch_independent,
    check_pairs_causal,
    check_pairs_deterministic,
    check_pairs_head_independent,
    check_pairs_token_by_token,
    check_stack_matches_forward,
    check_token_loss_per_token,
    check_unchecked_matches_forward,
    check_update_rule,
    check_update_rule_without_grad,
    copy_views_and_carry,
    make_problem,
    warm_carry,
)


class PluginError(ValueError):
    """A plugin does not conform to the protocol, or clashes with one already registered."""


class PluginWarning(UserWarning):
    """A plugin was registered, but it cannot run everywhere a layer runs it (e.g. an update rule that
    raises without autograd, so that a layer using it fails in evaluation and generation)."""


# --------------------------------------------------------------------------------------------------
# Checks: what the registrar runs on an object of each kind, after the common opening
# --------------------------------------------------------------------------------------------------


def _missing_methods(obj: Any, required: Iterable[str]) -> list[str]:
    missing = []
    for method in required:
        attr = getattr(obj, method, None)
        if attr is None or not callable(attr) or getattr(attr, "__isabstractmethod__", False):
            missing.append(method)
    return missing


NAME_RULE = (
    "a plugin name must read back as the same string from a config (an override "
    "`model.ttt.inner_loss=<name>` or a YAML file's `inner_loss: <name>`): no control or other "
    "non-printing characters, no leading or trailing whitespace, no '=' or '${', and not one a config "
    "reads as another value (true, on, null, ~, 1e3, 0x10, 1_000, 007, 1.50, [a], 'a #b', ...); "
    "letters, digits, inner spaces and _ - . / : such as 'my_loss', 'huber-2' or '2' are safe"
)
"""What :func:`_check_name` asks of a plugin name, said in its errors."""


_YAML_WORDS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})
"""Words YAML 1.1 may read as a bool or null: :func:`_check_name` parses those, and every name that is
not a plain word, to see what a config reads (a plain word reads as itself)."""


@dataclass
class _NameField:
    """A config's str key holding a plugin name (as ``model.ttt.inner_loss``), for :func:`_config_readings`."""

    name: str = ""


def _config_readings(name: str) -> list[str]:
    """What a config's str key reads for ``name`` written unquoted, as an override (``key=<name>``) and
    in a YAML file (``key: <name>``); a value the key refuses (null, a list) or YAML cannot parse (an
    alias ``*x``, a tag ``!x``) as the error's class name."""
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(_NameField)
    readings = []
    for written in (
        lambda: OmegaConf.from_dotlist([f"name={name}"]),
        lambda: OmegaConf.create(f"name: {name}\n"),
    ):
        try:
            readings.append(OmegaConf.merge(schema, written()).name)
        except Exception as error:  # parse errors and OmegaConf's refusals come in several types
            readings.append(f"an error ({type(error).__name__})")
    return readings


def _check_name(obj: Any, kind: str) -> str:
    """``obj``'s name, if a config can choose it (:data:`NAME_RULE`); :class:`PluginError` if not."""
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise PluginError(f"{kind} {obj!r} has no 'name' (a non-empty string); got {name!r}")
    if name != name.strip():
        raise PluginError(
            f"{kind} name {name!r} has leading or trailing whitespace; layers and configs ask for a "
            f"plugin by its exact name, so name it {name.strip()!r}"
        )
    if not name.isprintable() or "=" in name or "${" in name:
        raise PluginError(f"{kind} name {name!r} cannot be chosen from a config: {NAME_RULE}")
    plain = re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) and name.lower() not in _YAML_WORDS
    readings = [name] if plain else _config_readings(name)  # a plain word reads as itself: no parse
    other = next((reading for reading in readings if reading != name), None)
    if other is not None:
        raise PluginError(
            f"{kind} name {name!r} cannot be chosen from a config, which reads it as {other!r}: {NAME_RULE}"
        )
    return name


def _conformance(label: str, name: str, check: Callable[[], None]) -> None:
    """Run a cheap conformance check of :mod:`innerloop.testing.checks`; its failure is a refusal."""
    try:
        check()
    except AssertionError as error:
        raise PluginError(
            f"{label} {name!r} fails a conformance check: {error} "
            "(innerloop.testing has the full checks to run in the plugin's own tests)"
        ) from error
    except PluginError:
        raise
    except Exception as error:  # the plugin's own failure, reported as a rejection
        raise PluginError(f"{label} {name!r} failed its conformance check: {error!r}") from error


def _check_declared_params(name: str, shapes: Any, params: Any) -> None:
    """``init_params()`` returns tensors under exactly the names ``param_shapes()`` declares: a state
    holds the declared weights only, so an undeclared one would make the layer refuse its own state."""
    for what, value in (("param_shapes()", shapes), ("init_params()", params)):
        if not isinstance(value, Mapping):
            raise PluginError(
                f"inner model {name!r}: {what} must return a dict of weights by name; got {type(value).__name__}"
            )
    extra = sorted(set(params) - set(shapes))
    if extra:
        raise PluginError(
            f"inner model {name!r}: init_params() returns keys {extra} that param_shapes() does not declare "
            f"(it declares {sorted(shapes)}); declare their shapes in param_shapes() or drop them"
        )
    not_tensors = {k: type(v).__name__ for k, v in params.items() if not isinstance(v, torch.Tensor)}
    if not_tensors:
        raise PluginError(
            f"inner model {name!r}: init_params() must return tensors; got {not_tensors} for those keys"
        )


def _smoke_params(model: Any, name: str, heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """``init_params`` checked against ``param_shapes``, cast to float32 (as a float32 layer holds them)."""
    shapes = model.param_shapes(head_dim)
    params = model.init_params(heads, head_dim)
    _check_declared_params(name, shapes, params)
    for key, shape in shapes.items():
        if key not in params or tuple(params[key].shape) != (heads, *shape):
            got = tuple(params[key].shape) if key in params else "missing"
            raise PluginError(
                f"inner model {name!r}: init_params()[{key!r}] has shape {got}, "
                f"param_shapes() says {(heads, *shape)}"
            )
    not_float = {k: str(v.dtype) for k, v in params.items() if not v.is_floating_point()}
    if not_float:
        raise PluginError(
            f"inner model {name!r}: init_params() must return floating-point weights (they are trained); "
            f"got {not_float}"
        )
    return {k: v.to(torch.float32) for k, v in params.items()}


def _inner_model_smoke(model: Any, name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The model run once on a tiny input: ``init_params`` agrees with ``param_shapes``, ``forward`` keeps
    the shape ``[heads, N, f]`` and learns (:func:`_check_model_learns`); its float32 weights and input."""
    heads, head_dim = 2, 4
    try:
        params = _smoke_params(model, name, heads, head_dim)
        _check_stack_names(model, name, params)
        x = torch.randn(heads, 3, head_dim)
        out = model.forward(params, x)
        one = model.forward(params, x[:, :1])  # one token: how the rules call it
    except PluginError:
        raise
    except Exception as error:  # the model's own failure, reported as a rejection
        raise PluginError(f"inner model {name!r} failed its smoke test: {error!r}") from error
    for given, result in ((x, out), (x[:, :1], one)):
        if not isinstance(result, torch.Tensor) or tuple(result.shape) != tuple(given.shape):
            got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise PluginError(
                f"inner model {name!r}: forward maps [heads, N, f] = {tuple(given.shape)} to {got}; "
                "it must return the same shape (g maps head_dim features to head_dim features; the rules "
                "call it on one token, a layer on a whole chunk)"
            )
    try:  # before the gradient: a write into a weight that requires grad is torch's unexplained leaf error
        check_forward_leaves_inputs(model, params, x)
    except AssertionError as error:
        raise PluginError(f"inner model {name!r} fails a conformance check: {error}") from error
    # after it: a forward writing into its weights or x is named as that, not as two forwards that differ
    _check_unchecked_forward_agrees(model, name, params, x, out)
    _check_model_keeps_dtype(model, name, params, x)
    _check_model_learns(model, name, params, x)
    return params, x


def _check_unchecked_forward_agrees(
    model: Any, name: str, params: dict[str, torch.Tensor], x: torch.Tensor, out: torch.Tensor
) -> None:
    """``forward_unchecked`` (what the scans run) gives ``forward``'s output (what every check reads)."""
    try:
        unchecked, again = model.forward_unchecked(params, x), model.forward(params, x)
    except Exception as error:
        raise PluginError(
            f"inner model {name!r} failed its smoke test (forward_unchecked): {error!r}"
        ) from error
    if not (  # bitwise, NaN equal to NaN (named later as non-finite)
        isinstance(again, torch.Tensor)
        and again.shape == out.shape
        and torch.allclose(again, out, rtol=0.0, atol=0.0, equal_nan=True)
    ):
        raise PluginError(
            f"inner model {name!r}: forward gave two outputs for one input and the same weights; it must be "
            "deterministic (no dropout or unseeded noise): the rules and their references call it several times"
        )
    if not (
        isinstance(unchecked, torch.Tensor)
        and unchecked.shape == out.shape
        and torch.allclose(unchecked, out, rtol=0.0, atol=0.0, equal_nan=True)  # bitwise; NaN named later
    ):
        raise PluginError(
            f"inner model {name!r}: forward_unchecked (what the update rules run) differs from forward (what "
            "the checks read) on the smoke input; it must be forward's computation without the argument check"
        )


def _check_model_keeps_dtype(model: Any, name: str, params: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    """``forward`` returns its input's dtype, float32 (``x`` and ``params``, the smoke test's) and float64:
    a layer runs its model in its scan dtype, and a model that casts (a float64 constant, a ``.float()``)
    would have the update rule blamed for the dtype of what it returns."""
    for dtype, tokens in ((torch.float32, 3), (torch.float64, 3), (torch.float32, 1), (torch.float64, 1)):
        given = x[:, :tokens].to(dtype)  # one token too: how the rules call it
        try:
            out = model.forward({k: v.to(dtype) for k, v in params.items()}, given)
        except Exception as error:
            raise PluginError(f"inner model {name!r} failed its smoke test in {dtype}: {error!r}") from error
        if isinstance(out, torch.Tensor) and out.dtype != dtype:
            raise PluginError(
                f"inner model {name!r}: forward returns {out.dtype} for {str(dtype).removeprefix('torch.')} "
                f"input and weights ({tokens} token(s)); it must compute in its input's dtype (a layer runs it in float32, or in "
                "float64; a constant in forward is made in x's dtype: x.new_tensor(c), or a plain Python number)"
            )


def _check_stack_names(model: Any, name: str, params: dict[str, torch.Tensor]) -> None:
    """Every weight and bias a declared stack names is one of ``param_shapes``' (else the stack's run
    meets it as a bare ``KeyError``)."""
    stack = model.stack
    if stack is None:
        return
    named = [n for layer in stack for n in (layer.weight, layer.bias) if n is not None]
    unknown = [n for n in named if n not in params]
    if unknown:
        raise PluginError(
            f"inner model {name!r}: its stack names the weight(s) {unknown}, which param_shapes does not "
            f"declare (it declares {sorted(params)}); an AffineLayer's weight and bias must be keys of param_shapes"
        )


def _check_init_params_generator(model: Any, name: str, heads: int, head_dim: int) -> None:
    """``init_params`` takes ``generator=``, as :class:`~innerloop.core.protocol.InnerModel` declares:
    innerloop.testing's checks draw their problems' weights through it (:func:`~innerloop.testing.make_problem`),
    so a model registered without it failed there with a TypeError from inside the checks. (Whether it
    draws from it is left to ``check_inner_model``, which says so by name: a layer never passes one.)"""
    try:
        signature: inspect.Signature | None = inspect.signature(model.init_params)
    except (TypeError, ValueError):  # no signature to read (a C function): its call below says
        signature = None
    if signature is not None:
        try:
            signature.bind(heads, head_dim, generator=None)
        except TypeError:
            raise PluginError(
                f"inner model {name!r}: init_params{signature} takes no generator; the contract is "
                "init_params(num_heads, head_dim, generator=None), drawing every random weight from it "
                "(torch.randn(..., generator=generator)): innerloop.testing's checks draw their weights "
                "through it, reproducibly from their seed"
            ) from None


def _check_inner_model(model: Any, name: str) -> None:
    params, x = _inner_model_smoke(model, name)
    heads, head_dim = x.shape[0], x.shape[-1]
    _check_init_params_generator(model, name, heads, head_dim)

    def stack_and_activations() -> None:
        # float64 weights perturbed so that every term (zero-initialised biases too) matters
        weights = {k: v.double() + 0.1 * torch.randn(v.shape, dtype=torch.float64) for k, v in params.items()}
        check_forward_leaves_inputs(model, weights, torch.randn(heads, 3, head_dim, dtype=torch.float64))
        check_inner_model_in_float32(model, weights, torch.randn(heads, 3, head_dim, dtype=torch.float64))
        check_stack_matches_forward(
            model, weights, torch.randn(heads, 3, head_dim, dtype=torch.float64), REGISTRATION_TOLERANCE
        )
        check_activation_derivatives(
            model, 3 * torch.randn(4, 5, dtype=torch.float64), REGISTRATION_TOLERANCE
        )
        # autograd's derivatives of forward (every path takes them) against finite differences
        check_forward_by_differences(model, weights, torch.randn(heads, 3, head_dim, dtype=torch.float64))
        # two sequences, each with its own weights: an output must not depend on the other sequence
        batched = {
            k: v.double()[None] + 0.1 * torch.randn(2, *v.shape, dtype=torch.float64)
            for k, v in params.items()
        }
        x = torch.randn(2, heads, 3, head_dim, dtype=torch.float64)  # [B, H, N, f]: what the scans give
        check_forward_batch_independent(model, batched, x, REGISTRATION_TOLERANCE)
        # on weights that are not init_params' (a zero bias hides a forward_unchecked that forgets it)
        check_unchecked_matches_forward(model, batched, x, REGISTRATION_TOLERANCE)
        check_forward_token_independent(
            model, weights, torch.randn(heads, 3, head_dim, dtype=torch.float64), REGISTRATION_TOLERANCE
        )
        x = torch.randn(heads, 3, head_dim, dtype=torch.float64)  # two heads (the smoke test's)
        check_forward_head_independent(model, weights, x, REGISTRATION_TOLERANCE)

    _conformance("inner model", name, stack_and_activations)


def _check_model_learns(model: Any, name: str, params: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    """``forward``'s output depends on the weights through autograd at a random point: a model whose
    gradient is cut (``.detach()``) or zero everywhere (``torch.round``) would never learn."""
    weights = {k: (v + 0.1 * torch.randn(v.shape)).requires_grad_(True) for k, v in params.items()}
    try:
        out = model.forward(weights, x)
        grads = (
            torch.autograd.grad(
                (out * torch.randn(out.shape)).sum(), list(weights.values()), allow_unused=True
            )
            if out.requires_grad
            else []
        )
    except Exception as error:
        raise PluginError(f"inner model {name!r} failed its smoke test (gradient): {error!r}") from error
    non_finite = _non_finite(out.detach(), *(g for g in grads if g is not None))
    if non_finite is not None:
        raise PluginError(
            f"inner model {name!r}: forward or its gradient w.r.t. its weights {sorted(weights)} is non-finite "
            f"({non_finite}) at a finite random point; the inner loop would write it into the weights"
        )
    stacked = {
        n for layer in model.stack or () for n in (layer.weight, layer.bias)
    }  # the stack check names those
    unread = [key for key, g in zip(weights, grads, strict=False) if g is None and key not in stacked]
    if grads and unread:
        raise PluginError(
            f"inner model {name!r}: forward never reads the weight(s) {unread} (no gradient w.r.t. them at a "
            "random point); param_shapes must declare only the weights forward uses: a layer trains each "
            "declared weight's initial value as a parameter, one that gets no gradient (DDP refuses it)"
        )
    if not any(g is not None and bool(g.abs().sum() > 0) for g in grads):
        raise PluginError(
            f"inner model {name!r}: the gradient of forward w.r.t. its weights {sorted(weights)} is zero or "
            "missing at a random point (a .detach(), torch.round, an integer cast or no_grad in forward?); "
            "the inner loop learns through this gradient and would never change the weights"
        )


def _inner_loss_smoke(loss: Any, name: str) -> tuple[Views, dict[str, torch.Tensor]]:
    """The loss run once on tiny views ``[B, H, T, f] = (2, 2, 3, 4)``: the pairs' fields have the views'
    shape and dtype (checked before ``token_loss`` reads them), ``token_loss`` reduces the feature dim,
    ``token_loss_grad`` runs (:func:`_check_loss_grad_runs`); the views and the initial carry."""
    batch, heads, tokens, head_dim = 2, 2, 3, 4  # two sequences: a loss must not mix them
    expected = (batch, heads, tokens, head_dim)
    try:
        views = Views(*(torch.randn(expected) for _ in range(3)))
        carry = loss.init_carry(batch, heads, head_dim, views.key)
        # on copies: a loss that writes into what it is given is named by check_pairs_deterministic, which
        # needs the views and carry as they were made
        pairs = loss.pairs(*copy_views_and_carry(views, carry))
    except Exception as error:
        raise PluginError(f"inner loss {name!r} failed its smoke test: {error!r}") from error
    _check_pairs_fields(name, pairs, expected, views.key.dtype)
    _check_loss_leaves_inputs(loss, name, pairs)
    try:
        per_token = loss.token_loss(pairs.inputs, pairs.targets)
    except Exception as error:
        raise PluginError(f"inner loss {name!r} failed its smoke test (token_loss): {error!r}") from error
    if not isinstance(per_token, torch.Tensor) or tuple(per_token.shape) != expected[:-1]:
        got = tuple(per_token.shape) if isinstance(per_token, torch.Tensor) else type(per_token).__name__
        raise PluginError(
            f"inner loss {name!r}: token_loss() must reduce the feature dim to [B, H, T] = {expected[:-1]}; got {got}"
        )
    non_finite = _non_finite(per_token)
    if non_finite is not None:
        raise PluginError(
            f"inner loss {name!r}: token_loss returned non-finite values ({non_finite}) for finite predictions "
            "and targets; the inner loop would write them into the weights"
        )
    _check_loss_grad_runs(loss, name, pairs.targets)
    return views, carry


def _check_loss_leaves_inputs(loss: Any, name: str, pairs: LossPairs) -> None:
    """``token_loss`` and ``token_loss_grad`` write into neither the prediction nor the target, checked
    before anything calls them on tensors that require grad: there, a write into the prediction is
    torch's 'a leaf Variable ... in-place operation', which names neither the method nor the tensor.
    Any other failure of theirs is left to the checks that follow, which name it."""
    prediction = pairs.targets + torch.randn(pairs.targets.shape, dtype=pairs.targets.dtype)
    try:
        check_loss_leaves_inputs(loss, prediction, pairs.targets, label=f"inner loss {name!r}")
    except AssertionError as error:
        raise PluginError(str(error)) from error
    except Exception:  # noqa: S110 -- the smoke test below names the method's own error
        pass


def _check_inner_loss(loss: Any, name: str) -> None:
    views, carry = _inner_loss_smoke(loss, name)
    expected = tuple(views.key.shape)
    heads, head_dim = expected[1], expected[3]

    def pairs_and_gradient() -> None:
        check_pairs_deterministic(loss, views, carry)
        check_pairs_causal(loss, views, carry, cut=2, tolerance=REGISTRATION_TOLERANCE)
        # every cut and one token at a time (decoding), and each sequence alone, from the initial carry
        # and from a carried-on one (where a carry made after init_carry shows)
        earlier = Views(*(torch.randn(expected) for _ in range(3)))
        for start in (carry, warm_carry(loss, earlier, carry)):
            check_pairs_batch_independent(loss, views, start, tolerance=REGISTRATION_TOLERANCE)
            check_pairs_token_by_token(loss, views, start, tolerance=REGISTRATION_TOLERANCE)
        check_pairs_head_independent(loss, views, carry, tolerance=REGISTRATION_TOLERANCE)
        if not _default_token_loss_grad(loss):  # a closed form to check
            targets = torch.randn(2, heads, 32, head_dim, dtype=torch.float64)
            # errors from 0.01 to 100 in size: a piecewise closed form (Huber, clipping) is met in each piece
            scales = torch.logspace(-2, 2, targets.shape[2], dtype=torch.float64)[:, None]
            prediction = targets + scales * torch.randn(targets.shape, dtype=torch.float64)
            check_loss_gradient(loss, prediction, targets, REGISTRATION_TOLERANCE)
            # and targets of those sizes: a closed form wrong for large targets only (token_loss clips the
            # target, the closed form does not) is met too (review s48l)
            wide = targets * scales
            check_loss_gradient(loss, wide + (prediction - targets), wide, REGISTRATION_TOLERANCE)
        else:  # autograd's derivatives of token_loss, which every path takes, against finite differences
            targets = torch.randn(2, 2, 3, head_dim, dtype=torch.float64)
            check_token_loss_per_token(
                loss,
                targets + torch.randn(targets.shape, dtype=torch.float64),
                targets,
                REGISTRATION_TOLERANCE,
            )
            targets = torch.randn(1, 1, 4, head_dim, dtype=torch.float64)
            prediction = targets + torch.randn(targets.shape, dtype=torch.float64)
            check_autograd_by_differences(
                loss.token_loss,
                {"prediction": prediction, "target": targets},
                f"inner loss {name!r}: token_loss",
            )
        # last: a loss that writes into its inputs is named above, not as a float32 mismatch
        check_inner_loss_in_float32(loss, views, carry, torch.randn(expected, dtype=torch.float64))

    _conformance("inner loss", name, pairs_and_gradient)


def _check_pairs_fields(name: str, pairs: Any, expected: tuple[int, ...], dtype: torch.dtype) -> None:
    """``pairs()`` gives a LossPairs of inputs and targets ``[B, H, T, f]`` in the views' dtype, a
    ``valid`` that broadcasts to ``[B, H, T]`` and a dict carry."""
    label = f"inner loss {name!r}: pairs()"
    if not isinstance(pairs, LossPairs):
        raise PluginError(f"{label} must return an innerloop.LossPairs; got {type(pairs).__name__}")
    for field in ("inputs", "targets"):
        value = getattr(pairs, field)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise PluginError(
                f"{label} must give inputs and targets of shape [B, H, T, f] = {expected}; got {field} {got}"
            )
        if value.dtype != dtype:
            raise PluginError(
                f"{label} gave {field} of dtype {value.dtype} for views of dtype {dtype}; build the pairs in "
                "the views' dtype (the layer may run in float32, bfloat16 or float64)"
            )
    valid = pairs.valid
    if valid is not None and (
        not isinstance(valid, torch.Tensor) or not _broadcasts_to(tuple(valid.shape), expected[:-1])
    ):
        got = tuple(valid.shape) if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise PluginError(
            f"{label} gave valid of shape {got}; valid (a weight per pair) must broadcast to [B, H, T] = "
            f"{expected[:-1]} (or be None: every pair counts)"
        )
    for field in ("inputs", "targets", "valid"):
        value = getattr(pairs, field)
        bad = None if value is None or not value.is_floating_point() else _non_finite(value)
        if bad is not None:  # (else met as "pairs() is not deterministic": NaN != NaN)
            raise PluginError(
                f"{label} gave {bad} in {field} for finite views; the inner loop would write it into the weights"
            )
    if not isinstance(pairs.carry, Mapping):
        raise PluginError(
            f"{label} must give a carry that is a dict of tensors (what the next chunk needs); got "
            f"{type(pairs.carry).__name__}"
        )


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` (plain Python: ``torch.broadcast_shapes`` imports sympy)."""
    if len(shape) > len(target):
        return False
    return all(have in (1, want) for have, want in zip(shape[::-1], target[::-1], strict=False))


def _non_finite(*tensors: torch.Tensor) -> str | None:
    """What is non-finite in ``tensors`` ("NaN", "inf" or "NaN and inf"), or None when all are finite."""
    found = [
        what
        for what, test in (("NaN", torch.isnan), ("inf", torch.isinf))
        if any(bool(test(t).any()) for t in tensors if t.is_floating_point())
    ]
    return " and ".join(found) or None


def _default_token_loss_grad(loss: Any) -> bool:
    """Whether ``loss`` uses :class:`InnerLoss`'s own ``token_loss_grad`` (autograd of ``token_loss``), as
    its bound method says: also right for an object that forwards its attributes to a loss (a proxy), whose
    class has no ``token_loss_grad`` of its own."""
    return getattr(loss.token_loss_grad, "__func__", None) is InnerLoss.token_loss_grad


def _check_loss_grad_dtype(loss: Any, name: str, grad: Any, prediction: torch.Tensor) -> None:
    """``grad`` (``token_loss_grad`` of ``prediction``) is in the prediction's dtype."""
    if isinstance(grad, torch.Tensor) and grad.dtype != prediction.dtype:
        raise PluginError(
            f"inner loss {name!r}: token_loss_grad returned {grad.dtype} for a {prediction.dtype} prediction; it "
            "must return the prediction's dtype"
        )


def _check_loss_grad_runs(loss: Any, name: str, targets: torch.Tensor) -> None:
    """``token_loss_grad`` runs as the layer calls it (the default one under ``torch.func``), in the
    prediction's dtype (float32 and float64) and shape, and is not zero everywhere (the inner loop would never learn); at
    prediction == target, it and its derivatives are finite (:func:`check_loss_gradient_at_zero_error`)."""
    prediction = targets + torch.randn(targets.shape, dtype=targets.dtype)
    default = _default_token_loss_grad(loss)
    try:
        grad = loss.token_loss_grad(prediction, targets)
    except Exception as error:
        hint = (
            "; the default token_loss_grad differentiates token_loss under torch.func (vmap), so token_loss "
            "must be written in torch ops only: no .item(), no Python branching on tensor values, no numpy"
            if default
            else ""
        )
        raise PluginError(f"inner loss {name!r}: token_loss_grad failed: {error!r}{hint}") from error
    if not isinstance(grad, torch.Tensor) or tuple(grad.shape) != tuple(prediction.shape):
        got = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
        raise PluginError(
            f"inner loss {name!r}: token_loss_grad must have the prediction's shape {tuple(prediction.shape)}; got {got}"
        )
    _check_loss_grad_dtype(loss, name, grad, prediction)
    try:  # a float64 layer's call too: a gradient in float32 there would round every update silently
        wide = prediction.double()
        _check_loss_grad_dtype(loss, name, loss.token_loss_grad(wide, targets.double()), wide)
    except PluginError:
        raise
    except Exception as error:
        raise PluginError(f"inner loss {name!r}: token_loss_grad failed in float64: {error!r}") from error
    non_finite = _non_finite(grad)
    if non_finite is not None:
        what = (
            "the gradient of token_loss (autograd's: no token_loss_grad is defined)"
            if default
            else "token_loss_grad"
        )
        raise PluginError(
            f"inner loss {name!r}: {what} returned non-finite values ({non_finite}) at a finite point "
            "(prediction != target); the inner loop would write them into the weights"
        )
    if not bool(grad.abs().sum() > 0):
        raise PluginError(
            f"inner loss {name!r}: token_loss_grad is zero at a random point (prediction != target): is "
            "token_loss cut from the prediction (.detach(), torch.round, an integer cast)? The inner loop "
            "learns through this gradient and would never change the weights"
        )
    _conformance("inner loss", name, lambda: check_loss_gradient_at_zero_error(loss, targets))
    if not default:
        _check_loss_grad_without_grad(loss, name, prediction, targets, grad)


def _check_loss_grad_without_grad(
    loss: Any, name: str, prediction: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor
) -> None:
    """A closed-form ``token_loss_grad`` under ``torch.no_grad()`` and ``torch.inference_mode()`` (how a
    layer calls it in evaluation and generation) gives ``grad``, its value with autograd on: a refusal
    if it differs; a :class:`PluginWarning` if it raises there (as for an update rule: it fails loudly
    at use), e.g. one that takes ``torch.autograd.grad`` of ``token_loss``."""
    for label, mode in NO_GRAD_MODES:
        try:
            with mode():
                without = loss.token_loss_grad(prediction.clone(), targets.clone())
        except Exception as error:
            verdicts.not_reusable()
            warnings.warn(
                f"inner loss {name!r} is registered, but a layer using it cannot run without autograd: its "
                f"token_loss_grad raised {error!r} under {label} (torch.autograd.grad cannot run under "
                "torch.inference_mode: write the closed form in torch ops, or leave token_loss_grad to "
                "the default, which differentiates token_loss with torch.func)",
                PluginWarning,
                stacklevel=warning_stacklevel(),
            )
            return
        _conformance(
            "inner loss",
            name,
            lambda without=without, label=label: assert_close(
                without,
                grad.detach(),
                f"{name}: token_loss_grad under {label} vs with autograd",
                REGISTRATION_TOLERANCE,
            ),
        )


#: What every update rule computes, said in its refusal: the checks compare a rule with the naive token
#: loop of mini-batch gradient descent (innerloop.testing.reference.naive_token_loop).
UPDATE_RULE_CONTRACT = (
    "an update rule is an implementation of mini-batch gradient descent on the inner loss (every "
    "gradient of a mini-batch taken at the weights it started with, token i reading W_b - tau_i * "
    "sum_{j<=i} lr_j grad_j), with decay and momentum where it sets supports_decay / supports_momentum, "
    "and is checked against the naive token loop; another inner optimizer declares its own token-by-token "
    "reference (UpdateRule.reference), which it is checked against instead"
)


#: Run only on rules from plugins that do not ship with innerloop (the modules of
#: ``innerloop.plugins.DEFAULT_PLUGINS``): the built-in rules are checked against the naive loop to
#: float64 precision, values and gradients, by the test suite (tests/core/test_invariances.py), and
#: checking them at every start-up would cost ~2 s (the first ``torch.func.grad`` call imports
#: torch's compiler stack).
def _check_update_rule_against_naive_loop(rule: Any, name: str) -> None:
    """The rule equals the naive token loop (or the reference it declares) on a tiny problem, in
    values and in the gradients w.r.t. every input: whole and cut mid-mini-batch, with the
    reconstruction and next-token losses (a carry across chunks and an invalid first pair), the
    layer's LayerNorm and residual each on and off (all four pairs); the values under
    ``torch.no_grad()`` and ``torch.inference_mode()`` too, and what ``forward`` returns is
    ``(outputs [B, H, T, f], TTTState)``.

    Every built-in model the rule accepts (linear, mlp, matrix) is checked: a rule right for one
    model only (one that updates the weights of ``linear`` by name) is refused. A rule that accepts
    none of them (it is written for a plugin's own model) is checked only by its own tests. A problem
    the rule refuses to run (it raises, e.g. for a mini-batch size or a wrapping it does not take) is
    skipped; one that it runs must agree, and it must run at least one on each model.
    """
    from innerloop.plugins.models.linear import LinearModel
    from innerloop.plugins.models.matrix import MatrixModel
    from innerloop.plugins.models.mlp import MLPModel

    reference = getattr(rule, "reference", None)
    if reference is not None and not callable(reference):
        raise PluginError(
            f"update rule {name!r}: reference must be None (the rule is mini-batch gradient descent) or a "
            f"method reference(state, task, views, lr, tau) computing the rule token by token; got "
            f"{type(reference).__name__} {reference!r}"
        )
    accepted = [
        m for m in (LinearModel(), MLPModel(), MatrixModel()) if _conformance_refusal(rule, m, name) is None
    ]
    for index, model in enumerate(accepted):
        _check_update_rule_on_model(rule, name, model, every_problem=index == 0)


def _check_update_rule_on_model(rule: Any, name: str, model: InnerModel, every_problem: bool) -> None:
    """:func:`_check_update_rule_against_naive_loop` on one built-in model: every problem of
    :func:`_registration_problems` on the first model the rule accepts, and on the first of them the rule
    runs, its values without autograd too (:func:`_check_without_grad`); on the others (to keep
    registration cheap), the two that tell a rule right for one model only."""
    problem = {"batch": 2, "heads": 2, "head_dim": 3, "tokens": 5}
    problems = _registration_problems(every_problem)
    unsupported = []
    for index, (loss, options, gradients) in enumerate(problems):
        try:
            check_update_rule(
                rule,
                model,
                loss,
                tolerance=REGISTRATION_TOLERANCE,
                gradients=gradients,
                without_grad=False,
                **options,
                **problem,
            )
        except RuleOutputError as error:  # the wrong type or layout: said by name, not as numbers
            raise PluginError(str(error)) from error
        except AssertionError as error:  # wrong numbers: refused
            _conformance("update rule", name, lambda error=error: _raise(_with_contract(error, rule)))
        except Exception as error:  # a configuration the rule refuses to run (its own ValueError)
            unsupported.append(f"{loss.name}, {options}: {error!r}")
            continue
        if every_problem and len(unsupported) == index:  # the first problem the rule runs
            _check_without_grad(rule, name, make_problem(model, loss, **options, **problem))
    if len(unsupported) == len(problems):
        raise PluginError(
            f"update rule {name!r} failed its conformance check: it raised on every problem tried with the "
            f"built-in model {model.name!r}, which its check_model accepts ({'; '.join(unsupported)}); "
            f"refuse the model in check_model if the rule cannot run it"
        )


def _registration_problems(every_problem: bool) -> list[tuple[InnerLoss, dict[str, Any], bool]]:
    """The problems ``(loss, options, gradients)`` a rule is checked on at registration, on a problem of
    two sequences and two heads (a rule that mixes them is refused) and head dim 3 (over two features
    the inner LayerNorm is a constant, and the gradients through it ~0).

    With ``every_problem`` (the first model): next_token (an invalid first pair, a carry across chunks)
    with the inner LayerNorm and residual on, with gradients; reconstruction with both off and with each
    on alone (``TTTLayer`` takes them independently: a rule that ties one to the other is refused, each
    way round); and the plainest problem (one-token mini-batches, no wrapping) a rule may be limited to,
    with gradients.
    Otherwise the two that tell a rule right for one model only: next_token wrapped (values), and the
    plainest problem with gradients (a rule wrong for one loss or wrapping only is caught on the first
    model)."""
    from innerloop.plugins.losses.next_token import NextToken
    from innerloop.plugins.losses.reconstruction import Reconstruction

    wrapped = {"mini_batch_size": 2, "norm": True, "residual": True}
    plainest = (Reconstruction(), {"mini_batch_size": 1, "norm": False, "residual": False}, True)
    if not every_problem:  # gradients once: through the LayerNorm-free plainest problem
        return [(NextToken(), wrapped, False), plainest]
    wrappings = [(False, False), *MIXED_WRAPPINGS]  # both on: next_token's, on every model
    return [
        (NextToken(), wrapped, True),
        *(
            (Reconstruction(), {"mini_batch_size": 2, "norm": norm, "residual": residual}, False)
            for norm, residual in wrappings
        ),
        plainest,
    ]


def _check_without_grad(rule: Any, name: str, problem: InnerProblem) -> None:
    """The rule's values on ``problem`` under ``torch.no_grad()`` and ``torch.inference_mode()``
    (:func:`innerloop.testing.checks.check_update_rule_without_grad`), a refusal if they differ: a layer
    runs its rule so in evaluation and generation. A rule that raises there is not refused (as a problem
    it refuses to run is skipped): it fails loudly at use, and ``check_update_rule`` reports it."""
    try:
        check_update_rule_without_grad(rule, problem.for_rule(rule), tolerance=REGISTRATION_TOLERANCE)
    except RuleOutputError as error:
        raise PluginError(str(error)) from error
    except RaisedWithoutGradError as error:
        verdicts.not_reusable()
        warnings.warn(
            f"update rule {name!r} is registered, but a layer using it cannot run without autograd: "
            + " ".join(str(error).split()),
            PluginWarning,
            stacklevel=warning_stacklevel(),
        )
    except AssertionError as error:
        _conformance("update rule", name, lambda error=error: _raise(error))


#: What an update rule that declares its own ``reference`` computes, said in its refusal instead of
#: :data:`UPDATE_RULE_CONTRACT`.
REFERENCE_CONTRACT = (
    "an update rule that declares a token-by-token reference (UpdateRule.reference) must compute what "
    "that reference computes, in values and in gradients, whole and cut anywhere with the state carried, "
    "with decay and momentum where it sets supports_decay / supports_momentum"
)


def _with_contract(error: AssertionError, rule: Any) -> AssertionError:
    """``error`` with what ``rule`` must compute appended: :data:`UPDATE_RULE_CONTRACT`, or
    :data:`REFERENCE_CONTRACT` for a rule that declares its own ``reference``."""
    contract = UPDATE_RULE_CONTRACT if getattr(rule, "reference", None) is None else REFERENCE_CONTRACT
    return AssertionError(f"{error} ({contract})")


def _raise(error: BaseException) -> None:
    raise error


def _conformance_refusal(rule: Any, model: InnerModel, name: str) -> str | None:
    """``rule.check_model(model)`` (:func:`~innerloop.core.scan.model_refusal`), its own failure, or an
    answer that is neither None nor a str, reported as a rejection."""
    try:
        return model_refusal(rule, model)
    except CheckModelAnswerError as error:
        raise PluginError(str(error)) from None
    except Exception as error:
        raise PluginError(
            f"update rule {name!r} failed its smoke test: check_model raised {error!r}"
        ) from error


def _check_model_inner_loss(loss: Any, name: str) -> None:
    """``chunk_loss`` on ids ``[B, C]`` (``chunk_targets: within_chunk``) and ``[B, C + 1]`` (the
    chunk and the next chunk's first token: ``next_token``, the default), each giving ``[B]`` losses."""
    batch, chunk, vocab = 2, 4, 5
    for ids_shape in ("[B, C]", "[B, C + 1]"):
        try:
            logits = torch.randn(batch, chunk, vocab)
            ids = torch.randint(vocab, (batch, chunk + (ids_shape != "[B, C]")))
            losses = loss.chunk_loss(logits, ids)
        except Exception as error:
            raise PluginError(
                f"model inner loss {name!r} failed its smoke test on ids {ids_shape} = {tuple(ids.shape)} "
                f"(logits [B, C, V] = {tuple(logits.shape)}; [B, C + 1] is the default chunk_targets: "
                f"next_token's, [B, C] within_chunk's): {error!r}"
            ) from error
        _check_chunk_losses(name, losses, logits, ids_shape, batch)
    _conformance(
        "model inner loss",
        name,
        lambda: check_model_inner_loss_batch_independent(loss, REGISTRATION_TOLERANCE),
    )


def _check_chunk_losses(name: str, losses: Any, logits: torch.Tensor, ids_shape: str, batch: int) -> None:
    """What one smoke-test call of a model inner loss's ``chunk_loss`` returned: ``[B]`` floats."""
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (batch,):
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise PluginError(
            f"model inner loss {name!r}: chunk_loss(logits [B, C, V], ids {ids_shape}) must return one loss per "
            f"sequence, [B] = {(batch,)}; got {got}"
        )
    if not losses.is_floating_point():
        raise PluginError(
            f"model inner loss {name!r}: chunk_loss() must return floating-point losses (the fast weights' "
            f"gradient is taken through them), like the logits ({logits.dtype}); got {losses.dtype}"
        )


def _check_model_update_rule(rule: Any, name: str) -> None:
    try:
        fast = {"w": torch.randn(2, 3, 4, requires_grad=True), "v": torch.randn(2, 4, requires_grad=True)}
        losses = (fast["w"] ** 2).sum((1, 2)) + fast["v"].sum(1)  # [B]
        new = rule.step(fast, losses, lr=0.1, max_grad_norm=1.0, create_graph=False)
    except Exception as error:
        raise PluginError(f"model update rule {name!r} failed its smoke test: {error!r}") from error
    shapes = {k: tuple(v.shape) for k, v in fast.items()}
    dtype = fast["w"].dtype
    wanted = f"the fast weights with the same names and shapes {shapes}, as tensors of their dtype ({dtype})"
    if not isinstance(new, Mapping):
        raise PluginError(
            f"model update rule {name!r}: step() must return {wanted}; got {type(new).__name__}"
        )
    not_tensors = {k: type(v).__name__ for k, v in new.items() if not isinstance(v, torch.Tensor)}
    if not_tensors:
        raise PluginError(
            f"model update rule {name!r}: step() must return {wanted}; got non-tensors {not_tensors}"
        )
    got = {k: tuple(v.shape) for k, v in new.items()}
    if got != shapes:
        raise PluginError(f"model update rule {name!r}: step() must return {wanted}; got shapes {got}")
    dtypes = {k: v.dtype for k, v in new.items() if v.dtype != fast[k].dtype}
    if dtypes:
        raise PluginError(
            f"model update rule {name!r}: step() must return {wanted}; got dtypes {dtypes} (cast the new weights "
            "to the dtype of the old ones)"
        )
    _check_step_keeps_graph(rule, name)
    _conformance(
        "model update rule",
        name,
        lambda: check_model_update_rule_batch_independent(rule, REGISTRATION_TOLERANCE),
    )


def _check_step_keeps_graph(rule: Any, name: str) -> None:
    """With ``create_graph=True`` (the meta-gradient's second order) the new fast weights depend on the
    old ones: a step taken under ``torch.no_grad()`` or ``.detach()``ed would cut the outer gradient
    through every later chunk without a word."""
    fast = {"w": torch.randn(2, 3, 4, requires_grad=True), "v": torch.randn(2, 4, requires_grad=True)}
    losses = (fast["w"] ** 2).sum((1, 2)) + fast["v"].sum(1)  # [B]
    try:
        new = rule.step(fast, losses, lr=0.1, max_grad_norm=1.0, create_graph=True)
        cut = sorted(
            k
            for k, v in new.items()
            if not v.requires_grad  # the old tensor itself (a rule that keeps a weight) depends on it
            or torch.autograd.grad(v.sum(), fast[k], retain_graph=True, allow_unused=True)[0] is None
        )
    except Exception as error:
        raise PluginError(
            f"model update rule {name!r} failed its smoke test with create_graph=True: {error!r}"
        ) from error
    if cut:
        raise PluginError(
            f"model update rule {name!r}: step(..., create_graph=True) returned fast weights {cut} that do not "
            "depend on the old ones (a step under torch.no_grad() or .detach()ed); the meta-gradient flows "
            "through them: compute the new weights from the old ones with autograd on"
        )


def smoke_test(kind_name: str, plugin: Any) -> None:
    """The registrar's smoke test of an inner model (``kind_name="inner_model"``) or inner loss
    (``"inner_loss"``), alone: run once on a tiny input, its pieces have the shapes and dtypes the
    protocol asks for (a model's ``init_params`` those of ``param_shapes``, ``forward`` keeps
    ``[heads, N, f]``; a loss's pairs ``[B, H, T, f]``, ``token_loss`` ``[B, H, T]``, ...).
    :class:`PluginError` with the same sentence registration gives; innerloop.testing's
    ``check_inner_model`` / ``check_inner_loss`` run it before their numeric checks. Its random inputs
    come from a forked generator: the caller's seed does not move."""
    smoke = {"inner_model": _inner_model_smoke, "inner_loss": _inner_loss_smoke}
    if kind_name not in smoke:
        raise ValueError(f"kind_name must be one of {sorted(smoke)}; got {kind_name!r}")
    name = getattr(plugin, "name", None) or type(plugin).__name__
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.random.default_generator.manual_seed(0)
        smoke[kind_name](plugin, name)


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: "an InnerLoss", "an inner loss", "a kernel"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


@dataclass(frozen=True)
class Kind:
    """One kind of thing a plugin can provide.

    ``check(obj, name)`` raises :class:`PluginError` if ``obj`` does not conform (it runs after the
    common opening: an instance, a ``name``, the ``required`` methods). ``external_check`` runs only
    on objects from plugins that do not ship with innerloop (see ``_check_update_rule_against_naive_loop``).
    """

    name: str
    hook: str
    base: type
    required: tuple[str, ...]
    doc: str
    check: Callable[[Any, str], None] | None = None
    external_check: Callable[[Any, str], None] | None = None
    must_be_instance_of_base: bool = False

    @property
    def label(self) -> str:
        """The kind in words: ``inner_loss`` -> ``inner loss``."""
        return self.name.replace("_", " ")

    def validate(self, obj: Any) -> str:
        """The name ``obj`` registers under; :class:`PluginError` with the reason if it does not conform."""
        self.check_kind_of(obj)
        name = _check_name(obj, self.label)
        missing = _missing_methods(obj, self.required)
        if missing:
            raise PluginError(
                f"{self.label} {name!r} lacks required method(s) {missing} of {self.base.__name__}"
            )
        if self.check is not None:
            self.check(obj, name)
        return name

    def check_kind_of(self, obj: Any) -> None:
        """:class:`PluginError` unless ``obj`` is an object of this kind: not a name, a class, or an object
        of another kind (a loss offered as a model). No check runs: the first thing to ask of an object
        offered (before its origin, which an object registered already as its own kind has taken)."""
        if isinstance(obj, str):
            raise PluginError(
                f"register {_a(self.base.__name__)} instance for {_a(self.label)}, not a name: got the str {obj!r} "
                "(a registered plugin is asked for by name in layers and configs; registering needs the object)"
            )
        if inspect.isclass(obj):
            raise PluginError(f"register an instance of the {self.label}, not the class {obj.__name__}")
        other = _other_kind(self, obj)
        if other is not None:
            raise PluginError(
                f"{type(obj).__name__} {getattr(obj, 'name', '')!r} is an instance of {other.base.__name__}, "
                f"not of {self.base.__name__}: register it in the hook {other.hook} (or with "
                f"innerloop.register_{other.name}), not as a kind {self.name!r} object"
            )
        if self.must_be_instance_of_base and not isinstance(obj, self.base):
            raise PluginError(
                f"register {_a(self.base.__name__)} for {_a(self.label)}; got {type(obj).__name__}"
            )


KINDS: tuple[Kind, ...] = (
    Kind(
        "inner_model",
        "register_inner_models",
        InnerModel,
        ("param_shapes", "init_params", "forward"),
        """Register inner models (the fast-weight networks).

    ``register(model)`` takes an instance of :class:`innerloop.InnerModel` (or
    :class:`innerloop.StackModel`) with a unique ``name``. The registrar runs the model once on a tiny
    input to check that its parameters, initialisation and forward agree (``init_params`` returns
    tensors of exactly the names and shapes ``param_shapes`` declares, ``forward`` keeps its input's
    shape and dtype, float32 and float64), and that a declared stack
    equals ``forward``, that ``forward`` has a finite, non-zero gradient w.r.t. the weights, that each
    activation's derivative equals autograd (in value and in its own derivative), and that a batch of
    two sequences gives each the output it gets alone.
    """,
        check=_check_inner_model,
    ),
    Kind(
        "inner_loss",
        "register_inner_losses",
        InnerLoss,
        ("pairs", "token_loss", "token_loss_grad", "init_carry"),
        """Register self-supervised inner losses.

    ``register(loss)`` takes an instance of :class:`innerloop.InnerLoss` (e.g. a subclass of
    :class:`innerloop.HalfSquaredError`) with a unique ``name``; the registrar checks that its pairs
    and per-token loss have the right shapes and dtype, that ``pairs`` is deterministic, causal and the
    same whether a sequence comes whole, in chunks or one token at a time, and for each sequence of a
    batch the same as alone, that ``token_loss_grad`` runs (under ``torch.func`` when not overridden)
    and is finite and not zero everywhere, and that a closed-form
    ``token_loss_grad`` equals autograd in value and in its own derivative.
    """,
        check=_check_inner_loss,
    ),
    Kind(
        "update_rule",
        "register_update_rules",
        UpdateRule,
        ("forward", "check_model"),
        """Register update rules (inner optimizers).

    ``register(rule)`` takes an instance of :class:`innerloop.UpdateRule` with a unique ``name``; the
    registrar checks a rule that does not ship with innerloop against the naive token loop of
    mini-batch gradient descent (or the token-by-token ``reference`` the rule declares) on a tiny
    problem (values and gradients; every built-in model it accepts; the reconstruction and
    next-token losses; the inner LayerNorm and residual each on and off; under ``torch.no_grad()``
    and ``torch.inference_mode()`` too), after checking that ``forward`` returns ``(outputs
    [B, H, T, f], TTTState)``. The built-in rules are checked by innerloop's test suite instead.
    """,
        external_check=_check_update_rule_against_naive_loop,
    ),
    Kind(
        "kernel",
        "register_kernels",
        KernelSpec,
        ("forward", "verify"),
        """Register fast paths.

    ``register(spec)`` takes a :class:`innerloop.kernels.spec.KernelSpec` naming the
    (inner model, inner loss, update rule) it computes and a ``verify`` that says when it can run.
    """,
        must_be_instance_of_base=True,
    ),
    Kind(
        "model_inner_loss",
        "register_model_inner_losses",
        ModelInnerLoss,
        ("chunk_loss",),
        """Register model-level inner losses (what a TTT-E2E model trains its fast weights on).

    ``register(loss)`` takes an instance of :class:`innerloop.core.model_inner.ModelInnerLoss` with a
    unique ``name``; the registrar checks that ``chunk_loss(logits [B, C, V], ids [B, C])`` returns
    one floating-point loss per sequence, ``[B]``.
    """,
        check=_check_model_inner_loss,
    ),
    Kind(
        "model_update_rule",
        "register_model_update_rules",
        ModelUpdateRule,
        ("step",),
        """Register model-level update rules (the per-chunk step of a TTT-E2E model's fast weights).

    ``register(rule)`` takes an instance of :class:`innerloop.core.model_inner.ModelUpdateRule` with a
    unique ``name``; the registrar runs ``step`` once on a tiny problem and checks that it returns
    new fast weights (tensors) of the same names, shapes and dtype.
    """,
        check=_check_model_update_rule,
    ),
)

KIND_NAMES: tuple[str, ...] = tuple(kind.name for kind in KINDS)


def _other_kind(kind: Kind, obj: Any) -> Kind | None:
    """The kind whose base ``obj`` is an instance of, when that is not ``kind``'s (a loss offered as a
    model): None when it is an instance of ``kind``'s base, or of no kind's."""
    if isinstance(obj, kind.base):
        return None
    return next((other for other in KINDS if isinstance(obj, other.base)), None)


KIND_BY_NAME: dict[str, Kind] = {kind.name: kind for kind in KINDS}
