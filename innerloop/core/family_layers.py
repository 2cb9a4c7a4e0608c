"""The test-time-regression family as layers people train: linear attention, DeltaNet, Gated DeltaNet
and Titans, each a :class:`~innerloop.core.layer.TTTLayer` configuration.

Every member is a subclass of ``TTTLayer`` that changes only what its paper (or FLA's layer) does
differently: how q, k, v are read from ``x`` (short convolutions, SiLU, feature maps, l2-normalised
q and k, the q scale), its gates (the inner learning rate ``lr``, ``decay`` and ``momentum``, through
:meth:`TTTLayer.inner_learning_rates` and :meth:`TTTLayer.forgetting`, or :meth:`TTTLayer.log_forgetting`
for a forgetting gate computed as a log) and its output norm. The scan
is the layer's: one call of ``run_scan`` per chunk, the same as TTT-Linear's, so decoding one token at
a time with the state equals reading the sequence whole, for every member.

Data through one call (``B`` batch, ``T`` tokens, ``D`` hidden, ``H`` heads, ``f = D / H``)::

    x [B, T, D]
      -> q, k, v = q_proj(x), k_proj(x), v_proj(x)      [B, T, D]
         short causal depthwise convs (kernel 4, no bias; their last inputs carried in the state)
         SiLU, split into heads [B, H, T, f], feature map, l2 norm of q and k, q * f^-0.5
      -> lr, decay, momentum [B, H, T] (the member's gates)
      -> scan (matrix or MLP inner model; dual form at K = 1 for the delta rules, momentum for Titans)
      -> per-head RMSNorm(f) (times swish(g_proj(x)) with the output gate), o_proj -> y [B, T, D]

The FLA layer files named in each class are flash-linear-attention's ``fla/layers/*.py``; the scan
arguments each member's gates become are the maps of ``../shared/ZOO.md`` proven in
``tests/family/test_fla.py``.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from innerloop.core.functional import (
    RMSNorm,
    causal_depthwise_conv,
    gate_sigmoid,
    is_flag,
    overflow_safe_rows,
)
from innerloop.core.layer import (
    PLUGIN_OPTIONS,
    RATE_ENTRIES,
    TTTLayer,
    gates_declared_by,
    hook_pair,
    inner_norm_initial_values,
    is_real,
    layer_hook,
    plugin_label,
    registered_entry,
)
from innerloop.core.protocol import InnerLoss, InnerModel, LossPairs, UpdateRule, Views
from innerloop.core.state import TTTState

ACTIVATIONS = ("silu", "identity")
FEATURE_MAPS = ("identity", "elu", "relu", "elementwise_product")
L2_NORM_EPS = 1e-6  # FLA's l2norm: x / sqrt(sum x^2 + eps), the eps inside the square root
# Gated DeltaNet runs as scan with values v / a (ZOO.md (c)); below this forgetting factor a the
# factor is held at the floor: the layer keeps 1e-4 of the state where FLA keeps less (GatedDeltaNetLayer
# says how far that moves it).
DECAY_FACTOR_FLOOR = 1e-4
# The built-in inner losses for which Gated DeltaNet's map (values v / a, lr = a * beta) is exact
# (value_map_mismatch measures it, for these and any plugin alike; GatedDeltaNetLayer refuses the others).
VALUE_MAP_LOSSES = ("reconstruction", "next_token", "dot_product")
CONV_NAMES = ("q", "k", "v")
DEFAULT_CONV_KERNEL = 4  # FLA's short convs
# The delta rule's step on a unit key k is I - beta k^T k, whose eigenvalue along k is 1 - beta: beta > 2
# expands the state at every visit of k. beta = base_lr * sigmoid(...), so with l2-normalised keys the
# delta members take base_lr <= 2 (2 is FLA's allow_neg_eigval, beta in (0, 2)).
MAX_DELTA_BASE_LR = 2.0
# TTTLayer's options the family's layers do not have: passing one is refused (it would be stored
# and ignored), with what to use instead.
REFUSED_TTT_OPTIONS: dict[str, str] = {
    "use_gate": "use output_gate instead (True: the swish-gated output norm, FLA's use_gate)",
    "share_qk": (
        "the family's layers always project q and k separately (each with its short conv when "
        "short_conv=True); for a shared q/k projection use TTTLayer(share_qk=True)"
    ),
    "rope_theta": (
        "the family's layers have no RoPE (they read positions through their short convs and the "
        "scan's order); drop it, or use TTTLayer for a rotary layer"
    ),
}


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(sum x^2 + 1e-6)`` over the last dimension (FLA's ``l2norm``), in ``x``'s dtype.

    Computed in at least float32 (as FLA's ``l2norm``) and cast back: in float16 the sum of squares
    overflows once it passes 65504 (an RMS of 32 at 64 elements), and ``rsqrt(inf) = 0`` would turn
    ``x`` into zeros, silently. A row whose squares would overflow even there (entries beyond about
    2**31 in float32) is first scaled by a power of two (:func:`overflow_safe_rows`; the eps is
    negligible beside its sum of squares), not normalised to zeros.
    """
    wide = overflow_safe_rows(x.to(torch.promote_types(x.dtype, torch.float32)))
    return (wide * torch.rsqrt(wide.pow(2).sum(dim=-1, keepdim=True) + L2_NORM_EPS)).to(x.dtype)


