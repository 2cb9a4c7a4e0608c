"""``scan``: the test-time-regression family as one op, like FLA's ops (public as ``innerloop.ops``).

Per batch and head (row vectors), an inner model ``g`` (``"matrix"``: ``x W``; ``"linear"``:
``x W1 + b1``; ``"mlp"``; any registered one) wrapped as ``f(x) = [x +] [LN](g(x))`` is regressed
online on ``k_t -> v_t`` with the loss ``l_t = 1/2 ||f(k_t) - v_t||^2`` (or any registered inner
loss). Token ``t`` of the mini-batch starting at ``b`` (``K = mini_batch_size``, ``i = t - b``)
takes its gradient at the weights ``W_b`` the mini-batch started with; with ``a_t = 1 - decay_t``:

- ``dual_form`` / ``minibatch_gd``: ``W_t = (prod_{s=b..t} a_s) W_b - tau_i sum_{s=b..t}
  (prod_{r=s+1..t} a_r) lr_s grad_s`` (``tau = token_scale``, ones when None);
- ``momentum`` (Titans): ``S_t = m_t S_{t-1} - lr_t grad_t``, ``W_t = a_t W_{t-1} + S_t``.

Token ``t`` outputs ``f(q_t; W_t)``: the weights after its own step. Linear attention, gated linear
attention, DeltaNet, Gated DeltaNet, TTT-Linear/MLP, momentum DeltaNet and Titans are choices of
these arguments (docs/family.md has the table). ``TTTLayer`` runs the same path
(:func:`innerloop.core.scan.run_scan`), with the same kernel dispatch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._C._functorch import is_functorch_wrapped_tensor

from innerloop.core.eager import run_eagerly
from innerloop.core.functional import is_flag
from innerloop.core.layer import (
    MAX_MINI_BATCH_SIZE,
    MAX_NORM_EPS,
    check_norm_eps,
    check_positive_int,
    is_real,
    resolve_plugins,
)
from innerloop.core.protocol import InnerLoss, InnerModel, InnerTask, UpdateRule, Views
from innerloop.core.scan import run_scan, run_scan_without_autocast
from innerloop.core.state import StateSignature, TTTState

Weights = dict[str, torch.Tensor]


class PartialWeights(dict):
    """The weights :func:`scan` returns when they alone cannot continue the sequence exactly: after a
    call that stopped inside a mini-batch (the weights its last tokens read, ``tokens_into_mini_batch``
    tokens into that mini-batch: a new call would start a new mini-batch where the whole sequence
    finishes this one), or under an inner loss that carries something from one call to the next
    (``dropped_carry``: ``next_token``'s last key, which pairs with the next call's first token). A
    plain dict of weights cannot say either; these can, so :func:`scan` refuses them as ``initial``."""

    tokens_into_mini_batch: int = 0
    dropped_carry: tuple[str, ...] = ()  # the inner loss's carry entries these weights do not hold


def _check_tensor(
    name: str,
    value: Any,
    shape: tuple[int, ...],
    like: torch.Tensor,
    what: str,
    also: torch.dtype | None = None,
) -> None:
    """``value`` must be a tensor of ``shape`` with ``like``'s dtype (or ``also``) and device; the error
    names it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {shape}, got {tuple(value.shape)}")
    allowed = {like.dtype} if also is None else {like.dtype, also}
    if value.dtype not in allowed and len(allowed) == 1:
        raise TypeError(
            f"{name} is {value.dtype} but q is {like.dtype}: every tensor of a scan has q's dtype"
        )
    if value.dtype not in allowed:
        valid = " or ".join(sorted(str(dtype) for dtype in allowed))
        raise TypeError(
            f"{name} is {value.dtype}; valid: {valid} (q's dtype, or the scan's: at least float32)"
        )
    if value.device != like.device:
        raise ValueError(
            f"{name} is on {value.device} but q is on {like.device}: every tensor must be on q's device"
        )


