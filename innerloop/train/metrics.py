"""torchmetrics metrics of language models beyond perplexity.

- :class:`LossByPosition`: the mean loss in each bucket of positions in the context. A model that
  uses long context keeps lowering its loss at later positions; one that forgets flattens out.
- :class:`InnerLossDiagnostics`: for each TTT layer, the inner (self-supervised) loss before and after
  the layer's updates; "after" below "before" means the inner loop is learning.

Perplexity is ``torchmetrics.text.Perplexity`` with float64 states (:class:`Float64Perplexity`). All
states are sums, so the metrics reduce correctly across processes, and they stay float64 when the
module holding them is cast to a low precision (:class:`Float64States`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity
from torchmetrics.utilities.distributed import gather_all_tensors

from innerloop.core.functional import as_integer, check_flag
from innerloop.models.config import MODEL_FIELD_BOUNDS

_FORWARD_SETTINGS = (
    "_update_count", "_to_sync", "_should_unsync", "compute_on_cpu", "_enable_grad", "_is_synced", "_computed",
)  # fmt: skip
"""The attributes torchmetrics' ``forward`` changes besides the states (and sets back when it succeeds)."""


def _kept_copy(value: Any) -> Any:
    """A copy of a metric's state (a tensor cloned, a list state copied) that an in-place update of the
    state leaves as it is; any other value as it is."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    return list(value) if isinstance(value, list) else value


def _kept_reference(value: Any) -> Any:
    """What puts a state back after an update that writes it out of place: the tensor itself (the
    update replaces it, never changes it), a list state's elements (a list is appended to in place)."""
    return list(value) if isinstance(value, list) else value


class AllOrNothingUpdate(Metric):
    """A metric whose ``update`` adds a batch to its states wholly or not at all: an update that raises,
    a ``KeyboardInterrupt`` too (Ctrl-C between ``total = ...`` and ``count = ...``), leaves the states
    and the update count as before the call, so a later ``compute()`` is of the batches taken (a half
    write made it silently wrong: the sum of a batch over the counts of those before).

    The states are put back from references kept before the call, no copy: a subclass's ``update``
    writes each state out of place (``self.total = self.total + ...``, never ``+=`` or an indexed
    write), as torchmetrics' stat scores (accuracy) do. ``forward`` (the batch's value, its states added to
    the metric's) keeps the metric as before the call on any exception too (:meth:`forward`)."""

    def _wrap_update(self, update: Callable) -> Callable:
        counted_update = super()._wrap_update(update)

        @functools.wraps(update)
        def all_or_nothing(*args: Any, **kwargs: Any) -> None:
            names = (*self._defaults, "_update_count", "_computed")
            kept = {name: _kept_reference(getattr(self, name)) for name in names}
            try:
                counted_update(*args, **kwargs)
            except BaseException:
                for name, value in kept.items():
                    setattr(self, name, value)
                raise

        return all_or_nothing

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """torchmetrics' ``forward`` (this batch's value, its sums added to the metric's), which keeps
        what the metric had accumulated when the batch is refused: torchmetrics resets the metric before
        the batch's update, so an update's ``ValueError`` left it reset (every earlier batch's sums
        lost, silently, for a caller that skips the batch) and its sync on ``compute`` switched off. Restored
        on every exception, a ``KeyboardInterrupt`` inside ``update`` too: a notebook's interrupted batch
        would otherwise leave the sums it half wrote (one state added to, the next not). The states are kept
        as copies: a metric of ``full_state_update`` (torchmetrics' default) updates its accumulated states
        first, in place (``self.total += ...``), so the kept tensors themselves would hold the half write."""
        names = (*self._defaults, *_FORWARD_SETTINGS)  # a torchmetrics without one of the settings: skipped
        kept = {name: _kept_copy(getattr(self, name)) for name in names if hasattr(self, name)}
        try:
            return super().forward(*args, **kwargs)
        except BaseException:
            for name, value in kept.items():
                setattr(self, name, value)
            raise


class AllOrNothingAccuracy(AllOrNothingUpdate, MulticlassAccuracy):
    """torchmetrics' ``MulticlassAccuracy`` (four count states) adding a batch wholly or not at all
    (:class:`AllOrNothingUpdate`, ``forward`` too): its ``update`` writes its states out of place already."""