def _log_forget_factor(logits: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """``-exp(A_log) * softplus(logits + dt_bias)`` ``[B, H, T]`` for ``logits [B, H, T]`` and the
    per-head ``A_log``, ``dt_bias`` ``[H]`` (Gated DeltaNet's and Titans' forgetting gate, as a log),
    in ``logits``' dtype: the gates pass logits in :attr:`~innerloop.core.layer.TTTLayer.scan_dtype`."""
    dtype = logits.dtype
    return -torch.exp(A_log.to(dtype))[:, None] * F.softplus(logits + dt_bias.to(dtype)[:, None])


class HadamardFeatureMap(nn.Module):
    """FLA's ``elementwise_product`` feature map: ``layer1(x) * layer2(x)``, two ``Linear(f, f)`` with bias."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.layer1 = nn.Linear(head_dim, head_dim)
        self.layer2 = nn.Linear(head_dim, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(x) * self.layer2(x)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:  # a numpy string array passes `in`
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@functools.cache
def _valid_options(member: type) -> list[str]:
    """Every keyword ``member`` takes: its own and its bases' up to FamilyLayer, and TTTLayer's (less
    :data:`REFUSED_TTT_OPTIONS`)."""
    names: set[str] = set()
    for cls in member.__mro__:
        if "__init__" in vars(cls) and (cls is TTTLayer or issubclass(cls, FamilyLayer)):
            names |= {
                name
                for name, parameter in inspect.signature(cls.__init__).parameters.items()
                if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
            }
    return sorted(names - set(REFUSED_TTT_OPTIONS))


def _refuse_unimplemented(member: type, options: dict[str, Any], short_conv: bool, conv_kernel: Any) -> None:
    """TypeError for a TTTLayer option the family's layers do not implement (:data:`REFUSED_TTT_OPTIONS`)
    or a keyword no layer takes (named against ``member``, the class the caller built, with the valid
    ones), ValueError for a ``conv_kernel`` without short convs to apply it to: none is silently ignored."""
    layer = member.__name__
    for name, instead in REFUSED_TTT_OPTIONS.items():
        if name in options:
            raise TypeError(
                f"{layer} does not take {name} (got {name}={options[name]!r}): it is a TTTLayer option "
                f"the family's layers do not implement; {instead}"
            )
    unknown = sorted(set(options) - set(_valid_options(member)))
    if unknown:
        raise TypeError(
            f"{layer} got unexpected keyword arguments {unknown}; valid: {_valid_options(member)}"
        )
    if not short_conv and conv_kernel != DEFAULT_CONV_KERNEL:
        raise ValueError(
            f"{layer} got conv_kernel={conv_kernel!r} with short_conv=False: conv_kernel is the short "
            "convs' kernel size and this layer has none; drop conv_kernel, or turn short_conv on where "
            "the layer takes it (DeltaNet, Gated DeltaNet, Titans)"
        )


def _same_value(given: Any, fixed: Any) -> bool:
    """Whether ``given`` is the value ``fixed`` (``np.int64(1)`` is 1; ``1`` is not ``True``)."""
    if isinstance(given, bool) or isinstance(fixed, bool):
        return given is fixed
    try:
        return bool(given == fixed)
    except (TypeError, ValueError, RuntimeError):  # e.g. a tensor of several values
        return False


def _is_registered_as(kind: str, given: Any, name: Any) -> bool:
    """Whether ``given`` (an argument of ``kind``) is the plugin object registered under ``name``, or a
    copy of it (:func:`~innerloop.core.layer.registered_entry`): the registered ``dual_form`` object
    passed where a member fixes ``update_rule="dual_form"`` is that rule, as its name is."""
    if kind not in PLUGIN_OPTIONS or isinstance(given, str) or not isinstance(name, str):
        return False
    entry = registered_entry(kind, given)
    return entry is not None and entry.name == name


def with_fixed_options(
    layer: str, options: dict[str, Any], fixed: dict[str, tuple[Any, str]]
) -> dict[str, Any]:
    """``options`` plus the arguments the member ``layer`` fixes (``fixed``: name -> (value, why)).

    Passing a fixed argument with its value is allowed; another value is refused with a ``ValueError``
    that says the member fixes it, to which value and why (instead of Python's "got multiple values").
    """
    for name, (value, why) in fixed.items():
        if (
            name in options
            and not _same_value(options[name], value)
            and not _is_registered_as(name, options[name], value)
        ):
            given = options[name]
            shown = (
                f"the {plugin_label(name, given)}"
                if name in PLUGIN_OPTIONS and not isinstance(given, str)
                else repr(given)
            )
            raise ValueError(f"{layer} fixes {name}={value!r}, got {name}={shown}: {why}; drop {name}")
    return {**options, **{name: value for name, (value, _) in fixed.items()}}


def _log_uniform_dt(num_heads: int) -> torch.Tensor:
    """``softplus^-1(dt)`` with ``dt`` log-uniform in [1e-3, 1e-1] (FLA Gated DeltaNet's ``dt_bias``)."""
    dt = torch.exp(torch.rand(num_heads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    dt = dt.clamp_min(1e-4)
    return dt + torch.log(-torch.expm1(-dt))


def _forget_gate_draws(num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FLA's initial forgetting gate, drawn per head: ``A_log = log U(0, 16)`` and ``dt_bias`` (a
    log-uniform ``dt``, :func:`_log_uniform_dt`), in this order (the built and the reset layer draw alike)."""
    return torch.log(torch.empty(num_heads).uniform_(0, 16)), _log_uniform_dt(num_heads)


def _redraw_forget_gate(layer: nn.Module) -> None:
    """``layer.A_log`` and ``layer.dt_bias`` drawn again as built (:func:`_forget_gate_draws`), in place."""
    for parameter, value in zip(
        (layer.A_log, layer.dt_bias), _forget_gate_draws(layer.num_heads), strict=True
    ):
        parameter.copy_(value)


def _valid_weights(pairs: LossPairs, shape: tuple[int, ...]) -> torch.Tensor:
    """``pairs.valid`` as ``[B, H, T]`` weights (None: every pair valid, weight 1)."""
    if pairs.valid is None:
        return pairs.inputs.new_ones(shape[:3])
    return torch.broadcast_to(pairs.valid.to(pairs.inputs.dtype), shape[:3])


def value_map_mismatch(loss: InnerLoss, head_dim: int) -> str | None:
    """None if Gated DeltaNet's map is exact for ``loss``, else what breaks it (measured in float64 on
    random views of 2 sequences, 2 heads and 5 tokens at ``head_dim``, per-token ``a`` in [0.1, 1)).

    Gated DeltaNet decays before its step, ``S_t = a S - beta grad L(a S; v)``, and runs as scan's rule
    with values ``v / a`` and ``lr = a * beta`` at the undecayed ``S``, which is the same step exactly when
    ``grad L(a S; v) = a grad L(S; v / a)``: the loss's targets are the values of their own token as given
    (``pairs`` of values ``v / a`` gives targets ``/ a``, the same inputs and valid), and its gradient
    w.r.t. the prediction is homogeneous of degree 1 in the prediction and target together
    (``token_loss_grad(a p, y) = a token_loss_grad(p, y / a)``). The built-in ``reconstruction``,
    ``next_token`` and ``dot_product`` are such losses; a cosine or Huber loss, or targets ``v - k``, are not.
    """
    generator = torch.Generator().manual_seed(0)
    shape = (2, 2, 5, head_dim)
    query, key, value, prediction = (
        torch.randn(shape, generator=generator, dtype=torch.float64, device="cpu") for _ in range(4)
    )
    a = 0.1 + 0.9 * torch.rand(shape[:3], generator=generator, dtype=torch.float64, device="cpu")[..., None]
    try:
        carry = loss.init_carry(shape[0], shape[1], head_dim, query)
        plain = loss.pairs(Views(query, key, value), carry)
        scaled = loss.pairs(Views(query, key, value / a), carry)
        gradients = (
            loss.token_loss_grad(a * prediction, plain.targets),
            a * loss.token_loss_grad(prediction, plain.targets / a),
        )
    except Exception as error:  # noqa: BLE001 (a plugin's own failure, reported as the reason)
        return f"it failed on float64 views: {type(error).__name__}: {error}"
    checks = {
        "its targets are not the values of their own token as given (pairs of v / a gave other targets than its "
        "targets of v divided by a)": (scaled.targets, plain.targets / a),
        "its inputs read the values": (scaled.inputs, plain.inputs),
        "its valid weights read the values (pairs of v / a gave other valid weights than of v)": (
            _valid_weights(scaled, shape),
            _valid_weights(plain, shape),
        ),
        "its gradient is not of degree 1 in the prediction and target (token_loss_grad(a p, y) differs from "
        "a * token_loss_grad(p, y / a))": gradients,
    }
    for reason, (got, wanted) in checks.items():
        if got.shape != wanted.shape or not torch.allclose(got, wanted, rtol=1e-9, atol=1e-12):
            return reason
    return None


class FamilyLayer(TTTLayer):
    """The common reading of the family's layers (FLA's layer recipe); the members are its subclasses.

    Args (beyond :class:`TTTLayer`'s ``hidden_size``, ``num_heads``, plugins, ``mini_batch_size``,
    ``base_lr``, ``inner_norm``, ``inner_residual``, ``norm_eps``, ``kernel``, ``non_finite``,
    ``needs_double_backward``, ``inference_chunk_size``):
        short_conv: causal depthwise convs (no bias) on the q, k and v projections.
        conv_kernel: their kernel size (FLA: 4).
        qk_activation: ``"silu"`` or ``"identity"`` on q and k after the convs.
        value_activation: the same for v.
        feature_map: on q and k per head: ``"identity"``, ``"elu"`` (elu + 1), ``"relu"`` or
            ``"elementwise_product"`` (FLA linear attention's default, learnable).
        qk_l2norm: l2-normalise q and k per head.
        scale_query: multiply q by ``f ** -0.5`` (FLA's op default).
        output_gate: the output norm is FLA's ``FusedRMSNormGated``: ``RMSNorm(o) * swish(g_proj(x))``.

    There is no RoPE: the members read positions through their convolutions and the scan's order.
    TTTLayer's ``use_gate``, ``share_qk`` and ``rope_theta`` are refused with a ``TypeError`` that
    says what to use instead (:data:`REFUSED_TTT_OPTIONS`; the gate is ``output_gate``), and so is a
    ``conv_kernel`` other than 4 without short convs (``ValueError``): none would have any effect.
    Each member fixes some arguments (:attr:`fixed_options`: the value and why); another value for one
    of them is refused with a ``ValueError`` that says so.
    """

    uses_rope = False  # so any head size is valid
    conv_kernel_needs_share_qk = False  # its short convs take conv_kernel (checked by _refuse_unimplemented)
    # TTTLayer's, plus the options the family's modules are made from (short convs, feature maps, gate)
    # and those that decide how x is read into keys and values (the state's space; some fixed by a member)
    built_options = (
        *TTTLayer.built_options,
        "short_conv",
        "feature_map",
        "output_gate",
        "qk_activation",
        "value_activation",
        "qk_l2norm",
        "scale_query",
    )
    # name -> (value, why): the arguments a member sets itself (with_fixed_options); none here
    fixed_options: ClassVar[dict[str, tuple[Any, str]]] = {}

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        inner_model: str | InnerModel = "matrix",
        inner_loss: str | InnerLoss = "reconstruction",
        update_rule: str | UpdateRule = "dual_form",
        mini_batch_size: int = 1,
        base_lr: float = 1.0,
        *,
        inner_norm: bool = False,
        inner_residual: bool = False,
        short_conv: bool = True,
        conv_kernel: int = DEFAULT_CONV_KERNEL,
        qk_activation: str = "silu",
        value_activation: str = "silu",
        feature_map: str = "identity",
        qk_l2norm: bool = True,
        scale_query: bool = True,
        output_gate: bool = False,
        **options: Any,
    ) -> None:
        switches = {
            "short_conv": short_conv,
            "qk_l2norm": qk_l2norm,
            "scale_query": scale_query,
            "output_gate": output_gate,
        }
        for name, value in switches.items():
            if not is_flag(value):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        _refuse_unimplemented(type(self), options, short_conv, conv_kernel)
        _check_choice("qk_activation", qk_activation, ACTIVATIONS)
        _check_choice("value_activation", value_activation, ACTIVATIONS)
        _check_choice("feature_map", feature_map, FEATURE_MAPS)
        # Read by _build_projections, which TTTLayer.__init__ calls (plain attributes may be set
        # before nn.Module.__init__).
        short_conv, qk_l2norm, scale_query, output_gate = map(bool, switches.values())  # numpy's as Python's
        self.short_conv, self.qk_activation, self.value_activation = (
            short_conv,
            qk_activation,
            value_activation,
        )
        self.feature_map, self.qk_l2norm, self.scale_query = feature_map, qk_l2norm, scale_query
        self.output_gate = output_gate
        super().__init__(
            hidden_size,
            num_heads,
            inner_model=inner_model,
            inner_loss=inner_loss,
            update_rule=update_rule,
            mini_batch_size=mini_batch_size,
            base_lr=base_lr,
            conv_kernel=conv_kernel,
            inner_norm=inner_norm,
            inner_residual=inner_residual,
            **options,
        )

    # ------------------------------------------------------------------------------------------
    # Parameters
    # ------------------------------------------------------------------------------------------

    def _build_projections(self) -> None:
        """q, k, v, o projections (bias-free), the short convs, the feature maps, the output gate and
        the member's gates (:meth:`_build_gates`)."""
        hidden_size = self.hidden_size
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if self.short_conv:
            for name in CONV_NAMES:
                conv = nn.Conv1d(hidden_size, hidden_size, self.conv_kernel, groups=hidden_size, bias=False)
                setattr(self, f"{name}_conv", conv)
        if self.feature_map == "elementwise_product":
            self.q_feature_map = HadamardFeatureMap(self.head_dim)
            self.k_feature_map = HadamardFeatureMap(self.head_dim)
        if self.output_gate:
            self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self._build_gates()

    def _build_gates(self) -> None:
        """The member's gate parameters (none here)."""

    def _build_inner_parameters(self) -> None:
        """The inner LayerNorm (when on), the initial inner weights (learned; the matrix model starts
        at zero, FLA's empty state), tau = 1, and the per-head output RMSNorm (``post_norm``)."""
        if self.inner_norm:
            norm = inner_norm_initial_values(self.num_heads, self.head_dim)
            self.ttt_norm_weight, self.ttt_norm_bias = map(nn.Parameter, norm)
        self.initial_params = nn.ParameterDict(  # checked at this layer's shape, in its dtype (as TTTLayer's)
            {k: nn.Parameter(v) for k, v in self._checked_init_params(self.num_heads, self.head_dim).items()}
        )
        for name, table in self.derived_buffers().items():  # token_scale
            self.register_buffer(name, table, persistent=False)
        self.post_norm = RMSNorm(self.head_dim, eps=self.norm_eps)

    def reset_parameters(self) -> None:
        """Initialise this layer's own parameters again as its constructor does (the inner LayerNorm, the
        initial inner weights, the member's gates), in place, and make its derived tables again (see
        :meth:`TTTLayer.reset_parameters`)."""
        with torch.no_grad():
            self._reset_inner_weights()
            self._reset_gates()

    def _reset_gates(self) -> None:
        """The member's gate parameters as :meth:`_build_gates` draws them (none here)."""

    def derived_buffers(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The non-persistent buffer made from the options: ``token_scale``, tau = 1 for every token
        (exact in any dtype; ``dtype`` as :meth:`TTTLayer.derived_buffers`)."""
        return {"token_scale": torch.ones(self.mini_batch_size, dtype=dtype)}

    def _head_gate(self, x: torch.Tensor, projection: nn.Linear) -> torch.Tensor:
        """``projection(x)`` for ``x [B, T, D]`` as ``[B, H, T]`` (one logit per head and token), in
        :attr:`scan_dtype`.

        The projection runs in the weights' (or autocast's) dtype, as FLA's; the gate made of the logit
        (sigmoid, softplus, exp) in at least float32, as everything else that writes the state: in
        bfloat16 a retention ``1 - decay`` below 2^-9 is exactly 0, and a step ``beta`` near 1 is 1.
        """
        # contiguous: compiled with dynamic shapes, AOTAutograd traced a transposed view's gradient as
        # transposed too, and the view in its backward failed on the eager scan's contiguous gradient
        return projection(x).transpose(1, 2).to(self.scan_dtype).contiguous()

    # ------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------

    def init_state(self, batch_size: int, like: torch.Tensor | None = None) -> TTTState:
        """TTTLayer's state plus the short convs' histories (zeros: nothing before the sequence)."""
        batch_size, reference = self.state_reference(batch_size, like)
        state = super().init_state(batch_size, like)
        if not self.short_conv:
            return state
        zeros = reference.new_zeros(batch_size, self.conv_kernel - 1, self.hidden_size)
        return replace(state, conv_history={name: zeros for name in CONV_NAMES})

    def _check_conv_history(self, state: TTTState, batch_size: int) -> None:
        wanted = (batch_size, self.conv_kernel - 1, self.hidden_size)
        expected = {name: wanted for name in CONV_NAMES} if self.short_conv else {}
        given = {name: tuple(t.shape) for name, t in state.conv_history.items()}
        if given != expected:
            raise ValueError(
                f"state.conv_history must be {expected} for this layer (short_conv={self.short_conv}, "
                f"conv_kernel={self.conv_kernel}), got {given}: pass the state this layer returned, or None"
            )

    # ------------------------------------------------------------------------------------------
    # Reading a chunk
    # ------------------------------------------------------------------------------------------

    def _read(self, x: torch.Tensor, state: TTTState) -> tuple[Views, torch.Tensor, torch.Tensor, dict]:
        """``(views [B, H, T, f] each, lr [B, H, T], tau [K], new conv history)``."""
        batch, tokens, _ = x.shape
        conv_history = dict(state.conv_history)
        projected = {"q": self.q_proj(x), "k": self.k_proj(x), "v": self.v_proj(x)}  # [B, T, D] each
        if self.short_conv:
            for name in CONV_NAMES:
                conv = getattr(self, f"{name}_conv")
                projected[name], conv_history[name] = causal_depthwise_conv(
                    projected[name], conv.weight, None, conv_history[name]
                )

        def heads(t: torch.Tensor, activation: str) -> torch.Tensor:  # [B, T, D] -> [B, H, T, f]
            t = F.silu(t) if activation == "silu" else t
            return t.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

        query, key = heads(projected["q"], self.qk_activation), heads(projected["k"], self.qk_activation)
        value = heads(projected["v"], self.value_activation)
        query, key = self._feature_map(query, "q"), self._feature_map(key, "k")
        if self.qk_l2norm:
            query, key = l2_normalize(query), l2_normalize(key)
        if self.scale_query:
            query = query * self.head_dim**-0.5
        lr, tau = hook_pair(
            self, "inner_learning_rates", RATE_ENTRIES, layer_hook(self, "inner_learning_rates")(x)
        )
        return Views(query, key, value), lr, tau, conv_history

    def state_layer_label(self) -> str:
        """The class and the options that decide the spaces of the keys and values a state regresses
        (a state built over l2-normalised keys is no state for raw ones); the query's scale, which only
        reads the state, is not among them."""
        return (
            f"{type(self).__qualname__}(qk_activation={self.qk_activation!r}, feature_map={self.feature_map!r}, "
            f"qk_l2norm={self.qk_l2norm}, value_activation={self.value_activation!r})"
        )

    def _feature_map(self, t: torch.Tensor, which: str) -> torch.Tensor:
        if self.feature_map == "elu":
            return F.elu(t) + 1.0
        if self.feature_map == "relu":
            return F.relu(t)
        if self.feature_map == "elementwise_product":
            return getattr(self, f"{which}_feature_map")(t)
        return t

    def inner_learning_rates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``lr [B, H, T] = base_lr`` in :attr:`scan_dtype` (the member's gates override this) and
        ``tau [K] = 1``."""
        batch, tokens, _ = x.shape
        lr = x.new_full((batch, self.num_heads, tokens), self.base_lr, dtype=self.scan_dtype)
        return lr, self.token_scale

    def _output(self, x: torch.Tensor, inner_out: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm (times ``swish(g_proj(x))`` with the output gate), merged heads, o_proj."""
        batch, tokens, _ = x.shape
        out = self.post_norm(inner_out.transpose(1, 2))  # [B, T, H, f]
        out = out.reshape(batch, tokens, self.hidden_size)
        if self.output_gate:
            out = out * F.silu(self.g_proj(x))
        return self.o_proj(out)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, inner_model={self.inner_model.name!r}, "
            f"inner_loss={self.inner_loss.name!r}, update_rule={self.update_rule.name!r}, "
            f"mini_batch_size={self.mini_batch_size}, base_lr={self.base_lr}, short_conv={self.short_conv}, "
            f"feature_map={self.feature_map!r}, qk_l2norm={self.qk_l2norm}, output_gate={self.output_gate}"
        )


class LinearAttentionLayer(FamilyLayer):
    """Linear attention, following FLA's ``fla/layers/linear_attn.py`` (its defaults): bias-free
    q, k, v projections, no short conv and no activation, the learnable ``elementwise_product``
    feature map on q and k, q scaled by ``f ** -0.5``, ``S_t = S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``,
    a per-head RMSNorm, o_proj.

    As scan: the matrix model under the ``dot_product`` inner loss (``plugins/losses/dot_product.py``) with ``lr = 1`` (``base_lr``),
    for which every mini-batch size is the same model (``mini_batch_size`` only sets the dual form's
    block size; 16 by default). The state starts at zero, as FLA's, and that start is learned.
    """

    fixed_options: ClassVar[dict[str, tuple[Any, str]]] = {
        "inner_model": ("matrix", "linear attention's state is one matrix S, read as o = q S"),
        "inner_loss": (
            "dot_product",
            "S_t = S_{t-1} + k_t^T v_t is the dual form under the dot_product loss",
        ),
        "update_rule": ("dual_form", "S_t = S_{t-1} + k_t^T v_t is the dual form under the dot_product loss"),
        "short_conv": (False, "FLA's linear attention has no short convs (DeltaNetLayer has them)"),
        "qk_activation": ("identity", "FLA's linear attention shapes q and k by feature_map only"),
        "value_activation": ("identity", "FLA's linear attention uses v as projected"),
        "qk_l2norm": (False, "FLA's linear attention shapes q and k by feature_map only"),
        "inner_norm": (
            False,
            "linear attention reads o = q S; with the inner LayerNorm the update depends on S, so the "
            "layer is no longer linear attention and mini_batch_size changes the model (FamilyLayer takes it)",
        ),
        "inner_residual": (
            False,
            "linear attention reads o = q S; the inner residual would add q (FamilyLayer takes it)",
        ),
    }

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mini_batch_size: int = 16,
        *,
        feature_map: str = "elementwise_product",
        **options: Any,
    ) -> None:
        super().__init__(
            hidden_size,
            num_heads,
            mini_batch_size=mini_batch_size,
            feature_map=feature_map,
            **with_fixed_options(type(self).__name__, options, self.fixed_options),
        )


class DeltaNetLayer(FamilyLayer):
    """DeltaNet, following FLA's ``fla/layers/delta_net.py`` (its defaults): short convs (kernel 4,
    no bias) on q, k, v with SiLU, l2-normalised q and k, q scaled by ``f ** -0.5``,
    ``beta = sigmoid(b_proj(x))`` per head, ``S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1})``,
    a per-head RMSNorm (``output_gate=True``: FLA's ``use_gate``, a swish gate), o_proj.

    As scan: the matrix model, reconstruction loss, dual form at ``K = 1``, ``lr = base_lr * beta``.
    """

    fixed_options: ClassVar[dict[str, tuple[Any, str]]] = {
        "inner_model": ("matrix", "the delta rule's state is one matrix S, read as o = q S"),
        "update_rule": ("dual_form", "the delta rule is the dual form at mini_batch_size=1"),
        "mini_batch_size": (
            1,
            "the delta rule takes one step per token; mini-batches of K > 1 tokens are mini-batch "
            "gradient descent, another rule (FamilyLayer or TTTLayer take it)",
        ),
    }

    def __init__(self, hidden_size: int, num_heads: int, **options: Any) -> None:
        options.setdefault("output_gate", False)
        super().__init__(
            hidden_size, num_heads, **with_fixed_options(type(self).__name__, options, self.fixed_options)
        )

    def __setattr__(self, name: str, value: Any) -> None:
        """TTTLayer's, refusing a ``base_lr`` above :data:`MAX_DELTA_BASE_LR` with l2-normalised keys
        (at construction and on a built layer alike: ``base_lr`` is a call option)."""
        if (
            name == "base_lr"
            and is_real(value)
            and value > MAX_DELTA_BASE_LR
            and self.__dict__.get("qk_l2norm")
        ):
            raise ValueError(
                f"{type(self).__name__} got base_lr={float(value)!r}; it must be <= {MAX_DELTA_BASE_LR:g} with "
                "qk_l2norm=True: beta = base_lr * sigmoid(b_proj(x)), and on a unit key the delta step "
                "I - beta k^T k scales the state along k by 1 - beta, which grows it for beta > 2 (FLA's "
                "allow_neg_eigval is base_lr=2)"
            )
        super().__setattr__(name, value)

    def _build_gates(self) -> None:
        self.b_proj = nn.Linear(self.hidden_size, self.num_heads, bias=False)

    def beta(self, x: torch.Tensor) -> torch.Tensor:
        """``sigmoid(b_proj(x))`` ``[B, H, T]``, the delta rule's step, in :attr:`scan_dtype`."""
        return gate_sigmoid(self._head_gate(x, self.b_proj))

    def inner_learning_rates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base_lr * self.beta(x), self.token_scale


class GatedDeltaNetLayer(DeltaNetLayer):
    """Gated DeltaNet, following FLA's ``fla/layers/gated_deltanet.py``: DeltaNet's reading plus the
    forgetting gate ``g = -exp(A_log) * softplus(a_proj(x) + dt_bias)`` (per head; ``A_log = log U(0, 16)``,
    ``dt_bias = softplus^-1(dt)`` with ``dt`` log-uniform in [1e-3, 1e-1], FLA's init), ``a = exp(g)``,
    ``S' = a S_{t-1}``, ``S_t = S' + beta_t k_t^T (v_t - k_t S')``, and the gated output norm
    ``RMSNorm(o) * swish(g_proj(x))`` (FLA's default ``use_gate=True``).

    FLA decays before the gradient; scan takes the gradient at the undecayed weights. The exact map
    (``../shared/ZOO.md`` (c)): ``decay = 1 - a``, ``lr = a * beta`` and values ``v / a``. ``a`` is held
    at ``DECAY_FACTOR_FLOOR`` (1e-4) or above: a token whose ``a`` is below it keeps ``(1e-4 - a)(I - beta
    k^T k) S_{t-1}`` more of the old state than FLA's, so the state stays within ``sum_s (1e-4 - a_s)
    ||S_{s-1}||`` of FLA's, over those tokens (Frobenius norms, ``base_lr <= 1``; FLA's states on the
    right). How far the outputs move depends on the state's size: measured in float64 at head width 8 over
    64 tokens with 30-45% of the gates below the floor, 4e-4 to 5e-4 (relative RMS) from the zero start and
    1e-3 to 3e-3 from a start of unit-normal entries. The floor keeps ``v / a`` and its gradient finite.
    The scan takes the gate as ``log a`` (:meth:`log_forgetting`), so the chunked kernel (``kernels/delta_chunk``)
    trains on any gate, and ``a`` keeps float32's precision however small. The map holds for the bare matrix model only:
    ``inner_norm`` and ``inner_residual`` are fixed to False (refused when True), and for the inner losses
    that read the values as given (:data:`VALUE_MAP_LOSSES`; any other is refused).

    ``base_lr=0`` turns test-time training off altogether: no step and no decay, so the state stays
    where it starts (FLA would still decay it; with ``base_lr`` above 0, however small, it decays).

    The gate is :meth:`log_decay_factor`: the values, the step and the decay all read it, so a subclass
    changes the gate by overriding it; an override of :meth:`forgetting` or :meth:`log_forgetting`
    changes the decay alone (the scan takes it) and leaves ``v / a`` and ``a * beta`` as they were.
    """

    fixed_options: ClassVar[dict[str, tuple[Any, str]]] = {
        **DeltaNetLayer.fixed_options,
        **{
            name: (
                False,
                "Gated DeltaNet decays before its gradient step and runs as scan's rule through lr = a * beta and "
                f"values v / a, which equals it only without the inner {what}; with it the layer "
                "would compute neither rule (DeltaNetLayer and TitansLayer take it)",
            )
            for name, what in (("inner_norm", "LayerNorm"), ("inner_residual", "residual"))
        },
    }

    def __init__(self, hidden_size: int, num_heads: int, **options: Any) -> None:
        options.setdefault("output_gate", True)
        super().__init__(hidden_size, num_heads, **options)
        loss = self.inner_loss
        mismatch = value_map_mismatch(loss, self.head_dim)
        if mismatch is not None:
            raise ValueError(
                f"GatedDeltaNetLayer got inner_loss={loss.name!r}, the {plugin_label('inner_loss', loss)}: "
                f"{mismatch}. It decays before its gradient step and runs as scan's rule through lr = a * "
                "beta and values v / a, which equals that only for a loss whose targets are the values as "
                "given and whose gradient is of degree 1 in prediction and target (value_map_mismatch); valid: "
                f"such a loss, as the built-in {list(VALUE_MAP_LOSSES)} (DeltaNetLayer takes any loss)"
            )

    def _build_gates(self) -> None:
        super()._build_gates()
        self.a_proj = nn.Linear(self.hidden_size, self.num_heads, bias=False)
        self.A_log, self.dt_bias = map(nn.Parameter, _forget_gate_draws(self.num_heads))

    def _reset_gates(self) -> None:
        super()._reset_gates()
        _redraw_forget_gate(self)

    def log_decay_factor(self, x: torch.Tensor) -> torch.Tensor:
        """``log a = -exp(A_log) * softplus(a_proj(x) + dt_bias)`` ``[B, H, T]``, at least ``log`` of the floor.

        In :attr:`scan_dtype` (at least float32, as FLA's gate), whatever the weights' dtype: a
        bfloat16 ``a`` near 1 is 1 or ``1 - 2^-8``, which would turn a decay of 1e-3 into 0 or 4e-3.
        """
        log_a = _log_forget_factor(self._head_gate(x, self.a_proj), self.A_log, self.dt_bias)
        return log_a.clamp_min(math.log(DECAY_FACTOR_FLOOR))

    def decay_factor(self, x: torch.Tensor) -> torch.Tensor:
        """``a = exp(log a)`` ``[B, H, T]`` (:meth:`log_decay_factor`), at least the floor."""
        log_a = self.log_decay_factor(x)
        return torch.where(
            log_a > math.log(DECAY_FACTOR_FLOOR), log_a.exp(), DECAY_FACTOR_FLOOR
        )  # not exp(log)

    def _read(self, x: torch.Tensor, state: TTTState) -> tuple[Views, torch.Tensor, torch.Tensor, dict]:
        views, beta_lr, tau, conv_history = super()._read(x, state)
        a = self.decay_factor(x)  # [B, H, T]
        if not isinstance(a, torch.Tensor) or a.shape != views.value.shape[:3]:
            got = list(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            # an override's [B, T, H] would broadcast into v / a, or fail there unnamed: name the override
            own = type(self).decay_factor is GatedDeltaNetLayer.decay_factor
            given = "log_decay_factor(x) must give log a" if own else "decay_factor(x) must give a"
            raise ValueError(
                f"{type(self).__name__}.{given} of shape [B, H, T] = {list(views.value.shape[:3])}, got {got}"
            )
        views = Views(views.query, views.key, views.value / a[..., None])
        return views, a * beta_lr, tau, conv_history

    def declared_gates(self) -> tuple[bool, bool] | None:
        """A forgetting gate while test-time training is on (:meth:`log_forgetting`), no momentum."""
        if gates_declared_by(self, GatedDeltaNetLayer):
            return self.base_lr != 0, False
        return super().declared_gates()

    def log_forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor, None] | None:
        """``(log a, None)``: the forgetting gate as its log (:meth:`log_decay_factor`), which the scan takes
        (``decay_log``; ``1 - decay`` of a float32 decay near 1 holds a small ``a`` only to ``eps / a``
        relative) and from which :meth:`forgetting` gives ``decay = 1 - a``; None while test-time training
        is off (``base_lr == 0``; one token a step, its states hold no decay product to continue)."""
        if self.base_lr == 0:
            return None
        return self.log_decay_factor(x), None


class TitansLayer(FamilyLayer):
    """Titans (arXiv 2501.00663): the momentum rule with forgetting on a linear (``"matrix"``) or MLP
    (``"mlp"``, the paper's deep memory) memory, inside an inner LayerNorm and residual.

    FLA has no Titans layer (only the ops ``fla/ops/titans``, which this rule equals); the reading is
    the paper's (short convs with SiLU on q, k, v, l2-normalised q and k) in FLA's form, as
    ``fla/layers/gated_deltanet.py`` builds it, with FLA-style gates on the Titans rule:

    - ``theta`` (the step): ``lr = base_lr * sigmoid(theta_proj(x))`` per head and token;
    - ``alpha`` (forgetting): ``decay = 1 - exp(-exp(A_log) * softplus(a_proj(x) + dt_bias))``, Gated
      DeltaNet's parametrisation and init;
    - ``eta`` (surprise momentum): ``momentum = sigmoid(eta_proj(x))``.

    As scan: ``update_rule="momentum"``, ``mini_batch_size`` tokens per gradient point (16; the paper
    trains with the gradient at the chunk start), ``inner_norm`` and ``inner_residual`` on. q is not
    scaled (FLA's Titans op). Output: gated per-head RMSNorm, o_proj (the paper's norm + gate).

    ``base_lr=0`` turns test-time training off altogether: no step, no decay and no momentum, so the
    memory stays where it starts (with ``base_lr`` above 0, however small, it decays).
    """

    fixed_options: ClassVar[dict[str, tuple[Any, str]]] = {
        "update_rule": ("momentum", "Titans is the momentum rule with forgetting"),
        "inner_norm": (True, "Titans' memory is read through the inner LayerNorm (FLA's Titans ops)"),
        "inner_residual": (True, "Titans' memory is read with the inner residual (FLA's Titans ops)"),
        "scale_query": (False, "FLA's Titans op does not scale q"),
    }

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        inner_model: str | InnerModel = "matrix",
        mini_batch_size: int = 16,
        **options: Any,
    ) -> None:
        options.setdefault("output_gate", True)
        super().__init__(
            hidden_size,
            num_heads,
            inner_model=inner_model,
            mini_batch_size=mini_batch_size,
            **with_fixed_options(type(self).__name__, options, self.fixed_options),
        )

    def _build_gates(self) -> None:
        hidden_size, num_heads = self.hidden_size, self.num_heads
        self.theta_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.eta_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log, self.dt_bias = map(nn.Parameter, _forget_gate_draws(num_heads))

    def _reset_gates(self) -> None:
        super()._reset_gates()
        _redraw_forget_gate(self)

    def inner_learning_rates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``lr = base_lr * sigmoid(theta_proj(x))`` ``[B, H, T]`` in :attr:`scan_dtype`, and ``tau [K] = 1``."""
        return self.base_lr * gate_sigmoid(self._head_gate(x, self.theta_proj)), self.token_scale

    def declared_gates(self) -> tuple[bool, bool] | None:
        """Forgetting and momentum, with test-time training on or off (then frozen: zeros, not none)."""
        if gates_declared_by(self, TitansLayer):
            return True, True
        return super().declared_gates()

    def log_forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(log(1 - alpha), eta)`` ``[B, H, T]``: the forgetting gate as its log (:meth:`log_decay_factor`),
        which the scan takes (its decay products then in log space, where ``1 - decay`` of a float32 decay
        near 1 holds ``1 - alpha`` only to ``eps / (1 - alpha)`` relative under strong forgetting), and the
        momentum; None while test-time training is off (:meth:`forgetting` gives the frozen gates then)."""
        if self.base_lr == 0:
            return None
        # eta first: x's gradient sums its parts in the same order as before (bitwise)
        momentum = gate_sigmoid(self._head_gate(x, self.eta_proj))
        return self.log_decay_factor(x), momentum

    def forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(decay, momentum)`` ``[B, H, T]``: alpha (``1 - exp`` of :meth:`log_forgetting`'s log) and eta;
        0 each while ``base_lr == 0``: the memory is frozen (:func:`frozen_gates`).

        In :attr:`scan_dtype` (at least float32), whatever the weights' dtype: in bfloat16 a retention
        ``1 - decay`` below 2^-9 is exactly 0, which wipes the memory where it should keep a trace, and
        the inner LayerNorm (scale-invariant) reads a trace as well as the whole memory.
        """
        if self.base_lr == 0:
            return frozen_gates(self, x)
        return super().forgetting(x)

    def log_decay_factor(self, x: torch.Tensor) -> torch.Tensor:
        """``log(1 - alpha) = -exp(A_log) * softplus(a_proj(x) + dt_bias)`` ``[B, H, T]``: the retention's
        log, in :attr:`scan_dtype` (no floor: ``-inf`` is a full reset)."""
        return _log_forget_factor(self._head_gate(x, self.a_proj), self.A_log, self.dt_bias)


def frozen_gates(layer: TTTLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero decay and zero momentum ``[B, H, T]`` in the layer's :attr:`~TTTLayer.scan_dtype`, for ``x [B,
    T, D]``: the gates of a layer that forgets while its test-time training is off (``base_lr == 0``,
    ``no_test_time_training``), which keep its memory as it is. Zeros rather than no gates, so that its
    states are those of a layer that forgets either way: one from inside a mini-batch (which holds the
    decay product and momentum) continues with test-time training off or on, as does one made with it off."""
    zeros = x.new_zeros(x.shape[0], layer.num_heads, x.shape[1], dtype=layer.scan_dtype)
    return zeros, zeros


FAMILY_LAYERS: dict[str, type[FamilyLayer]] = {
    "linear_attention": LinearAttentionLayer,
    "deltanet": DeltaNetLayer,
    "gated_deltanet": GatedDeltaNetLayer,
    "titans": TitansLayer,
}
"""The trainable members, by their ``model.mixer`` name."""

__all__ = [
    "FAMILY_LAYERS",
    "DeltaNetLayer",
    "FamilyLayer",
    "GatedDeltaNetLayer",
    "LinearAttentionLayer",
    "TitansLayer",
    "l2_normalize",
    "with_fixed_options",
]