def _check_views(q: Any, k: Any, v: Any) -> None:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor [B, H, T, f], got {type(q).__name__}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got dtype {q.dtype}")
    # B = 0 is an empty batch and T = 0 an empty piece of a sequence (empty outputs, the weights as given,
    # as TTTLayer's); heads and the head size must be there
    if q.dim() != 4 or q.shape[1] < 1 or q.shape[3] < 1:
        raise ValueError(
            f"q must have shape [B, H, T, f] with H, f >= 1 (B = 0 is an empty batch, T = 0 an empty piece), "
            f"got {tuple(q.shape)}"
        )
    for name, tensor in (("k", k), ("v", v)):
        _check_tensor(name, tensor, tuple(q.shape), q, "[B, H, T, f] (q's shape)")


def _check_options(
    mini_batch_size: Any,
    inner_norm: Any,
    inner_residual: Any,
    kernel: Any,
    norm_eps: Any,
    double: Any = False,
) -> int:
    """Each option checked, naming it; returns ``mini_batch_size`` as an ``int`` (it may be a numpy one)."""
    if not isinstance(kernel, str):
        raise ValueError(f"kernel must be 'auto', 'torch' or a registered kernel name, got {kernel!r}")
    check_positive_int("mini_batch_size", mini_batch_size, most=MAX_MINI_BATCH_SIZE)
    mini_batch_size = int(mini_batch_size)
    if mini_batch_size > MAX_MINI_BATCH_SIZE:
        raise ValueError(
            f"mini_batch_size must be a positive integer <= {MAX_MINI_BATCH_SIZE} (a scan builds [K, K] matrices), got "
            f"{mini_batch_size}; for one mini-batch over the whole sequence any K >= T is the same"
        )
    flags = (
        ("inner_norm", inner_norm),
        ("inner_residual", inner_residual),
        ("needs_double_backward", double),
    )
    for name, flag in flags:
        if not is_flag(flag):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if not is_real(norm_eps) or norm_eps <= 0:  # a number, not a tensor: as TTTLayer's real options
        hint = " (a tensor: pass a Python number, float(t))" if isinstance(norm_eps, torch.Tensor) else ""
        raise ValueError(f"norm_eps must be a finite number in (0, {MAX_NORM_EPS:g}), got {norm_eps!r}{hint}")
    return mini_batch_size


def _check_norm_width(q: torch.Tensor, inner_norm: bool) -> None:
    """Heads of one feature cannot take the inner LayerNorm (as in ``TTTLayer``: ``check_inner_norm_width``):
    a LayerNorm over one feature outputs its bias whatever the inner model holds, so the memory would never
    be read and every output would be the same (a scan that silently learns nothing)."""
    if inner_norm and q.shape[3] == 1:
        raise ValueError(
            f"an inner LayerNorm (inner_norm=True) needs heads of 2 or more features, got f = 1 (q's shape "
            f"{tuple(q.shape)}): a LayerNorm over one feature outputs its bias whatever the inner model holds "
            "(the memory is never read); pass inner_norm=False, or heads of 2 or more features"
        )