class Float64States(AllOrNothingUpdate):
    """A metric whose floating-point states (sums of losses, counts) are float64 and stay so when its
    module is cast, as Lightning's ``bf16-true`` and ``16-true`` precisions cast the whole
    LightningModule: a bfloat16 count stops growing at 256, so a cast metric would report silently
    wrong numbers (torchmetrics converts states on ``.to(dtype)``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._float64_states()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Metric:
        this = super()._apply(fn, *args, **kwargs)
        self._float64_states()
        return this

    MERGED_SETTINGS: tuple[str, ...] = ()
    """The settings two metrics must share for :meth:`merge_state` to add one's sums to the other's."""

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """torchmetrics' ``merge_state``, refusing another metric of other :attr:`MERGED_SETTINGS` (e.g. a
        perplexity of another ``ignore_index``, whose sums scored the tokens this one skips), naming both
        values: torchmetrics added the sums without a word. A dict of states carries no settings."""
        if isinstance(incoming_state, Metric):
            for name in self.MERGED_SETTINGS:
                mine, theirs = getattr(self, name), getattr(incoming_state, name, None)
                if mine != theirs:
                    raise ValueError(
                        f"{type(self).__name__}.merge_state: this metric has {name}={mine!r} and the "
                        f"incoming one {name}={theirs!r}; only metrics of one {name} can be merged"
                    )
        super().merge_state(incoming_state)

    def _float64_states(self) -> None:
        for name, default in self._defaults.items():
            if isinstance(default, torch.Tensor) and default.is_floating_point():
                self._defaults[name] = default.to(torch.float64)
                setattr(self, name, getattr(self, name).to(torch.float64))


class Float64Perplexity(Float64States, Perplexity):
    """``torchmetrics.text.Perplexity`` summing in float64 (its own states are float32) whatever the
    model's precision, with each token's log-probability taken as ``logit - logsumexp(logits)``:
    torchmetrics' softmax-then-log made a target probability below float32's smallest (about 1e-45)
    ``log(0)``, an infinite perplexity beside a finite loss."""

    MERGED_SETTINGS = ("ignore_index",)

    def __init__(self, ignore_index: int | None = None, **kwargs: Any) -> None:
        if isinstance(ignore_index, bool):  # torchmetrics takes a bool for an int: True ignored token 1
            raise ValueError(f"ignore_index={ignore_index!r} must be None or an integer token id, not a bool")
        super().__init__(ignore_index=ignore_index, **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds [B, T, V]`` floating-point logits, ``target [B, T]`` token ids of any integer dtype
        (``ignore_index`` not scored); bool or floating-point targets, or integer preds, are refused."""
        if not _logits_and_ids(preds, target):
            raise ValueError(
                f"preds must be floating-point logits [batch, length, vocab] and target integer ids [batch, "
                f"length], got {described(preds)} and {described(target)}"
            )
        # [N, V], in float32 or wider: float64 logits (a float64 model) are not rounded
        logits = preds.reshape(-1, preds.shape[-1]).to(torch.promote_types(preds.dtype, torch.float32))
        target = target.reshape(-1).long()  # [N]; uint8 or int16 ids too (gather takes int64)
        scored = (
            target != self.ignore_index
            if self.ignore_index is not None
            else torch.ones_like(target, dtype=torch.bool)
        )
        outside = scored & ((target < 0) | (target >= logits.shape[-1]))
        if bool(outside.any()):
            given = int(target[outside][0])
            unscored = (
                f"or ignore_index={self.ignore_index} for unscored tokens"
                if self.ignore_index is not None
                else f"or, for unscored tokens, construct it with ignore_index={given} (it has none)"
            )
            raise ValueError(
                f"target holds id {given}, outside the vocabulary [0, {logits.shape[-1]}) of preds' last "
                f"dimension; give ids in it, {unscored}"
            )
        picked = logits.gather(1, target.where(scored, 0)[:, None]).squeeze(1)  # [N] the targets' logits
        negative_log_probs = (torch.logsumexp(logits, dim=-1) - picked)[scored]
        # out of place, so that an interrupted update is undone (AllOrNothingUpdate)
        self.total_log_probs = self.total_log_probs + negative_log_probs.double().sum()
        self.count = self.count + scored.sum()

    def scored_tokens(self) -> int:
        """The number of tokens scored since the last reset, over every process as :meth:`compute` counts
        them (0: the loss, perplexity and accuracy are of nothing)."""
        with self.sync_context():
            return int(self.count)

    def mean_loss(self) -> torch.Tensor:
        """The mean negative log-probability per scored token (float64), over every process as
        :meth:`compute` is: the loss itself, finite where ``compute()``'s ``exp`` of it overflows float64
        (a mean above about 709.8 nats)."""
        with self.sync_context():
            return self.total_log_probs / self.count


