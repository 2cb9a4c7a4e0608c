"""The plugin contracts of innerloop: inner models, inner losses and update rules.

A TTT layer is a hidden state, an update rule and an output rule. Here:

- the hidden state is the weights of an :class:`InnerModel` (one copy per sequence and head);
- the update rule is an :class:`UpdateRule`: a step of an inner optimizer on an :class:`InnerLoss`;
- the output rule is the inner model applied to the query view, wrapped by the layer as
  ``f(x) = x + LN(g(x))`` (see :class:`InnerTask`).

Shapes used throughout: batch ``B``, heads ``H``, tokens ``T`` (or ``N`` inside a mini-batch),
head dim ``f``. Inner-model parameters carry leading batch dimensions, e.g. ``W1 [B, H, f, f]``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from innerloop.core.arguments import check_kind, check_tensor
from innerloop.core.functional import (
    gelu_tanh,
    gelu_tanh_derivative,
    layer_norm,
    relative_error,
    saved_tensors_hooks_suspended,
)
from innerloop.core.wording import a_type

if TYPE_CHECKING:
    from innerloop.core.state import TTTState

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Views:
    """The three views of the tokens the inner loop sees, each ``[B, H, T, f]``.

    ``query`` (XQ) is what the output rule reads; ``key`` (XK) and ``value`` (XV) are what the
    inner loss builds its training pairs from.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor

    def slice_tokens(self, start: int, end: int) -> Views:
        """The views of tokens ``start:end``."""
        return Views(self.query[:, :, start:end], self.key[:, :, start:end], self.value[:, :, start:end])