def _norm_parameters(
    q: torch.Tensor, inner_norm: bool, norm_weight: Any, norm_bias: Any
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The inner LayerNorm's ``[H, f]`` weight and bias (ones and zeros when not given), or Nones."""
    heads, head_dim = q.shape[1], q.shape[3]
    if not inner_norm:
        for name, value in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
            if value is not None:
                raise ValueError(f"{name} is given but inner_norm=False: pass inner_norm=True or drop {name}")
        return None, None
    weight = q.new_ones(heads, head_dim) if norm_weight is None else norm_weight
    bias = q.new_zeros(heads, head_dim) if norm_bias is None else norm_bias
    _check_tensor("norm_weight", weight, (heads, head_dim), q, "[H, f]")
    _check_tensor("norm_bias", bias, (heads, head_dim), q, "[H, f]")
    return weight, bias


def _in_functorch(*tensors: torch.Tensor | None) -> bool:
    """Whether any of ``tensors`` is inside a ``torch.func`` transform (``vmap`` cannot read a batched
    tensor's values: the value checks run outside the transforms only)."""
    return any(t is not None and is_functorch_wrapped_tensor(t) for t in tensors)


def _check_per_token(q: torch.Tensor, lr: Any, decay: Any, momentum: Any, decay_log: Any = None) -> None:
    shape = tuple(q.shape[:3])
    # q's dtype, or the scan's (at least float32): a bfloat16 scan's gates may stay in float32, where a
    # bfloat16 log gate of -10 would hold its factor exp(g) only to 2%
    scan_dtype = torch.promote_types(q.dtype, torch.float32)
    _check_tensor("lr", lr, shape, q, "[B, H, T]", also=scan_dtype)
    for name, value in (("decay", decay), ("momentum", momentum), ("decay_log", decay_log)):
        if value is not None:
            _check_tensor(name, value, shape, q, "[B, H, T] (or None)", also=scan_dtype)
    if decay is not None and decay_log is not None:
        raise ValueError(
            "decay and decay_log were both given: give the gate once, as decay (1 - a_t) or as decay_log "
            "(log a_t, exact for small a_t)"
        )
    if q.device.type == "meta" or _in_functorch(lr, decay, momentum, decay_log):  # no values to read
        return
    if decay_log is not None and not bool(
        (decay_log <= 0).all()
    ):  # NaN and +inf fail it; -inf is a full reset
        outside = decay_log[~(decay_log <= 0)]
        raise ValueError(
            f"decay_log must be <= 0 (log a_t of a gate a_t in [0, 1]; -inf is a full reset), got "
            f"{outside.numel()} values outside it, e.g. {outside[0].item()}"
        )
    _check_finite("lr", lr)
    # One rule for every path: a kernel takes the decay's gate a = 1 - decay in log space.
    if decay is not None and not bool(((decay >= 0) & (decay <= 1)).all()):
        outside = decay[~((decay >= 0) & (decay <= 1))]
        raise ValueError(
            f"decay must lie in [0, 1] (the forgetting 1 - a_t of a gate a_t in [0, 1]), got "
            f"{outside.numel()} values outside it, e.g. {outside[0].item()}"
        )
    if momentum is not None:
        _check_finite("momentum", momentum)


def _check_recordable(arguments: dict[str, Any]) -> None:
    """Inference tensors (made under ``torch.inference_mode``) cannot enter a call that records an
    autograd graph (grad enabled and some argument requires grad): torch refuses to save them for
    backward, in a bare RuntimeError from inside the scan. Refused here, naming them and the remedies."""
    if not torch.is_grad_enabled():
        return
    tensors = {}
    for name, value in arguments.items():
        if isinstance(value, dict):
            tensors.update({f"{name}[{key!r}]": t for key, t in value.items() if isinstance(t, torch.Tensor)})
        elif isinstance(value, torch.Tensor):
            tensors[name] = value
    inference = [name for name, t in tensors.items() if t.is_inference()]
    if inference and any(t.requires_grad for t in tensors.values()):
        raise ValueError(
            f"{', '.join(inference)}: inference tensors (made under torch.inference_mode), which autograd "
            "cannot save for backward, in a call that records a graph (grad is enabled and an argument "
            "requires grad): run the call under torch.no_grad() or torch.inference_mode(), or pass "
            "clones made outside inference mode (normal tensors)"
        )


def _check_finite(name: str, value: torch.Tensor) -> None:
    """Refuse a NaN or infinite value of the per-token argument ``name`` (it would turn every later
    output and the weights into NaN, silently)."""
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite, got NaN or infinite values")


def _token_scale(
    q: torch.Tensor, rule: UpdateRule, token_scale: Any, mini_batch_size: int
) -> torch.Tensor | None:
    """``tau [K]``: ``token_scale``, ones when None for a rule that has one, None for one that has not."""
    if not rule.uses_token_scale:
        if token_scale is not None:
            raise ValueError(
                f"token_scale must be None for update_rule={rule.name!r} (it has no token-index scale: "
                "every token steps with its own lr), got a tensor"
            )
        return None
    if token_scale is None:
        return q.new_ones(mini_batch_size)
    _check_tensor("token_scale", token_scale, (mini_batch_size,), q, "[mini_batch_size]")
    if q.device.type != "meta" and not _in_functorch(token_scale):
        _check_finite("token_scale", token_scale)
    return token_scale


def _check_not_partial(initial: dict, mini_batch_size: int) -> None:
    """Refuse the :class:`PartialWeights` of a scan that stopped inside a mini-batch, or whose inner loss's
    carry they do not hold, as ``initial``."""
    if isinstance(initial, PartialWeights) and initial.dropped_carry:
        raise ValueError(
            f"initial holds the weights of a scan whose inner loss carries {list(initial.dropped_carry)} from "
            "one call to the next (next_token: the last key, paired with the next call's first token), which "
            "weights cannot hold: continuing from them drops that pair (other numbers). Use TTTLayer and its "
            "state, which carries it; dict(initial) passes them anyway, as the start of a new sequence"
        )
    if isinstance(initial, PartialWeights) and initial.tokens_into_mini_batch:
        raise ValueError(
            f"initial holds the weights of a scan that stopped {initial.tokens_into_mini_batch} tokens into a "
            f"mini-batch of {mini_batch_size}: continuing from them would start a new mini-batch where the "
            "whole sequence finishes that one (other numbers). Split a sequence at multiples of "
            "mini_batch_size, or use TTTLayer and its state (which carries the partial mini-batch); "
            "dict(initial) passes them anyway, exact only where the mini-batch size does not change the "
            "model (linear attention's bare matrix model under the dot_product loss)"
        )


def _initial_state(
    q: torch.Tensor,
    model: InnerModel,
    loss: InnerLoss,
    rule: UpdateRule,
    mini_batch_size: int,
    initial: Any,
    given_dtype: torch.dtype,
) -> TTTState:
    """The state at the start of the scan, in ``q``'s dtype (the scan's): ``initial``'s weights (zeros
    when None) at a boundary; ``initial`` may also come in ``given_dtype`` (the caller's q's)."""
    batch, heads, _, head_dim = q.shape
    shapes = model.param_shapes(head_dim)
    signature = StateSignature(batch, heads, head_dim, mini_batch_size, model.name, loss.name)
    zeros = {k: q.new_zeros(batch, heads, *shape) for k, shape in shapes.items()}
    state = TTTState(
        params=zeros,
        pending={k: torch.zeros_like(v) for k, v in zeros.items()},
        position=0,
        signature=signature,
        loss_carry=loss.init_carry(batch, heads, head_dim, q),
    )
    if initial is None:
        return state
    if not isinstance(initial, dict):
        raise TypeError(f"initial must be a dict of weights by name (or None), got {type(initial).__name__}")
    _check_not_partial(initial, mini_batch_size)
    weights = {}
    for name, value in initial.items():
        base = name.removeprefix("momentum.") if isinstance(name, str) else None
        if base not in shapes:
            valid = sorted([*shapes, *(f"momentum.{k}" for k in shapes)])
            raise ValueError(
                f"initial[{name!r}] is not a weight of inner_model {model.name!r}; valid names: {valid}"
            )
        if name != base and not rule.supports_momentum:
            raise ValueError(f"initial[{name!r}] is a momentum but update_rule={rule.name!r} takes none")
        per_head = (heads, *shapes[base])
        if isinstance(value, torch.Tensor) and tuple(value.shape) == per_head:
            value = value.expand(batch, *per_head)  # one initial state for every sequence
        _check_tensor(
            f"initial[{name!r}]", value, (batch, *per_head), q, "[B, H, *shape] (or [H, *shape])", given_dtype
        )
        weights[name] = value.to(q.dtype)
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise ValueError(
            f"initial lacks {missing} (inner_model {model.name!r} has {sorted(shapes)}); omit initial for zeros"
        )
    momenta = {name.removeprefix("momentum.") for name in weights if name.startswith("momentum.")}
    if momenta and momenta != set(shapes):
        lacking = sorted(f"momentum.{k}" for k in set(shapes) - momenta)
        raise ValueError(
            f"initial has the momentum of {sorted(momenta)} but lacks {lacking}: give the momentum of every "
            "weight, or of none (zeros)"
        )
    return state.with_weights(weights)


def _check_momentum_is_read(initial: Any, momentum: torch.Tensor | None) -> None:
    """A carried momentum ``S`` without the gate ``momentum`` would be dropped (``S_t = m_t S_{t-1}`` with
    no ``m``): the caller most likely forgot this call's gate, and the continuation would not equal the
    whole sequence."""
    if momentum is not None or not isinstance(initial, dict):
        return
    carried = sorted(name for name in initial if isinstance(name, str) and name.startswith("momentum."))
    if carried:
        raise ValueError(
            f"initial carries {carried} but momentum=None: pass this call's momentum [B, H, T] (the carried "
            "momentum is read through it), or leave those entries out of initial to start without one"
        )


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)