def _logits_and_ids(preds: Any, target: Any) -> bool:
    """Whether ``preds`` are floating-point logits ``[B, T, V]`` and ``target`` integer ids ``[B, T]``
    (a bool tensor is no ids: its ``True`` would score token 1)."""
    if not isinstance(preds, torch.Tensor) or not isinstance(target, torch.Tensor):
        return False
    integer = not (target.dtype == torch.bool or target.is_floating_point() or target.is_complex())
    return (
        integer
        and preds.is_floating_point()
        and preds.dim() == 3
        and tuple(target.shape) == tuple(preds.shape[:2])
    )


def described(value: Any) -> str:
    """A tensor's shape and dtype (``(6, 2) of torch.float32``), or what else ``value`` is: how the
    metrics' and the bootstrap's messages show what they were given."""
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} of {value.dtype}"
    return type(value).__name__


def _real_losses(value: Any) -> bool:
    """Whether ``value`` is a tensor of real floating-point losses (bool, integer or complex ones are
    not: they were cast to float64, a complex one without its imaginary part)."""
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def position_buckets(seq_len: int, num_buckets: int) -> list[tuple[int, int]]:
    """``num_buckets`` contiguous ``[start, end)`` position ranges covering ``0..seq_len`` (sizes differ
    by at most one). If ``seq_len < num_buckets`` there are ``seq_len`` buckets of one position."""
    given = (seq_len, num_buckets)
    seq_len, num_buckets = as_integer(seq_len) or 0, as_integer(num_buckets) or 0
    if seq_len < 1 or num_buckets < 1:
        raise ValueError(f"seq_len={given[0]!r} and num_buckets={given[1]!r} must be integers >= 1")
    num_buckets = min(num_buckets, seq_len)
    edges = [(b * seq_len) // num_buckets for b in range(num_buckets + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


class LossByPosition(Float64States):
    """Mean per-token loss in each of ``num_buckets`` equal buckets of positions.

    ``update(token_loss [B, T], mask [B, T] bool)`` adds the losses of the tokens where ``mask`` is
    true; ``compute()`` returns ``[num_buckets]`` means (NaN for a bucket without scored tokens), or
    ``[seq_len]`` when fewer positions were seen; :meth:`buckets` gives the positions of each bucket.
    A one-element result comes back 0-d (torchmetrics squeezes what every metric's ``compute`` returns):
    ``compute().reshape(-1)`` is ``[1]`` then.

    The sums are kept per position, so batches may differ in length (e.g. padded to the longest of
    each batch) with ``varying_lengths=True``: the buckets are then those of the longest length seen
    (:attr:`seq_len`, across processes when synced), each the mean over every scored token at its
    positions, whichever batch it came from. Without it, the first update fixes the length and
    another is an error (a consumer labelling the buckets with one length may rely on that).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, num_buckets: int = 16, varying_lengths: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        count = as_integer(num_buckets)  # a float tensor has __index__ too, which raises when called
        if count is None or count < 1:
            raise ValueError(f"num_buckets={num_buckets!r} must be an integer >= 1")
        check_flag("varying_lengths", varying_lengths)
        self.num_buckets = count
        self.varying_lengths = bool(varying_lengths)  # numpy's bool too
        # [longest length seen]: summed loss and scored-token count at each position
        self.add_state("loss_by_position", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count_by_position", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def seq_len(self) -> int | None:
        """The longest length seen since the last reset (None before the first update)."""
        length = self.loss_by_position.numel()
        return length or None

    def buckets(self) -> list[tuple[int, int]]:
        """Position ranges ``[start, end)`` of the buckets (after the first update)."""
        if self.seq_len is None:
            raise RuntimeError("LossByPosition has seen no data yet")
        return position_buckets(self.seq_len, self.num_buckets)

    @property
    def loss_sum(self) -> torch.Tensor:
        """The summed loss of each bucket, ``[len(buckets())]`` float64."""
        return self._by_bucket(self.loss_by_position)

    @property
    def count(self) -> torch.Tensor:
        """The number of scored tokens of each bucket, ``[len(buckets())]`` float64."""
        return self._by_bucket(self.count_by_position)

    def _by_bucket(self, by_position: torch.Tensor) -> torch.Tensor:
        return torch.stack([by_position[start:end].sum() for start, end in self.buckets()])

    def update(self, token_loss: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if not _real_losses(token_loss) or token_loss.dim() != 2:
            raise ValueError(
                f"token_loss must be a floating-point tensor [batch, length], got {described(token_loss)}"
            )
        if mask is None:
            mask = torch.ones_like(token_loss, dtype=torch.bool)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(
                "mask must be a bool tensor (True where a token is scored), got "
                + (f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__)
            )
        if mask.shape != token_loss.shape:
            raise ValueError(
                f"mask must have token_loss's shape {tuple(token_loss.shape)}, got {tuple(mask.shape)}"
            )
        length = token_loss.shape[1]
        self._check_length(length)
        longest = max(length, self.loss_by_position.numel())
        losses = torch.where(mask, token_loss.detach().to(torch.float64), 0.0).sum(dim=0)  # [T]
        counts = mask.sum(dim=0).to(torch.float64)  # [T]
        # out of place, each state first extended to the longest length, so that an interrupted update
        # is undone (AllOrNothingUpdate); a position past this batch's length adds 0.0 (exactly)
        self.loss_by_position = _padded(self.loss_by_position, longest) + _padded(losses, longest)
        self.count_by_position = _padded(self.count_by_position, longest) + _padded(counts, longest)

    def _check_length(self, length: int) -> None:
        """Without ``varying_lengths``, refuse a batch of another length than the first update's."""
        if not self.varying_lengths and self.seq_len not in (None, length):
            raise ValueError(
                f"LossByPosition was set up for length {self.seq_len}, got length {length}; construct it "
                "with varying_lengths=True to bucket batches of differing lengths by position"
            )

    def _check_combined_lengths(self, lengths: list[int], what: str) -> None:
        """Without ``varying_lengths``, refuse to add up states of different lengths (one of no data,
        length 0, adds to any): ``what`` says whose."""
        seen = sorted({length for length in lengths if length > 0})
        if not self.varying_lengths and len(seen) > 1:
            raise ValueError(
                f"LossByPosition cannot combine {what} of lengths {' and '.join(map(str, seen))}: without "
                "varying_lengths every batch has the first one's length; construct it with "
                "varying_lengths=True to bucket batches of differing lengths by position"
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The loss by position of this batch, its sums added to the metric's (torchmetrics' ``forward``),
        a batch of another length refused as :meth:`update` refuses it (torchmetrics runs the update on
        a reset metric, which took any length and then re-bucketed the earlier batches' positions)."""
        token_loss = args[0] if args else kwargs.get("token_loss")
        if isinstance(token_loss, torch.Tensor) and token_loss.dim() == 2:
            self._check_length(token_loss.shape[1])
        return super().forward(*args, **kwargs)

    def _grow_to(self, length: int) -> None:
        """Extend the per-position sums with zeros to ``length`` positions (if shorter)."""
        if length > self.loss_by_position.numel():
            self.loss_by_position = _padded(self.loss_by_position, length)
            self.count_by_position = _padded(self.count_by_position, length)

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any = None) -> None:
        """Sum the per-position states across processes, first extended to the longest length any
        process saw (torchmetrics stacks states of one shape)."""
        lengths = dist_sync_fn(
            torch.tensor([self.loss_by_position.numel()], device=self.loss_by_position.device),
            group=process_group or self.process_group,
        )
        lengths = [int(n) for n in lengths]
        self._check_combined_lengths(lengths, "the processes' states")  # every process raises alike
        self._grow_to(max(lengths))
        super()._sync_dist(dist_sync_fn, process_group)

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        """Add another state of this metric (``forward``'s, ``merge_state``'s), each extended to the
        longer length."""
        self._check_combined_lengths(
            [self.loss_by_position.numel(), incoming_state["loss_by_position"].numel()], "states"
        )
        self._grow_to(incoming_state["loss_by_position"].numel())
        length = self.loss_by_position.numel()
        incoming = {name: F.pad(value, (0, length - value.numel())) for name, value in incoming_state.items()}
        super()._reduce_states(incoming)

    def compute(self) -> torch.Tensor:
        return (self.loss_sum / self.count).float()  # 0/0 = NaN marks an empty bucket

    def means(self) -> torch.Tensor:
        """:meth:`compute`'s means in float64 (over every process, as it syncs), not rounded to float32:
        what a float64 model's validation logs. ``[len(buckets())]``, NaN for an empty bucket."""
        with self.sync_context():
            return self.loss_sum / self.count


def _padded(by_position: torch.Tensor, length: int) -> torch.Tensor:
    """``by_position`` extended with zeros to ``length`` positions (itself when that long)."""
    missing = length - by_position.numel()
    return F.pad(by_position, (0, missing)) if missing > 0 else by_position


class InnerLossDiagnostics(Float64States):
    """Mean inner loss of each TTT layer before and after its updates.

    ``update(layer, before [B], after [B])`` adds one layer's per-sequence values (from
    ``innerloop.core.diagnostics.inner_loss_before_after``); ``compute()`` returns
    ``{"before": [L], "after": [L]}`` (NaN for a layer never updated; 0-d for one layer, as torchmetrics
    squeezes one-element results: ``.reshape(-1)`` gives ``[1]``).
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, num_layers: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        count = as_integer(num_layers)  # torch.tensor(2.0) failed inside torch.zeros
        if count is None or count < 1:
            raise ValueError(f"num_layers={num_layers!r} must be an integer >= 1")
        most = MODEL_FIELD_BOUNDS["model.num_layers"]
        if count not in most:  # 2**70 failed inside torch.zeros
            raise ValueError(
                f"num_layers={count} must be <= {most.high:g} (model.num_layers' bound: {most.why})"
            )
        self.num_layers = num_layers = count
        self.add_state("before_sum", torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("after_sum", torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, layer: int, before: torch.Tensor, after: torch.Tensor) -> None:
        index = as_integer(layer)
        if index is None or not 0 <= index < self.num_layers:
            raise ValueError(f"layer={layer!r} must be in [0, {self.num_layers}), an integer")
        if (
            not (_real_losses(before) and _real_losses(after))
            or before.shape != after.shape
            or before.dim() != 1
        ):
            raise ValueError(
                f"before and after must both be floating-point tensors [batch], got {described(before)} and "
                f"{described(after)}"
            )
        # [3, L]: this batch's sums of layer `index` (0.0, exactly, for the other layers), added out of
        # place so that an interrupted update is undone (AllOrNothingUpdate)
        added = torch.zeros(3, self.num_layers, dtype=torch.float64, device=self.count.device)
        added[0, index] = before.detach().to(torch.float64).sum()
        added[1, index] = after.detach().to(torch.float64).sum()
        added[2, index] = before.numel()
        self.before_sum = self.before_sum + added[0]
        self.after_sum = self.after_sum + added[1]
        self.count = self.count + added[2]

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        """Add another state of this metric (``forward``'s, ``merge_state``'s): of as many layers."""
        layers = incoming_state["count"].numel()
        if layers != self.num_layers:
            raise ValueError(
                f"InnerLossDiagnostics of {self.num_layers} layers cannot combine the states of {layers} "
                "layers: merge the diagnostics of one model"
            )
        super()._reduce_states(incoming_state)

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "before": (self.before_sum / self.count).float(),
            "after": (self.after_sum / self.count).float(),
        }

    def means(self) -> dict[str, torch.Tensor]:
        """:meth:`compute`'s means in float64 (over every process, as it syncs), not rounded to float32:
        what a float64 model's validation logs."""
        with self.sync_context():
            return {"before": self.before_sum / self.count, "after": self.after_sum / self.count}
