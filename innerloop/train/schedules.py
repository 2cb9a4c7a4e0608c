"""Learning-rate schedules of the outer optimizer (``optim.schedule``), and the TTT layers' inner
base-lr warm-up (``optim.ttt_base_lr_warmup``).

Every schedule is a pure function of the optimizer step ``s`` (0 for the first step; Lightning's
``global_step`` before the step is taken), so a resumed run follows it exactly. With ``W`` warm-up
steps, ``N = max_steps``, peak ``lr`` and final ``min_lr``:

- warm-up, every schedule: ``lr * (s + 1) / W`` for ``s < W``;
- ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2`` with ``p = min(1, (s - W) / (N - W))``;
- ``linear``: ``lr + (min_lr - lr) * p``, the same ``p``;
- ``constant``: ``lr``;
- ``wsd`` (warm-up, stable, decay) with ``D`` decay steps: ``lr`` until ``N - D``, then
  ``lr + (min_lr - lr) * q`` with ``q = min(1, (s - (N - D)) / D)``.

(``N - W`` and ``D`` count as 1 where they are 0.) Past ``N`` every schedule stays at its last value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from innerloop.config.schema import SCHEDULES
from innerloop.core.layer import TTTLayer
from innerloop.models.config import AT_LEAST_0, AT_LEAST_1, checked_number


def _checked(
    step: Any, warmup_steps: Any, max_steps: Any, lr: Any, min_lr: Any, decay_steps: Any = 0
) -> tuple[int, int, int, float, float, int]:
    """A schedule's arguments as plain numbers, each in its range; else a ``ValueError`` naming the first
    that is not (a NaN step or lr, a negative warm-up, gave a number before)."""
    integers = {"step": (step, AT_LEAST_0), "warmup_steps": (warmup_steps, AT_LEAST_0)}
    integers |= {"max_steps": (max_steps, AT_LEAST_1), "decay_steps": (decay_steps, AT_LEAST_0)}
    step, warmup_steps, max_steps, decay_steps = (
        checked_number(name, value, int, bounds) for name, (value, bounds) in integers.items()
    )
    lr, min_lr = (
        checked_number(name, value, float, AT_LEAST_0) for name, value in (("lr", lr), ("min_lr", min_lr))
    )
    return step, warmup_steps, max_steps, lr, min_lr, decay_steps


def _warmup(step: int, warmup_steps: int, lr: float) -> float:
    if warmup_steps > 2**53:  # float(10**400) overflows: the ratio of the two ints, exact at any size
        return lr * ((step + 1) / warmup_steps)
    return lr * (step + 1) / warmup_steps


def _decay_progress(step: int, start: int, length: int) -> float:
    """How far ``step`` is through ``length`` steps from ``start``: 0 at ``start``, 1 at the end and after."""
    return min(1.0, (step - start) / max(1, length))


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, lr: float, min_lr: float) -> float:
    """Learning rate at optimizer step ``step``: linear warm-up from 0 to ``lr`` over ``warmup_steps``,
    then cosine decay to ``min_lr`` at ``max_steps`` (and ``min_lr`` after)."""
    step, warmup_steps, max_steps, lr, min_lr, _ = _checked(step, warmup_steps, max_steps, lr, min_lr)
    if step < warmup_steps:
        return _warmup(step, warmup_steps, lr)
    progress = _decay_progress(step, warmup_steps, max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def warmup_linear(step: int, warmup_steps: int, max_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr``, then linear decay to ``min_lr`` at ``max_steps``."""
    step, warmup_steps, max_steps, lr, min_lr, _ = _checked(step, warmup_steps, max_steps, lr, min_lr)
    if step < warmup_steps:
        return _warmup(step, warmup_steps, lr)
    return lr + (min_lr - lr) * _decay_progress(step, warmup_steps, max_steps - warmup_steps)


