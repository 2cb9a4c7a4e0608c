"""The recurrent state of a TTT layer: its decoding cache.

A TTT layer is an RNN. Its state after reading ``position`` tokens is:

- ``params``: the inner weights at the start of the current mini-batch, ``[B, H, *shape]``;
- ``pending``: the lr-weighted gradient sums ``sum_j lr_j * grad_j`` of the tokens already read in
  the current mini-batch, same shapes as ``params``; zero at a mini-batch boundary (a layer and
  :meth:`TTTState.from_tensors` refuse nonzero ones there; ``ops.scan`` reads them as zero);
- ``loss_carry``: what the inner loss needs from earlier tokens (e.g. the previous key);
- ``conv_history``: the last ``k - 1`` inputs of the causal convolutions (share_qk);
- ``momentum``: the ``momentum`` rule's surprise momentum ``S`` per weight (same shapes as
  ``params``), carried across mini-batches; empty when no momentum was given;
- ``decay``: ``{"product": [B, H]}``, the product of the decays (forgetting) of the tokens already
  read in the current mini-batch; empty when it is 1 (at a boundary, or without decay).

The weights a token at mini-batch offset ``i`` sees are ``product * params - tau_i * pending``
(after adding its own step; without decay ``params - tau_i * pending``), which is why this is
enough to continue a sequence from any split point (:meth:`TTTState.current_weights`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from innerloop.core.functional import as_integer, integer_or_given
from innerloop.core.wording import a_type

#: The groups of tensors of a state, in the order :meth:`TTTState.tensors` lists them.
TENSOR_GROUPS = ("params", "pending", "loss_carry", "conv_history", "momentum", "decay")
#: The groups whose every tensor is batch-first (``[B, ...]``); ``loss_carry`` is the inner loss's to
#: read (:meth:`~innerloop.core.protocol.InnerLoss.batched_carry_keys`).
BATCH_FIRST_GROUPS = ("params", "pending", "conv_history", "momentum", "decay")
#: The signature's fields :meth:`TTTState.metadata` writes only when they are recorded (not None).
OPTIONAL_METADATA = ("update_rule", "layer", "inner_output")


def inner_output_label(inner_norm: bool, inner_residual: bool) -> str:
    """:attr:`StateSignature.inner_output` of ``f(x) = [x +] [LN](g(x))`` with these options."""
    return {(True, True): "residual+norm", (True, False): "norm", (False, True): "residual"}.get(
        (inner_norm, inner_residual), "bare"
    )


UNREGISTERED = " (unregistered"
"""What follows a plugin's name in the label a state's signature records for an unregistered instance
(``innerloop.core.identity.identity_label``: the name, then its class)."""


def is_label_of(label: str, name: Any) -> bool:
    """Whether ``label``, as a state's signature records a plugin, names a plugin called ``name``,
    registered or not (a name may itself hold ``" ("``: the label is never cut at it)."""
    return isinstance(name, str) and (label == name or label.startswith(f"{name}{UNREGISTERED} "))


def check_batch_rows(rows: Any, batch_size: int, name: str = "rows") -> torch.Tensor:
    """``rows`` as an int64 tensor, after refusing, naming ``name``, anything but a non-empty 1-D
    integer tensor (or a list or tuple of ints) of row numbers in ``[0, batch_size)`` (repeats allowed: a
    row may be taken twice). Reads the smallest and largest row (one device sync)."""
    if isinstance(rows, (list, tuple)):
        numbers = [as_integer(row) for row in rows]
        if None in numbers:
            bad = rows[numbers.index(None)]
            raise TypeError(
                f"{name} must hold integer row numbers, got {bad!r} in {type(rows).__name__} {rows!r}"
            )
        rows = torch.tensor(numbers, dtype=torch.int64)
    if not isinstance(rows, torch.Tensor):
        raise TypeError(
            f"{name} must be a 1-D torch.Tensor (or a list) of batch row numbers (int64), got "
            f"{type(rows).__name__}"
        )
    if rows.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"{name} must hold integer row numbers (dtype torch.int64 or int32), got {rows.dtype}"
        )
    if rows.dim() != 1 or rows.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D tensor of row numbers, got shape {list(rows.shape)}"
        )
    low, high = (int(v) for v in torch.stack(torch.aminmax(rows)).tolist())
    if low < 0 or high >= batch_size:
        bad = low if low < 0 else high
        valid = f"valid rows are 0..{batch_size - 1}" if batch_size else "it has no rows to take"
        raise ValueError(
            f"{name} holds row {bad}, outside the state's batch of {batch_size} sequences: {valid}"
        )
    return rows.to(torch.int64)


def take_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows ``rows`` (checked by :func:`check_batch_rows`) of a batch-first ``tensor [B, ...]``."""
    return tensor.index_select(0, rows.to(tensor.device))


