"""How fast a run trains: parameter counts at the start, tokens per second and tokens seen as it goes,
and a warning when the CPU is oversubscribed.

:class:`TrainingThroughput` is a Lightning callback (``innerloop train`` adds it to every run). It

- prints the model's parameter count (total, embedding, each block's mixer; see
  :func:`innerloop.models.params.count_parameters`) and logs it with the run's hyperparameters
  (``logs/version_<n>/hparams.yaml``);
- logs ``tokens_seen`` (training tokens read so far, over all processes), ``wall_time`` (seconds since
  the run's first launch, resumes included, validation included) and ``tokens_per_s`` (over the last
  :data:`RATE_WINDOW` training batches: micro-batches under gradient accumulation) into every row of ``metrics.csv``, and shows
  tokens/s in the progress bar;
- keeps its counters in the checkpoint, so a resumed run continues them where the checkpoint was taken;
- warns once (:class:`CPUOversubscribedWarning`) when the CPU threads are oversubscribed: at the start
  when torch uses more threads than this process may run on, or the load average says other processes
  already keep those cores busy; or during the run when tokens/s falls by :data:`COLLAPSE_FACTOR` or
  more against the run's own recent median (a neighbour's load makes a 2-core machine 10-100x slower).
"""

from __future__ import annotations

import numbers
import os
import statistics
import time
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from innerloop.core.wording import counted
from innerloop.models.params import count_parameters

RATE_WINDOW = 10
"""Training batches (micro-batches under gradient accumulation) over which ``tokens_per_s`` is measured."""
COLLAPSE_FACTOR = 4.0
"""Tokens/s this many times below the run's recent median count as a collapse."""
WARMUP_STEPS = 3
"""First steps of each launch left out of the collapse check (one-off costs: allocation, caches)."""
REFERENCE_STEPS = 10
"""Steps the collapse check needs before the recent ones to compare them with."""
RECENT_STEPS = 5
"""The latest steps whose median tokens/s is compared with the reference median."""


class CPUOversubscribedWarning(UserWarning):
    """Training competes for its CPU cores (more threads than cores, or other processes' load)."""


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def current_cpu_status() -> tuple[int, int, float | None]:
    """``(torch threads, cores available, 1-minute load average or None)`` now."""
    return torch.get_num_threads(), available_cpus(), load_average()


def oversubscription(threads: int, cpus: int, load: float | None) -> str | None:
    """Why ``threads`` torch threads on ``cpus`` cores with a load average of ``load`` (before training
    starts, so it is other processes') are oversubscribed, or None when they are not."""
    if threads > cpus:
        return f"torch uses {counted(threads, 'thread')} but this process may run on {counted(cpus, 'core')}"
    if load is not None and load >= cpus:
        return f"the load average is {load:.1f} on the {counted(cpus, 'core')} this process may run on, before training"
    return None


def _advice(threads: int, cpus: int, load: float | None) -> str:
    load_text = "unknown" if load is None else f"{load:.1f}"
    fewer = "set trainer.threads=1 or " if threads > 1 else ""
    return (
        f"(torch threads {threads}, cores available {cpus}, load average {load_text}). Other processes "
        f"compete for the cores: {fewer}run when the machine is idle; compare runs by steps, not by time "
        "(tokens_per_s in metrics.csv shows when it happened)"
    )