# --------------------------------------------------------------------------------------------------
# Inner models
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activation:
    """An elementwise function with its closed-form derivative (used by the dual form)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor], torch.Tensor]


#: innerloop's tanh-GELU with its derivative: TTT-MLP's activation, and the one the stack fast paths compute
#: besides the identity (they match an activation by its functions, so a plugin's stack uses this object).
GELU_TANH = Activation("gelu_tanh", gelu_tanh, gelu_tanh_derivative)


@dataclass(frozen=True)
class AffineLayer:
    """One layer of a stack model: ``z = x @ params[weight] + params[bias]``, then ``activation``.

    ``weight`` names a parameter of per-head shape ``[in, out]``; ``bias`` (optional) one of shape
    ``[1, out]``. ``activation`` is None for the last layer.
    """

    weight: str
    bias: str | None
    activation: Activation | None


class InnerModel(ABC):
    """The fast-weight network ``g`` whose weights are the TTT layer's hidden state.

    Subclasses set ``name`` and implement :meth:`param_shapes`, :meth:`init_params` and
    :meth:`forward`. The forward is functional: weights come in as a dict, so the same model serves
    every sequence and head at once and works under ``torch.func`` transforms. ``g`` maps head_dim
    features to head_dim features (the layer adds the residual and LayerNorm around it).
    """

    name: ClassVar[str]

    @abstractmethod
    def param_shapes(self, head_dim: int) -> dict[str, tuple[int, ...]]:
        """Per-head shape of every weight, e.g. ``{"W1": (f, f), "b1": (1, f)}``."""

    @abstractmethod
    def init_params(self, num_heads: int, head_dim: int, generator: torch.Generator | None = None) -> Params:
        """Initial weights ``[num_heads, *shape]`` (the layer's learnable initialisation)."""

    @abstractmethod
    def forward(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``g(x; params)``: ``x [*batch, N, f]`` with ``params[k] [*batch, *shape]`` -> ``[*batch, N, f]``,
        token by token (output ``t`` reads ``x[..., t, :]`` only: the rules call it one token at a time).

        The built-in models refuse what they cannot run with :meth:`check_forward_arguments` (a model of
        one's own may call it too); the scans call :meth:`forward_unchecked`."""

    def forward_unchecked(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without its argument check: what the update rules call inside their per-token
        and per-mini-batch loops, on weights and views :func:`innerloop.core.scan.check_rule_arguments`
        vetted once per call. The default is :meth:`forward` itself; a model whose ``forward`` checks its
        arguments overrides this with the same computation unchecked (:class:`StackModel` does)."""
        return self.forward(params, x)

    def check_forward_arguments(self, params: object, x: object) -> None:
        """Refuse what :meth:`forward` cannot run, naming the parameter, what was given and what is valid:
        ``x`` a floating-point tensor ``[*batch, N, f]``, ``params`` a mapping holding exactly the weights of
        :meth:`param_shapes` at ``f``, each ``[*batch, *shape]`` in ``x``'s dtype and on its device. It reads
        shapes, dtypes and devices only (O(1) Python, no device sync); under ``torch.func`` transforms it
        sees the per-sample shapes, which keep this form."""
        where = f"inner model {self.name!r}: forward"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: x must be a torch.Tensor [*batch, N, f], got {a_type(x)}")
        if x.dim() < 2:
            raise ValueError(
                f"{where}: x must have shape [*batch, N, f] (2 dims or more), got {list(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{where}: x must be a floating-point tensor, got {x.dtype}")
        if not isinstance(params, Mapping):
            raise TypeError(
                f"{where}: params must be a mapping of weight name to tensor, got {a_type(params)}"
            )
        shapes = self.param_shapes(x.shape[-1])
        if params.keys() != shapes.keys():
            missing, unexpected = sorted(set(shapes) - set(params)), sorted(set(params) - set(shapes))
            raise ValueError(
                f"{where}: params must hold the weights {sorted(shapes)} (param_shapes), got missing "
                f"{missing}, unexpected {unexpected}"
            )
        batch = tuple(x.shape[:-2])
        for key, shape in shapes.items():
            what = (
                f"[*batch, *param_shapes(f={x.shape[-1]})[{key!r}]] (x is [*batch, N, f] = {list(x.shape)})"
            )
            check_tensor(where, f"params[{key!r}]", params[key], (*batch, *shape), what, x, "x's")

    @property
    def stack(self) -> tuple[AffineLayer, ...] | None:
        """The model as a stack of affine maps and elementwise functions, or None if it is not one.

        A model that declares its stack can be run by the dual form, and by the stack kernels once
        they are registered for its name (``innerloop.kernels.fused_torch.kernel_spec`` and
        ``innerloop.kernels.cpu.kernel_spec``; the built-in models' are registered by innerloop).
        """
        return None


class StackModel(InnerModel):
    """An inner model that is a stack of affine maps and elementwise functions.

    Subclasses define :attr:`stack`; :meth:`forward` follows from it.
    """

    @property
    @abstractmethod
    def stack(self) -> tuple[AffineLayer, ...]:
        """The layers, first to last."""

    def forward(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``g(x; params)`` through :attr:`stack`, after :meth:`check_forward_arguments`."""
        self.check_forward_arguments(params, x)
        return apply_stack(self.stack, params, x)

    def forward_unchecked(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """:attr:`stack` applied without the check; a subclass with a ``forward`` of its own (one that
        equals the stack only to rounding) keeps that ``forward``. Such a ``forward`` may itself call
        ``forward_unchecked`` (its check, then the stack): called back from it, this runs the stack."""
        if type(self).forward is StackModel.forward or id(self) in _delegating_models():
            return apply_stack(self.stack, params, x)
        _delegating_models().add(id(self))
        try:
            return self.forward(params, x)
        finally:
            _delegating_models().discard(id(self))


_DELEGATING = threading.local()


def _delegating_models() -> set[int]:
    """Ids of the StackModels whose ``forward_unchecked`` is running their own ``forward`` in this
    thread: a ``forward`` that calls ``forward_unchecked`` back gets the stack, not a recursion."""
    if not hasattr(_DELEGATING, "ids"):
        _DELEGATING.ids = set()
    return _DELEGATING.ids


def apply_stack(
    stack: Sequence[AffineLayer], params: Mapping[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """``x [*batch, N, f]`` through the layers of ``stack`` in order, weights from ``params``."""
    for layer in stack:
        x = x @ params[layer.weight]
        if layer.bias is not None:
            x = x + params[layer.bias]
        if layer.activation is not None:
            x = layer.activation.fn(x)
    return x


# Relative error allowed between a model's forward and its declared stack, in float64 (rounding only).
STACK_TOLERANCE = 1e-6


def stack_forward_mismatch(
    model: InnerModel, params: Mapping[str, torch.Tensor], x: torch.Tensor, tolerance: float = STACK_TOLERANCE
) -> str | None:
    """None if ``model.forward(params, x)`` equals its declared ``stack`` applied to ``x`` (or it
    declares none), else a sentence with the relative error. The dual form and the stack kernels run
    the stack, the primal form runs ``forward``: they must be one function."""
    if model.stack is None:
        return None
    error = relative_error(model.forward(params, x), apply_stack(model.stack, params, x))
    if error <= tolerance:  # not (error > tolerance): NaN is a mismatch too
        return None
    return f"{model.name}: forward vs its declared stack: relative error {error:.3e} > {tolerance:.1e}"


def check_stack_on_random_weights(model: InnerModel, head_dim: int) -> str | None:
    """:func:`stack_forward_mismatch` at ``head_dim`` on float64 weights (perturbed so that every
    term, zero-initialised biases too, matters) and random inputs, drawn from a forked RNG so the
    caller's seed does not move. Cheap: one head, three tokens."""
    if model.stack is None:
        return None
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        weights = {  # per-head shapes
            k: v[0].double() + 0.1 * torch.randn(v.shape[1:], dtype=torch.float64)
            for k, v in model.init_params(1, head_dim).items()
        }
        x = torch.randn(3, head_dim, dtype=torch.float64)  # [N, f]
        return stack_forward_mismatch(model, weights, x)


# --------------------------------------------------------------------------------------------------
# Inner losses
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossPairs:
    """The self-supervised training pairs of a chunk of tokens.

    ``inputs`` and ``targets`` are ``[B, H, T, f]``; token ``t`` trains the inner model to map
    ``inputs[t]`` to ``targets[t]``. ``valid`` (broadcastable to ``[B, H, T]``, or None for all
    valid) is a weight per pair that multiplies its learning rate: 0 (or False) drops the pairs that do
    not exist (e.g. the first token for next-token prediction); other values weight a pair as they are.
    ``carry`` is what the loss needs from this chunk to continue with the next one (default: nothing).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor | None = None
    carry: dict[str, torch.Tensor] = field(default_factory=dict)


class InnerLoss(ABC):
    """A self-supervised inner task: training pairs from the views, and a per-token loss.

    Subclasses set ``name`` and implement :meth:`pairs` and :meth:`token_loss`. The gradient of the
    loss w.r.t. the prediction defaults to autograd; override :meth:`token_loss_grad` with a closed
    form when there is one.
    """

    name: ClassVar[str]

    def init_carry(self, batch_size: int, num_heads: int, head_dim: int, like: torch.Tensor) -> dict:
        """What :meth:`pairs` needs at the start of a sequence (default: nothing)."""
        return {}

    def batched_carry_keys(self, num_heads: int, head_dim: int, like: torch.Tensor) -> frozenset[str]:
        """The carry entries that hold one row per sequence, batch-first (``[batch, ...]``); every other
        entry is shared by the batch. :meth:`TTTState.index_select` selects the rows of the first and
        keeps the others; :meth:`TTTState.cat` joins the first and needs the others equal.

        The default reads :meth:`init_carry`: an entry shaped ``[2, *s]`` for two sequences and
        ``[1, *s]`` for one is per sequence, one of the same shape for both is shared; any other shape
        is refused (a loss with such a carry overrides this method)."""
        two = self.init_carry(2, num_heads, head_dim, like)
        one = self.init_carry(1, num_heads, head_dim, like)
        batched = set()
        for key, value in two.items():
            single = one.get(key)
            shapes = (list(value.shape), None if single is None else list(single.shape))
            if single is not None and single.shape == value.shape:
                continue
            if (
                single is None
                or value.dim() == 0
                or (value.shape[0], single.shape[0]) != (2, 1)
                or (value.shape[1:] != single.shape[1:])
            ):
                raise ValueError(
                    f"inner loss {self.name!r}: init_carry gives {key!r} shapes {shapes[0]} for 2 sequences "
                    f"and {shapes[1]} for 1: neither batch-first nor shared by the batch; the loss must "
                    "say which carry entries are per sequence (override InnerLoss.batched_carry_keys)"
                )
            batched.add(key)
        return frozenset(batched)

    @abstractmethod
    def pairs(self, views: Views, carry: Mapping[str, torch.Tensor]) -> LossPairs:
        """The (input, target) pair of every token of ``views``; causal: token t uses tokens <= t; per
        sequence and per head: the pairs of sequence b and head h read that sequence's and head's views
        only (each head is a TTT layer of its own; the carry may hold per-head values)."""

    @abstractmethod
    def token_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of each token: ``prediction, target [..., f]`` -> ``[...]``."""

    def check_pairs_arguments(self, views: object, carry: object) -> None:
        """Refuse what :meth:`pairs` cannot run, naming the parameter, what was given and what is valid:
        ``views`` a :class:`Views` of three floating-point ``[B, H, T, f]`` tensors of one shape, dtype and
        device, ``carry`` a mapping (a loss checks its entries). The built-in losses call it at the top
        of ``pairs`` (once per chunk; a loss of one's own may call it too)."""
        where = f"inner loss {self.name!r}: pairs"
        check_kind(where, "views", views, Views)
        query = views.query  # type: ignore[attr-defined]
        check_tensor(where, "views.query", query, (None,) * 4, "[B, H, T, f]", None)
        if not query.is_floating_point():
            raise TypeError(f"{where}: views.query must be a floating-point tensor, got {query.dtype}")
        for name in ("key", "value"):
            what = f"[B, H, T, f] (views.query's: {list(query.shape)})"
            view = getattr(views, name)
            check_tensor(where, f"views.{name}", view, tuple(query.shape), what, query, "views.query's")
        if not isinstance(carry, Mapping):
            raise TypeError(
                f"{where}: carry must be a mapping (init_carry's, or the last pairs' carry), got {a_type(carry)}"
            )

    def check_token_loss_arguments(
        self, prediction: object, target: object, method: str = "token_loss"
    ) -> None:
        """Refuse what :meth:`token_loss` (or ``method``, :meth:`token_loss_grad`) cannot score: a
        floating-point ``prediction [..., f]`` and a ``target`` of its shape, dtype and device (a target
        that only broadcasts would score each prediction against another token's target). O(1) Python:
        the built-in losses call it on every call, under ``torch.func`` too (per-sample shapes)."""
        where = f"inner loss {self.name!r}: {method}"
        if not isinstance(prediction, torch.Tensor):
            raise TypeError(f"{where}: prediction must be a torch.Tensor [..., f], got {a_type(prediction)}")
        if prediction.dim() < 1 or not prediction.is_floating_point():
            raise TypeError(
                f"{where}: prediction must be a floating-point tensor [..., f], got "
                f"{prediction.dtype} of shape {list(prediction.shape)}"
            )
        shape = tuple(prediction.shape)
        check_tensor(
            where, "target", target, shape, "prediction's shape [..., f]", prediction, "prediction's"
        )

    def token_loss_grad(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """d token_loss / d prediction, ``[..., f]``; autograd by default (differentiable)."""
        flat_prediction = prediction.reshape(-1, prediction.shape[-1])
        flat_target = target.reshape(-1, target.shape[-1])
        per_token = torch.func.vmap(torch.func.grad(lambda p, y: self.token_loss(p, y)))
        with saved_tensors_hooks_suspended():  # torch.func.grad refuses an activation checkpoint's hooks
            return per_token(flat_prediction, flat_target).reshape(prediction.shape)


class HalfSquaredError(InnerLoss):
    """Base of losses scored by ``1/2 ||prediction - target||^2``, with its closed-form gradient:
    a subclass sets ``name`` and implements :meth:`pairs` only."""

    def token_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``1/2 ||prediction - target||^2`` of each token, after :meth:`check_token_loss_arguments`."""
        self.check_token_loss_arguments(prediction, target)
        return 0.5 * (prediction - target).pow(2).sum(dim=-1)

    def token_loss_grad(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``prediction - target``, after :meth:`check_token_loss_arguments`."""
        self.check_token_loss_arguments(prediction, target, "token_loss_grad")
        return prediction - target


# --------------------------------------------------------------------------------------------------
# The inner task: model + loss + the layer's wrapping of g
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InnerTask:
    """Everything an update rule needs besides the state, the views and the learning rates.

    The prediction of the inner model on ``x`` is ``f(x) = x + LN(g(x))``: the residual and the
    per-head LayerNorm (``norm_weight``, ``norm_bias`` ``[H, f]``) are layer options.
    ``kernel`` selects the fast path: ``"auto"`` (best registered kernel that verifies, else torch),
    ``"torch"`` (never a kernel) or a kernel's registered name (an error if it cannot run).
    ``needs_double_backward`` tells kernels that gradients of gradients will be taken.
    ``on_dispatch(path, reason)`` is called with every fast-path decision.
    """

    model: InnerModel
    loss: InnerLoss
    mini_batch_size: int
    norm_weight: torch.Tensor | None
    norm_bias: torch.Tensor | None
    norm_eps: float = 1e-6
    residual: bool = True
    kernel: str = "auto"
    needs_double_backward: bool = False
    on_dispatch: Callable[[str, str], None] | None = field(default=None, compare=False, repr=False)

    @property
    def use_norm(self) -> bool:
        return self.norm_weight is not None

    def predict(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``f(x) = x + LN(g(x))`` for ``x [B, H, N, f]`` and params ``[B, H, *shape]`` (the model's
        :meth:`~InnerModel.forward_unchecked`: the caller vetted them)."""
        z = self.model.forward_unchecked(params, x)
        return self.wrap_output(x, z)

    def wrap_output(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Residual and per-head LayerNorm around ``z = g(x)`` (``[B, H, N, f]``)."""
        if self.norm_weight is None or self.norm_bias is None:
            return residual_and_norm(x, z, None, None, self.norm_eps, self.residual)
        weight, bias = self.norm_weight[:, None, :], self.norm_bias[:, None, :]  # [H, 1, f]
        return residual_and_norm(x, z, weight, bias, self.norm_eps, self.residual)


def residual_and_norm(
    x: torch.Tensor,
    z: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    norm_eps: float,
    residual: bool,
) -> torch.Tensor:
    """``x + LN(z)`` (or without the residual, or the LayerNorm when ``norm_weight`` is None): the
    inner model's prediction around ``z = g(x)``. ``norm_weight``/``norm_bias`` broadcast against
    ``z`` (``[..., f]``) from the left."""
    if norm_weight is not None and norm_bias is not None:
        z = layer_norm(z, norm_weight, norm_bias, norm_eps)
    return x + z if residual else z


# --------------------------------------------------------------------------------------------------
# Update rules
# --------------------------------------------------------------------------------------------------


class UpdateRule(ABC):
    """The inner optimizer: owns the scan over the sequence.

    ``forward(state, task, views, lr, tau)`` processes a chunk of any length, starting and ending
    anywhere (inside a mini-batch too), and returns the inner outputs ``f(XQ_t; W_t)`` of every
    token and the state after the chunk. All gradients inside a mini-batch are taken at the weights
    the mini-batch started with; token ``i`` of a mini-batch uses
    ``W_i = W_b - tau_i * sum_{j <= i} lr_j * grad_j``.

    A rule that forgets sets ``supports_decay`` and takes ``decay=`` (``[B, H, T]``, each token's
    ``1 - a_t``); a rule whose ``forward`` also names ``decay_log=`` gets a gate given as its log
    (``log a_t``, as Gated DeltaNet and Titans give theirs) unrounded, in place of ``decay``, and one
    that does not gets ``decay = -expm1(decay_log)``; one with momentum sets ``supports_momentum`` and
    takes ``momentum=``; a rule that
    has no token-index scale sets ``uses_token_scale = False`` and gets ``tau=None``; a rule whose blocks
    never go to a kernel (it computes on torch only) says why in ``no_kernel_reason``, and a layer naming a
    kernel for it (``kernel="<name>"``) is refused at construction. The exact
    semantics of each are in :func:`innerloop.core.scan.run_scan` (and docs/family.md). The
    keywords are passed only when given, so a rule without them keeps the five-argument ``forward``.

    What a rule computes is checked (at registration and by :func:`innerloop.testing.check_update_rule`)
    against a token-by-token statement of it: by default the naive token loop of mini-batch gradient
    descent with these decay and momentum semantics
    (:func:`innerloop.testing.reference.naive_token_loop`), so a rule is an *implementation* of that
    (a faster or fused one). A rule that is another inner optimizer declares its own statement in
    :attr:`reference`.
    """

    name: ClassVar[str]
    supports_decay: ClassVar[bool] = False
    supports_momentum: ClassVar[bool] = False
    uses_token_scale: ClassVar[bool] = True
    #: None: the rule sends its blocks to the kernel dispatch (:mod:`innerloop.kernels.dispatch`); else
    #: why it never does (``minibatch_gd``: the primal form, on torch; ``momentum``: no kernel contract
    #: carries its state ``S``), said when a layer names a kernel for it. It speaks for the ``forward``
    #: of the class that sets it: a subclass with a ``forward`` of its own does not inherit it (read it
    #: with :func:`no_kernel_reason`), and restates it if its blocks still never reach a kernel.
    no_kernel_reason: ClassVar[str | None] = None

    #: The token-by-token statement of what this rule computes, which the checks compare it with (whole
    #: and cut anywhere, values and gradients): None (the default) for mini-batch gradient descent, the
    #: naive token loop. A rule that is another inner optimizer defines a method
    #: ``reference(self, state, task, views, lr, tau, decay=None, momentum=None)`` with ``forward``'s
    #: contract (``decay=`` / ``momentum=`` passed only when given), written as a plain loop over the
    #: tokens, independent of ``forward``'s code (a reference that calls ``forward`` checks nothing);
    #: see ``innerloop.testing.reference.naive_token_loop`` for the shape of one.
    reference: ClassVar[Callable[..., tuple[torch.Tensor, TTTState]] | None] = None

    def check_model(self, model: InnerModel) -> str | None:
        """None if this rule can run ``model``, else the reason it cannot."""
        return None

    @abstractmethod
    def forward(
        self,
        state: TTTState,
        task: InnerTask,
        views: Views,
        lr: torch.Tensor,
        tau: torch.Tensor | None,
    ) -> tuple[torch.Tensor, TTTState]:
        """Run the chunk.

        Args:
            state: the state before the chunk (not modified).
            task: model, loss and the layer's wrapping of the model.
            views: XQ, XK, XV ``[B, H, T, f]``.
            lr: ``[B, H, T]`` per-token inner learning rates.
            tau: ``[K]`` the token-index scale of each position in a mini-batch (clamped >= 0);
                None for a rule with ``uses_token_scale = False``.

        Returns:
            ``(outputs [B, H, T, f], new_state)``.

        The built-in rules refuse what they cannot run (a wrong shape, dtype or device, ``T = 0``), naming
        the argument, with :func:`innerloop.core.scan.check_rule_arguments`, once per call (a rule of
        one's own may call it too).
        """


def no_kernel_reason(rule: object) -> str | None:
    """Why ``rule``'s blocks never reach a kernel (its ``no_kernel_reason``), or None if they may.

    The reason speaks for the ``forward`` of the class that set it: a subclass that overrides ``forward``
    (a user's ``minibatch_gd`` that sends its blocks to the kernel dispatch) does not inherit it; one
    that keeps the inherited ``forward``, or sets ``no_kernel_reason`` itself, does."""
    reason = getattr(rule, "no_kernel_reason", None)
    if reason is None or "no_kernel_reason" in vars(rule):
        return reason
    if "forward" in vars(rule):  # a forward set on the instance: not the one the reason was written for
        return None
    mro = type(rule).__mro__
    reason_owner = next(cls for cls in mro if "no_kernel_reason" in vars(cls))
    forward_owner = next((cls for cls in mro if "forward" in vars(cls)), None)
    if (
        forward_owner is not None
        and forward_owner is not reason_owner
        and issubclass(forward_owner, reason_owner)
    ):
        return None  # the forward was overridden below the class that gave the reason
    return reason


__all__ = [
    "GELU_TANH",
    "Activation",
    "AffineLayer",
    "HalfSquaredError",
    "InnerLoss",
    "InnerModel",
    "InnerTask",
    "LossPairs",
    "Params",
    "StackModel",
    "UpdateRule",
    "STACK_TOLERANCE",
    "apply_stack",
    "check_stack_on_random_weights",
    "no_kernel_reason",
    "residual_and_norm",
    "stack_forward_mismatch",
    "Views",
]