def _no_token_result(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    state: TTTState,
    tau: torch.Tensor | None,
    momentum: torch.Tensor | None,
) -> tuple[torch.Tensor, Weights]:
    """What :func:`scan` returns for ``T = 0``: the ``[B, H, 0, f]`` outputs, in q's dtype and in the graph
    of ``q``, ``k``, ``v`` and ``lr`` (a backward through them runs, as through any call's), and the
    starting weights unchanged (with a zero momentum ``S`` where ``momentum`` is given and none was)."""
    outputs = (q + k + v) * lr.unsqueeze(-1).to(q.dtype)
    weights = state.scan_weights(tau)
    if momentum is not None:
        for name, value in state.params.items():
            weights.setdefault(f"momentum.{name}", torch.zeros_like(value))
    return outputs, weights


@run_eagerly("innerloop: the inner scan runs eagerly")  # as TTTLayer's (innerloop/core/layer.py says why)
def scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    *,
    inner_model: str | InnerModel = "linear",
    inner_loss: str | InnerLoss = "reconstruction",
    update_rule: str | UpdateRule = "dual_form",
    mini_batch_size: int = 16,
    token_scale: torch.Tensor | None = None,
    inner_norm: bool = True,
    inner_residual: bool = True,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    decay: torch.Tensor | None = None,
    momentum: torch.Tensor | None = None,
    initial: Weights | None = None,
    decay_log: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    kernel: str = "auto",
    dispatches: list[tuple[str, str]] | None = None,
    needs_double_backward: bool = False,
) -> tuple[torch.Tensor, Weights]:
    """Regress the inner model online on ``k -> v`` and read it with ``q`` (module docstring).

    Args:
        q, k, v: ``[B, H, T, f]`` queries, keys, values (no scaling is applied: pass ``s * q``).
        lr: ``[B, H, T]`` each token's inner learning rate. It and the gates below are in q's dtype or
            the scan's (at least float32: a bfloat16 scan's gates may stay in float32).
        inner_model, inner_loss, update_rule: registered names or plugin instances.
        mini_batch_size: ``K``, tokens whose gradients are taken at the same weights.
        token_scale: ``tau [K]`` of the mini-batch rules (None: ones); must be None for ``momentum``.
        inner_norm, inner_residual: ``f(x) = x + LN(g(x))`` (each can be off).
        norm_weight, norm_bias: ``[H, f]`` the inner LayerNorm's affine (None: ones, zeros).
        decay: ``[B, H, T]`` forgetting ``1 - a_t`` of every inner weight, in ``[0, 1]`` (None: none).
        momentum: ``[B, H, T]`` the momentum ``m_t`` of update_rule ``"momentum"`` (None: 0): any finite
            value, computed as written (exact products, no logarithms). Titans' sigmoid gate gives
            ``(0, 1)``; momentum DeltaNet's ``mu * beta_t / beta_{t-1}`` (docs/family.md) can exceed 1, and
            ``|m_t| > 1`` for long lets ``S`` grow geometrically (NaN or inf are refused).
        decay_log: ``[B, H, T]`` the gate as ``log a_t <= 0`` instead of ``decay`` (not both; ``-inf`` is a
            full reset), FLA's ``g``: the decay products are then taken in log space (``exp`` of
            the sums of the logs between two tokens, in float64), which keeps a small ``a_t`` that a float32
            ``decay = 1 - a_t`` near 1 rounds to ``eps / a_t`` of itself, and the gradient w.r.t. ``log a_t``.
        initial: weights by name, ``[B, H, *shape]`` or ``[H, *shape]``, at a mini-batch boundary,
            plus ``"momentum.<name>"`` (``S``) for the momentum rule, read through ``momentum`` (refused
            without it); None: zeros (a model of one affine map, ``"linear"`` or ``"matrix"``, learns from
            zeros; a deeper one does not: ``"mlp"``'s zero hidden layer passes no gradient, so only its last
            bias moves: pass its initialisation, ``get_registry().inner_model("mlp").init_params(H, f)``,
            or weights of your own). The inner loss
            starts a sequence (``next_token``'s first token has no pair). Continuing from the weights
            a call returned is exact when that call's token count was a multiple of
            ``mini_batch_size`` and its inner loss carries nothing from one call to the next (else
            they come back as :class:`PartialWeights`, which are refused here: see Returns).
        norm_eps: the inner LayerNorm's epsilon (a finite number in (0, 1), not a tensor), checked also when
            ``inner_norm`` is False.
        kernel: ``"auto"``, ``"torch"`` or a registered kernel's name, as in ``TTTLayer``.
        dispatches: a list that receives every fast-path decision ``(path, reason)``.
        needs_double_backward: gradients of gradients will be taken (``create_graph=True``, e.g. a
            meta-learned initialisation): ``kernel="auto"`` then keeps to paths that are twice
            differentiable (the fast training paths are differentiable once only).

    Returns:
        ``(outputs [B, H, T, f], weights)``: ``weights`` after the last token (for a partial last
        mini-batch the weights it read), plus ``"momentum.<name>"`` when momentum is given.
        After a partial last mini-batch these weights cannot be continued exactly (the next call would
        start a new mini-batch where the whole sequence finishes the partial one): they come back as a
        :class:`PartialWeights` (a dict saying how far into its mini-batch the call stopped), which
        ``initial`` refuses; ``dict(weights)`` passes them anyway, exact only where the mini-batch size
        does not change the model (linear attention's: the bare matrix model under the ``dot_product``
        loss). So do the weights of an inner loss that carries something to the next call
        (``next_token``'s last key), which they cannot hold (``dropped_carry``). To split a sequence
        anywhere, use :class:`~innerloop.core.layer.TTTLayer` and its state, which carries the partial
        mini-batch and the loss's carry.
        A NaN or inf in ``q``, ``k``, ``v`` or ``initial`` is not refused (``lr``, ``token_scale`` and the
        gates are). One in ``q`` reaches its own token's output only (a query reads the weights, it does
        not train them); one in ``k`` or ``v`` reaches the outputs of its whole mini-batch, earlier tokens
        included (their masked dual-form products meet it), and all later ones, on every path (the
        chunked delta-rule kernel runs its token loop then, so that a bad token does not reach its
        chunk's earlier outputs), except ``minibatch_gd`` (the primal form), where the mini-batch's
        earlier tokens stay finite.
        Nor are the results checked: an inner loop that diverges on finite input (a learning rate too
        large for its data) returns its inf or NaN outputs and weights as they are (``TTTLayer``, under
        its default ``non_finite='raise'``, refuses them with a diagnosis).
        Differentiable in every tensor argument (twice with ``needs_double_backward``). The scan computes in q's dtype but at least float32
        (bfloat16 / float16 inputs: float32, also under autocast, as in ``TTTLayer``): ``outputs`` come
        back in q's dtype, ``weights`` in the scan's, and ``initial`` may be in either.
    """
    _check_views(q, k, v)
    if dispatches is not None and not isinstance(dispatches, list):
        raise TypeError(f"dispatches must be a list (or None), got {type(dispatches).__name__}")
    mini_batch_size = _check_options(
        mini_batch_size, inner_norm, inner_residual, kernel, norm_eps, needs_double_backward
    )
    inner_norm, inner_residual, needs_double_backward = map(
        bool, (inner_norm, inner_residual, needs_double_backward)
    )
    _check_norm_width(q, inner_norm)
    _check_per_token(q, lr, decay, momentum, decay_log)
    _check_recordable(
        dict(
            q=q,
            k=k,
            v=v,
            lr=lr,
            token_scale=token_scale,
            norm_weight=norm_weight,
            norm_bias=norm_bias,
            decay=decay,
            momentum=momentum,
            initial=initial,
            decay_log=decay_log,
        )
    )
    # below 1, and not rounding to 0 in the scan's dtype (a constant row's LayerNorm would be 0 / 0): checked
    # whatever inner_norm, as TTTLayer checks it, so that a value is valid or not on its own
    check_norm_eps(float(norm_eps), torch.promote_types(q.dtype, torch.float32))
    model, loss, rule = resolve_plugins(
        inner_model,
        inner_loss,
        update_rule,
        kernel,
        q.shape[3],
        (bool(inner_norm), bool(inner_residual)),
        mini_batch_size,
    )
    # The scan runs in q's dtype but at least float32, as TTTLayer's (its state, LayerNorm statistics
    # and gradient sums), with autocast off: every path, torch or kernel, gives the same numbers.
    dtype = torch.promote_types(q.dtype, torch.float32)
    weight, bias = (_cast(t, dtype) for t in _norm_parameters(q, inner_norm, norm_weight, norm_bias))
    tau = _cast(_token_scale(q, rule, token_scale, mini_batch_size), dtype)
    record = None if dispatches is None else (lambda path, reason: dispatches.append((path, reason)))
    task = InnerTask(
        model,
        loss,
        mini_batch_size,
        weight,
        bias,
        float(norm_eps),
        inner_residual,
        kernel,
        needs_double_backward=needs_double_backward,
        on_dispatch=record,
    )
    views = Views(*(_cast(t, dtype) for t in (q, k, v)))
    state = _initial_state(views.query, model, loss, rule, mini_batch_size, initial, q.dtype)
    _check_momentum_is_read(initial, momentum)  # after _initial_state: a rule without momentum says so first
    if q.shape[2] == 0:  # an empty piece: no token read, the weights go on as given (a boundary)
        return _no_token_result(q, k, v, lr, state, tau, momentum)
    gates = [_cast(t, dtype) for t in (lr, tau, decay, momentum)]
    outputs, final = run_scan_without_autocast(
        q.device.type, run_scan, rule, state, task, views, *gates, decay_log=_cast(decay_log, dtype)
    )
    weights = final.scan_weights(tau)
    if final.offset or final.loss_carry:  # weights alone cannot continue: marked for `initial` to refuse
        weights = PartialWeights(weights)
        weights.tokens_into_mini_batch = final.offset
        weights.dropped_carry = tuple(sorted(final.loss_carry))
    return outputs.to(q.dtype), weights


__all__ = ["PartialWeights", "Weights", "scan"]