def warmup_constant(step: int, warmup_steps: int, max_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr``, then ``lr`` (``max_steps`` and ``min_lr`` are not used)."""
    step, warmup_steps, max_steps, lr, min_lr, _ = _checked(step, warmup_steps, max_steps, lr, min_lr)
    return _warmup(step, warmup_steps, lr) if step < warmup_steps else lr


def warmup_stable_decay(
    step: int, warmup_steps: int, max_steps: int, lr: float, min_lr: float, decay_steps: int
) -> float:
    """Linear warm-up to ``lr``, ``lr`` until the last ``decay_steps`` steps before ``max_steps``, then
    linear decay to ``min_lr`` at ``max_steps``."""
    step, warmup_steps, max_steps, lr, min_lr, decay_steps = _checked(
        step, warmup_steps, max_steps, lr, min_lr, decay_steps
    )
    if step < warmup_steps:
        return _warmup(step, warmup_steps, lr)
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return lr
    return lr + (min_lr - lr) * _decay_progress(step, decay_start, decay_steps)


Schedule = Callable[[int], float]


def make_schedule(
    name: str, warmup_steps: int, max_steps: int, lr: float, min_lr: float, decay_steps: int = 0
) -> Schedule:
    """The schedule ``name`` (``optim.schedule``) as a function of the optimizer step; its numbers are
    checked here (as each step checks them), each named, not first at the first step."""
    _checked(0, warmup_steps, max_steps, lr, min_lr, decay_steps)
    if name == "cosine":
        return lambda step: warmup_cosine(step, warmup_steps, max_steps, lr, min_lr)
    if name == "linear":
        return lambda step: warmup_linear(step, warmup_steps, max_steps, lr, min_lr)
    if name == "constant":
        return lambda step: warmup_constant(step, warmup_steps, max_steps, lr, min_lr)
    if name == "wsd":
        return lambda step: warmup_stable_decay(step, warmup_steps, max_steps, lr, min_lr, decay_steps)
    raise ValueError(f"schedule={name!r} is not a schedule; valid: {list(SCHEDULES)}")


def ttt_base_lr(step: int, init: float, peak: float, warmup_steps: int) -> float:
    """The TTT layers' base lr during optimizer step ``step`` (0-based) under the JAX reference's warm-up:
    ``init + min(1, step / warmup_steps) * (peak - init)``; ``peak`` with ``warmup_steps`` 0.

    The reference (ttt-lm-jax, ``ttt/train.py``, ``make_get_ttt_lr_mult``) multiplies the layers'
    ``ttt_base_lr`` (= ``peak``) by ``(init + min(1, (s - 1) / warmup) * (peak - init)) / peak`` at its
    1-based step ``s``, i.e. ``step + 1`` here, for every micro-batch of that step, and evaluates with
    the multiplier 1. It rounds the multiplier to bfloat16; this is the exact value.
    """
    step = checked_number("ttt_base_lr: step", step, int, AT_LEAST_0)
    init, peak, warmup_steps = _checked_ttt_warmup("ttt_base_lr", init, peak, warmup_steps)
    if warmup_steps <= 0:
        return peak
    return init + min(1.0, step / warmup_steps) * (peak - init)


def _checked_ttt_warmup(caller: str, init: Any, peak: Any, warmup_steps: Any) -> tuple[float, float, int]:
    """``(init, peak, warmup_steps)`` as plain numbers: base lrs finite and >= 0 (what a TTT layer takes),
    an integer step count >= 0; else a ``ValueError`` naming ``caller`` and the argument."""
    init, peak = (
        checked_number(f"{caller}: {name}", value, float, AT_LEAST_0)
        for name, value in (("init", init), ("peak", peak))
    )
    return init, peak, checked_number(f"{caller}: warmup_steps", warmup_steps, int, AT_LEAST_0)


class TTTBaseLRWarmup(L.Callback):
    """Sets the base lr of every :class:`~innerloop.core.layer.TTTLayer` of the trained model before
    each training batch to :func:`ttt_base_lr` of the optimizer step, and back to ``peak`` (the model's
    ``model.ttt.base_lr``) for validation and when training ends, as the reference evaluates.

    Stateless: the base lr is a function of ``trainer.global_step``, so a resumed run continues it.
    """

    def __init__(self, init: float, peak: float, warmup_steps: int) -> None:
        """``init`` and ``peak``: base lrs, finite and >= 0; ``warmup_steps``: an integer >= 0 (0: ``peak``
        throughout). Checked here, each named with the callback (a NaN ``init`` was refused by the layer
        at the first training batch, naming neither)."""
        self.init, self.peak, self.warmup_steps = _checked_ttt_warmup(
            "TTTBaseLRWarmup", init, peak, warmup_steps
        )

    @staticmethod
    def _set(module: torch.nn.Module, base_lr: float) -> None:
        for layer in module.modules():
            if isinstance(layer, TTTLayer):
                layer.base_lr = base_lr

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._set(pl_module, ttt_base_lr(trainer.global_step, self.init, self.peak, self.warmup_steps))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set(pl_module, self.peak)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set(pl_module, self.peak)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._set(pl_module, self.peak)