class TrainingThroughput(Callback):
    """Parameter counts, tokens/s, tokens seen and wall time of a run; see the module docstring.

    Args:
        collapse_factor: a drop of tokens/s by this factor against the recent median warns.
        clock: seconds, monotonic (``time.perf_counter``; tests pass a fake one).
        cpu_status: ``() -> (threads, cpus, load_average)`` (:func:`current_cpu_status`; tests simulate a
            loaded machine with it).
        echo: where the printed lines go (``print``).
    """

    def __init__(
        self,
        collapse_factor: float = COLLAPSE_FACTOR,
        clock: Callable[[], float] = time.perf_counter,
        cpu_status: Callable[[], tuple[int, int, float | None]] | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        real = isinstance(collapse_factor, numbers.Real) and not isinstance(collapse_factor, bool)
        if not (real and collapse_factor > 1):  # a str or None was a bare TypeError of '>'
            raise ValueError(
                f"TrainingThroughput: collapse_factor={collapse_factor!r} must be > 1, a number (inf: never warn)"
            )
        self.collapse_factor = collapse_factor
        self.clock = clock
        self.cpu_status = cpu_status or current_cpu_status  # a module function: ddp_spawn pickles callbacks
        self.echo = echo
        self.tokens_seen = 0  # over all processes, every launch
        self.train_seconds = 0.0  # in training steps, every launch
        self._wall_before = 0.0  # wall time of the launches before this one (from the checkpoint)
        self._launch_start: float | None = None
        self._step_start: float | None = None
        self._launch_steps = 0
        # (tokens, seconds) of the last steps: all of them for tokens/s, past the warm-up for the check
        self._rate_steps: deque[tuple[int, float]] = deque(maxlen=RATE_WINDOW)
        self._steps: deque[tuple[int, float]] = deque(maxlen=REFERENCE_STEPS + RECENT_STEPS)
        self.warned = False

    # ---- the counters, kept in the checkpoint ---------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_time(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict["tokens_seen"])
        self.train_seconds = float(state_dict["train_seconds"])
        self._wall_before = float(state_dict["wall_seconds"])

    def wall_time(self) -> float:
        """Seconds since the run's first launch (the time between launches not counted)."""
        running = 0.0 if self._launch_start is None else self.clock() - self._launch_start
        return self._wall_before + running

    def tokens_per_second(self) -> float:
        """Training tokens per second over the last :data:`RATE_WINDOW` training batches (0 before the first)."""
        seconds = sum(s for _, s in self._rate_steps)
        return sum(t for t, _ in self._rate_steps) / seconds if seconds > 0 else 0.0

    # ---- hooks ----------------------------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = count_parameters(pl_module.model)
        if trainer.is_global_zero:
            self.echo(f"model: {counts.describe()}")
        for logger in trainer.loggers:
            logger.log_hyperparams(
                {
                    "params_total": counts.total,
                    "params_embedding": counts.embedding,
                    "params_mixer": counts.mixer,
                    "params_per_block_mixer": list(counts.per_block_mixer),
                }
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._launch_start = self.clock()
        self._launch_steps = 0
        self._steps.clear()
        self._rate_steps.clear()
        threads, cpus, load = self.cpu_status()
        reason = oversubscription(threads, cpus, load)
        if reason is not None:
            self._warn(
                trainer,
                f"the CPU looks oversubscribed: {reason}; training will be slow {_advice(threads, cpus, load)}",
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_start = self.clock()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._step_start is None:
            return
        seconds = self.clock() - self._step_start
        tokens = batch[0].numel() * trainer.world_size  # every process reads a batch of this size
        self.tokens_seen += tokens
        self.train_seconds += seconds
        self._launch_steps += 1
        self._rate_steps.append((tokens, seconds))
        if self._launch_steps > WARMUP_STEPS:
            self._steps.append((tokens, seconds))
            self._check_collapse(trainer)
        self._log_counters(trainer, pl_module, in_training_step=True)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._launch_start is not None:  # a validation of this run (not a sanity check before it)
            self._log_counters(trainer, pl_module, in_training_step=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.train_seconds > 0:
            self.echo(
                f"throughput: {self.tokens_seen:,} tokens seen, {self.tokens_seen / self.train_seconds:,.0f} "
                f"tokens/s in training steps, wall time {self.wall_time():,.1f} s"
            )

    # ---- helpers --------------------------------------------------------------------------------

    def _log_counters(self, trainer: L.Trainer, pl_module: L.LightningModule, in_training_step: bool) -> None:
        """Log the counters into the current row of metrics.csv (a training step's, or a validation's:
        Lightning lets an epoch-end hook log only per epoch). In float64: float32 counts tokens exactly
        only up to 2**24."""
        per_step = {"on_step": in_training_step, "on_epoch": not in_training_step}
        values = {"tokens_seen": self.tokens_seen, "wall_time": self.wall_time()}
        if in_training_step:
            values["tokens_per_s"] = self.tokens_per_second()
        # a validation's row: the counters of the slowest process (the same tokens on every one), reduced
        # on the module's device under several processes: NCCL (DDP on GPUs) reduces no CPU tensor
        synced = {} if in_training_step else {"sync_dist": True, "reduce_fx": "max"}
        device = pl_module.device if synced and trainer.world_size > 1 else None
        for name, value in values.items():
            tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
            pl_module.log(name, tensor, prog_bar=name == "tokens_per_s", batch_size=1, **per_step, **synced)

    def _check_collapse(self, trainer: L.Trainer) -> None:
        """Warn once when the median tokens/s of the last :data:`RECENT_STEPS` steps is
        ``collapse_factor`` below that of the :data:`REFERENCE_STEPS` before them."""
        if self.warned or len(self._steps) < REFERENCE_STEPS + RECENT_STEPS:
            return
        rates = [t / s if s > 0 else float("inf") for t, s in self._steps]
        reference = statistics.median(rates[:-RECENT_STEPS])
        recent = statistics.median(rates[-RECENT_STEPS:])
        if recent * self.collapse_factor <= reference:
            threads, cpus, load = self.cpu_status()
            self._warn(
                trainer,
                f"training throughput collapsed at step {trainer.global_step}: {recent:,.0f} tokens/s, "
                f"{reference / recent:.0f}x below the {reference:,.0f} of the steps before; the CPU threads "
                f"look oversubscribed {_advice(threads, cpus, load)}",
            )

    def _warn(self, trainer: L.Trainer, message: str) -> None:
        if self.warned:
            return
        self.warned = True
        if trainer.is_global_zero:
            # attributed to the hook or check here that found it, not to Lightning's call of the hook
            warnings.warn(message, CPUOversubscribedWarning, stacklevel=2)