def cat_rows(tensors: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    """Batch-first tensors ``[B_i, ...]`` of several states, concatenated along the batch: refused,
    naming ``name``, unless they agree on dtype, device and every dimension but the first (torch would
    promote a dtype silently)."""
    first = tensors[0]
    for i, tensor in enumerate(tensors):
        if tensor.dim() == 0:
            raise ValueError(f"{name} is 0-d in state {i}: it holds no batch rows to concatenate")
        if (tensor.dtype, tensor.device, tensor.shape[1:]) != (first.dtype, first.device, first.shape[1:]):
            raise ValueError(
                f"cannot concatenate the states: {name} is {tensor.dtype} {list(tensor.shape)} on "
                f"{tensor.device} in state {i} but {first.dtype} {list(first.shape)} on {first.device} in "
                "state 0; concatenate states of one model, in one dtype and on one device "
                "(state.to(...) converts one)"
            )
    return torch.cat(list(tensors), dim=0)


def same_positions(positions: Sequence[int], what: str) -> None:
    """Refuse to concatenate states at different positions (each row of a state is at its position)."""
    if len(set(positions)) > 1:
        raise ValueError(
            f"cannot concatenate {what}s at different positions {list(positions)}: every row of a state is "
            "at the state's position; concatenate states that have read the same number of tokens"
        )


def check_states(states: Any, cls: type, what: str) -> list[Any]:
    """``states`` as a list, after refusing an empty sequence or an element that is not a ``cls``."""
    if isinstance(states, (torch.Tensor, str)) or not isinstance(states, Sequence) or not states:
        raise ValueError(f"{what}.cat takes a non-empty list of {cls.__name__}s, got {states!r:.80}")
    for i, state in enumerate(states):
        if not isinstance(state, cls):
            raise TypeError(f"{what}.cat: states[{i}] is {a_type(state)}, not a {cls.__name__}")
    return list(states)


@dataclass(frozen=True)
class StateSignature:
    """What a state must agree on with the layer (and the input) that continues it.

    ``update_rule``, ``layer`` (the layer's class: ``TTTLayer``, ``DeltaNetLayer``,
    ``GatedDeltaNetLayer``, ...) and ``inner_output`` (what the inner model's output passes through:
    ``"residual+norm"``, ``"norm"``, ``"residual"`` or ``"bare"``, see :func:`inner_output_label`) are
    recorded by the layers: a state's pending sums are gradients of that function, which another
    option would read as another one's. They are None (not recorded) for a state built outside a
    layer (``innerloop.ops.scan``, the testing kit), which no layer takes.
    """

    batch_size: int
    num_heads: int
    head_dim: int
    mini_batch_size: int
    inner_model: str
    inner_loss: str
    update_rule: str | None = None
    layer: str | None = None
    inner_output: str | None = None


@dataclass(frozen=True)
class TTTState:
    """State of a TTT layer after ``position`` tokens. Immutable: layers return a new one."""

    params: dict[str, torch.Tensor]
    pending: dict[str, torch.Tensor]
    position: int
    signature: StateSignature
    loss_carry: dict[str, torch.Tensor] = field(default_factory=dict)
    conv_history: dict[str, torch.Tensor] = field(default_factory=dict)
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    decay: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a numpy or 0-d tensor integer held as the int it is (the one integer rule, core.functional); anything
        # else is kept for the state's check to refuse by name
        object.__setattr__(self, "position", integer_or_given(self.position))

    @property
    def batch_size(self) -> int:
        return self.signature.batch_size

    @property
    def offset(self) -> int:
        """Position inside the current mini-batch (0 at a boundary)."""
        return self.position % self.signature.mini_batch_size

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TTTState:
        return replace(
            self,
            params={k: fn(v) for k, v in self.params.items()},
            pending={k: fn(v) for k, v in self.pending.items()},
            loss_carry={k: fn(v) for k, v in self.loss_carry.items()},
            conv_history={k: fn(v) for k, v in self.conv_history.items()},
            momentum={k: fn(v) for k, v in self.momentum.items()},
            decay={k: fn(v) for k, v in self.decay.items()},
        )

    def detach(self) -> TTTState:
        """The same state cut from the autograd graph (truncated backpropagation, decoding)."""
        return self._map(lambda t: t.detach())

    def to(self, *args: Any, **kwargs: Any) -> TTTState:
        """Move or cast every tensor, like ``Tensor.to``."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def clone(self) -> TTTState:
        """A copy whose tensors own their memory (gradients flow back through the copy)."""
        return self._map(lambda t: t.clone())

    def index_select(self, rows: torch.Tensor, inner_loss: Any = None) -> TTTState:
        """The state of the sequences ``rows`` in that order: a 1-D int64 tensor of batch rows, repeats
        allowed (reorder beams, keep some sequences of a batch, repeat one prompt's state). Each row
        continues exactly as that sequence alone would.

        ``inner_loss``: the layer's inner loss (``layer.inner_loss``), needed only when ``loss_carry``
        is not empty: its :meth:`~innerloop.core.protocol.InnerLoss.batched_carry_keys` says which
        carry entries hold a row per sequence (selected) and which are shared by the batch (kept).
        A language model's states pass the registered loss themselves.
        """
        rows = check_batch_rows(rows, self.batch_size)
        return self._take_rows(rows, inner_loss)

    def _take_rows(self, rows: torch.Tensor, inner_loss: Any) -> TTTState:
        """:meth:`index_select` with ``rows`` already checked."""
        batched = self._batched_carry(inner_loss, "index_select")
        groups = {g: {k: take_rows(v, rows) for k, v in getattr(self, g).items()} for g in BATCH_FIRST_GROUPS}
        carry = {k: take_rows(v, rows) if k in batched else v for k, v in self.loss_carry.items()}
        signature = replace(self.signature, batch_size=int(rows.shape[0]))
        return replace(self, **groups, loss_carry=carry, signature=signature)

    @classmethod
    def cat(cls, states: Sequence[TTTState], inner_loss: Any = None) -> TTTState:
        """One state holding the sequences of ``states`` one after the other (``[B_1 + B_2 + ...]``):
        states of one layer at one position, in one dtype, e.g. of separately read batches. Carry
        entries shared by the batch must be equal in every state. ``inner_loss`` as in
        :meth:`index_select`."""
        states = check_states(states, cls, "TTTState")
        first = states[0]
        same_positions([s.position for s in states], "TTTState")
        for i, state in enumerate(states):
            _check_same_layout(first, state, i)
        groups = {
            g: {k: cat_rows([getattr(s, g)[k] for s in states], f"{g}[{k!r}]") for k in getattr(first, g)}
            for g in BATCH_FIRST_GROUPS
        }
        batched = first._batched_carry(inner_loss, "cat")
        for state in states[1:]:
            state._batched_carry(inner_loss, "cat")  # each state's per-sequence entries: [B_i, ...]
        carry = {}
        for key in first.loss_carry:
            parts = [s.loss_carry[key] for s in states]
            carry[key] = cat_rows(parts, f"loss_carry[{key!r}]") if key in batched else _shared(parts, key)
        signature = replace(first.signature, batch_size=sum(s.batch_size for s in states))
        return replace(first, **groups, loss_carry=carry, signature=signature)

    def _batched_carry(self, inner_loss: Any, method: str) -> frozenset[str]:
        """The carry entries with a row per sequence, as ``inner_loss`` (that wrote the state) says,
        after checking that each is ``[batch_size, ...]``; empty when the carry is."""
        if not self.loss_carry:
            return frozenset()
        recorded = self.signature.inner_loss
        if inner_loss is None:
            raise ValueError(
                f"TTTState.{method}: the state's loss_carry holds {sorted(self.loss_carry)} of inner loss "
                f"{recorded!r}, and only that loss knows which of them belong to each sequence: pass "
                "inner_loss= (the layer's layer.inner_loss); a language model's states pass it themselves"
            )
        name = getattr(inner_loss, "name", None)
        if not isinstance(name, str) or not callable(getattr(inner_loss, "batched_carry_keys", None)):
            raise TypeError(
                f"TTTState.{method}: inner_loss= takes the inner loss object that wrote the state (an "
                f"InnerLoss: the layer's layer.inner_loss), got {inner_loss!r} ({type(inner_loss).__name__}); "
                "a registered name is not enough: pass the object, e.g. "
                f"innerloop.get_registry().inner_loss({recorded!r})"
            )
        if not is_label_of(recorded, name):  # its name, or its name and class (unregistered)
            raise ValueError(
                f"TTTState.{method}: inner_loss is {name!r}, but the state was written by inner loss "
                f"{recorded!r}: pass that loss (the layer's layer.inner_loss)"
            )
        like = next(iter(self.loss_carry.values())).new_zeros(())
        batched = inner_loss.batched_carry_keys(self.signature.num_heads, self.signature.head_dim, like)
        _check_carry_keys_are_known(inner_loss, self, like, method)
        for key in batched & set(self.loss_carry):
            shape = list(self.loss_carry[key].shape)
            if not shape or shape[0] != self.batch_size:
                raise ValueError(
                    f"TTTState.{method}: loss_carry[{key!r}] is {shape}, but inner loss {name!r} holds a row "
                    f"per sequence there: [{self.batch_size}, ...] for this state's batch"
                )
        return batched

    def decay_product(self) -> torch.Tensor | None:
        """``[B, H]``: the product of the decays read so far in the current mini-batch (None: 1)."""
        return self.decay.get("product")

    def current_weights(self, tau: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The inner weights after the last token read: ``product * params - tau_i * pending``, with
        ``i`` the last token's offset in its mini-batch (``params`` itself at a boundary).

        Args:
            tau: ``[K]`` the token-index scales the state was written with (None: 1, as for the
                ``momentum`` rule).
        """
        if self.offset == 0:
            return dict(self.params)
        scale = 1.0 if tau is None else tau[self.offset - 1]
        product = self.decay_product()
        weights = {}
        for key, value in self.params.items():
            base = (
                value
                if product is None
                else product.reshape(product.shape + (1,) * (value.dim() - 2)) * value
            )
            weights[key] = base - scale * self.pending[key]
        return weights

    def scan_weights(self, tau: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The state as ``innerloop.ops.scan`` returns it: :meth:`current_weights` by name, plus
        ``"momentum.<name>"`` for the momentum ``S`` when it is carried."""
        momentum = {f"momentum.{k}": v for k, v in self.momentum.items()}
        return {**self.current_weights(tau), **momentum}

    def with_weights(self, weights: dict[str, torch.Tensor]) -> TTTState:
        """This state with its inner weights (and momentum) replaced by ``weights``, as
        :meth:`scan_weights` gives them (``innerloop.ops.scan``'s ``initial`` and its result): the
        inverse of :meth:`scan_weights` at a mini-batch boundary, where a state is only weights."""
        _check_tensors_by_name(
            weights, "with_weights: weights", "as scan_weights() and innerloop.ops.scan give"
        )
        if self.offset != 0:
            raise ValueError(
                f"with_weights: the state is inside a mini-batch (position {self.position}, mini_batch_size "
                f"{self.signature.mini_batch_size}); weights alone describe only a state at a boundary"
            )
        names = set(self.params) | {f"momentum.{k}" for k in self.params}
        unknown = sorted(set(weights) - names)
        missing = sorted(set(self.params) - set(weights))
        if unknown or missing:
            raise ValueError(f"weights: missing {missing}, unknown {unknown}; valid names: {sorted(names)}")
        params = {k: weights[k] for k in self.params}
        momentum = {k: weights[f"momentum.{k}"] for k in self.params if f"momentum.{k}" in weights}
        if (self.momentum or momentum) and sorted(momentum) != sorted(self.params):
            wanted = [f"momentum.{k}" for k in self.params]
            given = sorted(f"momentum.{k}" for k in momentum)
            carried = (
                " (this state carries one: leaving it out would restart it at zero)" if self.momentum else ""
            )
            raise ValueError(
                f"weights: the momentum S needs all of {wanted}, got {given}{carried}; scan_weights() gives "
                "the weights with their momentum"
            )
        pending = {k: torch.zeros_like(v) for k, v in params.items()}
        return replace(self, params=params, pending=pending, momentum=momentum, decay={})

    def is_finite(self) -> bool:
        """False if any tensor of the state holds NaN or inf (e.g. after ``non_finite='ignore'``)."""
        flag = self.finite_flag()
        return True if flag is None else bool(flag)  # one read of the device, not one per tensor

    def finite_flag(self) -> torch.Tensor | None:
        """A 0-d bool tensor, True where every tensor of the state is finite, not read back from the
        device (a caller may join it to its own flags for one read); None for a state without tensors."""
        flags = [torch.isfinite(t).all() for t in self.tensors().values()]
        return torch.stack(flags).all() if flags else None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor under a flat name (for serialisation), as the state holds it: a broadcast view or
        a slice of a shared buffer stays one, so safetensors (contiguous tensors that share no memory)
        takes copies, ``t.clone(memory_format=torch.contiguous_format)`` (docs/architecture.md)."""
        flat: dict[str, torch.Tensor] = {}
        for group in TENSOR_GROUPS:
            for key, value in getattr(self, group).items():
                flat[f"{group}.{key}"] = value
        return flat

    def metadata(self) -> dict[str, str]:
        """The non-tensor fields as strings (safetensors metadata)."""
        sig = self.signature
        return {
            "position": str(self.position),
            "batch_size": str(sig.batch_size),
            "num_heads": str(sig.num_heads),
            "head_dim": str(sig.head_dim),
            "mini_batch_size": str(sig.mini_batch_size),
            "inner_model": sig.inner_model,
            "inner_loss": sig.inner_loss,
            **{key: value for key in OPTIONAL_METADATA if (value := getattr(sig, key)) is not None},
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> TTTState:
        """Inverse of :meth:`tensors` + :meth:`metadata`."""
        _check_tensors_by_name(tensors, "tensors", "TTTState.tensors(), e.g. safetensors' load_file")
        if not isinstance(metadata, Mapping):
            raise TypeError(
                "metadata must be a dict of strings (TTTState.metadata(), e.g. safetensors' "
                f"safe_open(path, 'pt').metadata()), got {type(metadata).__name__}"
            )
        groups: dict[str, dict[str, torch.Tensor]] = {group: {} for group in TENSOR_GROUPS}
        for name, value in tensors.items():
            group, _, key = name.partition(".")
            if group not in groups or not key:
                raise ValueError(
                    f"state tensor name {name!r} is not of the form '<group>.<key>' with group in {sorted(groups)}"
                )
            groups[group][key] = value
        try:
            signature = StateSignature(
                batch_size=_metadata_int(metadata, "batch_size", least=0),  # 0: an empty batch
                num_heads=_metadata_int(metadata, "num_heads"),
                head_dim=_metadata_int(metadata, "head_dim"),
                mini_batch_size=_metadata_int(metadata, "mini_batch_size"),
                inner_model=metadata["inner_model"],
                inner_loss=metadata["inner_loss"],
                **{key: metadata[key] for key in OPTIONAL_METADATA if key in metadata},
            )
            position = _metadata_int(metadata, "position", least=0)
        except KeyError as missing:
            raise ValueError(f"state metadata lacks {missing}; got keys {sorted(metadata)}") from None
        state = cls(position=position, signature=signature, **groups)
        _check_no_pending_at_a_boundary(state)
        return state


def _check_tensors_by_name(value: Any, name: str, like: str) -> None:
    """A ``TypeError`` naming ``name`` unless ``value`` is a mapping of str names to tensors (``like``:
    where such a mapping comes from)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict of tensors by name ({like}), got {type(value).__name__}")
    for key, tensor in value.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"{name} must be a dict of tensors by name ({like}); its entry {key!r} is a "
                f"{type(tensor).__name__}"
            )


def _check_no_pending_at_a_boundary(state: TTTState) -> None:
    """A state at a mini-batch boundary has no pending sums (a layer writes zeros there): nonzero ones
    are a corrupt or hand-edited state, which a layer would read as zeros. Meta tensors are not read."""
    if state.offset != 0:
        return
    nonzero = sorted(k for k, t in state.pending.items() if t.device.type != "meta" and bool(t.any()))
    if nonzero:
        raise ValueError(
            f"state tensors pending.{nonzero[0]} (of {nonzero}) are nonzero at a mini-batch boundary (position "
            f"{state.position}, mini_batch_size {state.signature.mini_batch_size}), where a layer keeps them "
            "zero: the tensors do not belong to this metadata, or were edited"
        )


def _metadata_int(metadata: dict[str, str], key: str, least: int = 1) -> int:
    """``metadata[key]`` read as an integer (``KeyError`` if absent); ``ValueError`` naming ``key`` unless it
    is one (a decimal string, as :meth:`TTTState.metadata` writes it, or an int) of at least ``least``: a
    float is not truncated, a ``mini_batch_size`` of 0 does not reach a modulo, nor a negative position the
    pending sums' check."""
    value = metadata[key]
    if isinstance(value, str):
        digits = value.strip().removeprefix("-")
        number = int(value) if digits.isdecimal() and digits.isascii() else None
    else:
        number = as_integer(value)
    if number is None or number < least:
        raise ValueError(
            f"state metadata {key}={value!r} must be an integer >= {least} (as TTTState.metadata writes it)"
        )
    return number


def _check_same_layout(first: TTTState, state: TTTState, index: int) -> None:
    """``state`` (``states[index]``) was written by a layer like ``first``'s: the same signature but for
    the batch size, and the same tensors in every group."""
    if replace(state.signature, batch_size=0) != replace(first.signature, batch_size=0):
        raise ValueError(
            f"cannot concatenate TTTStates of different layers: states[{index}].signature is "
            f"{state.signature}, states[0]'s {first.signature} (only batch_size may differ)"
        )
    for group in (*BATCH_FIRST_GROUPS, "loss_carry"):
        keys, wanted = sorted(getattr(state, group)), sorted(getattr(first, group))
        if keys != wanted:
            raise ValueError(
                f"cannot concatenate the TTTStates: states[{index}].{group} holds {keys}, states[0]'s "
                f"{wanted}; concatenate states of one layer at one position"
            )


def _check_carry_keys_are_known(inner_loss: Any, state: TTTState, like: torch.Tensor, method: str) -> None:
    """Under the default :meth:`~innerloop.core.protocol.InnerLoss.batched_carry_keys` (which reads
    ``init_carry``), refuse a carry entry that ``init_carry`` does not make: the default cannot tell
    whether it holds a row per sequence, and keeping it whole could give a row another's carry."""
    if type(inner_loss).batched_carry_keys.__qualname__ != "InnerLoss.batched_carry_keys":
        return  # the loss says itself (core.protocol imports this module: its method is known by name)
    made = inner_loss.init_carry(1, state.signature.num_heads, state.signature.head_dim, like)
    unknown = sorted(set(state.loss_carry) - set(made))
    if unknown:
        raise ValueError(
            f"TTTState.{method}: loss_carry holds {unknown}, which inner loss {getattr(inner_loss, 'name', '?')!r}'s "
            "init_carry does not make, so whether they hold a row per sequence is unknown: the loss must say "
            "(override InnerLoss.batched_carry_keys)"
        )


def _shared(parts: list[torch.Tensor], key: str) -> torch.Tensor:
    """A carry entry shared by the batch, equal in every state joined (else refused)."""
    first = parts[0]
    for i, part in enumerate(parts):
        if (
            part.shape != first.shape
            or part.dtype != first.dtype
            or not torch.equal(part, first.to(part.device))
        ):
            raise ValueError(
                f"cannot concatenate the TTTStates: loss_carry[{key!r}] is shared by the batch and differs "
                f"between states[0] and states[{i}]"
            )
    return first


torch.serialization.add_safe_globals([StateSignature, TTTState])
# torch.load's default weights_only=True loads a saved state: both classes hold only tensors, ints,
# strings, None and dicts of tensors, and have no __setstate__ or __reduce__ that could run code.

__all__ = [
    "BATCH_FIRST_GROUPS",
    "TENSOR_GROUPS",
    "StateSignature",
    "TTTState",
    "cat_rows",
    "check_batch_rows",
    "check_states",
    "inner_output_label",
    "same_positions",
    "take_rows",
]
