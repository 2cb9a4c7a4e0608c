"""Ctrl-C during ``innerloop train``: finish the step, save it, stop, and say how to continue.

Python turns Ctrl-C (SIGINT) into a ``KeyboardInterrupt`` wherever the program happens to be, which
may be halfway through an optimizer step, so a checkpoint cannot safely be written from there, and a
run that just dies keeps only its last periodic checkpoint (up to ``trainer.checkpoint_every - 1``
steps behind). :class:`StopOnInterrupt` instead takes the first Ctrl-C as a request: the step in
progress completes, Lightning stops the loop, the checkpoint callback writes that step at the end of
training, and :func:`innerloop.train.run.train` raises :class:`TrainingInterrupted` naming the step and
the command that continues it. A second Ctrl-C interrupts at once, as usual (the checkpoint on disk is
always whole: every write is atomic).

The handler is installed only in the main thread, and only where SIGINT has Python's default handler
(a notebook or another program that handles SIGINT itself keeps its own); it is removed when the fit
ends, however it ends.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class TrainingInterrupted(RuntimeError):
    """The run stopped at a Ctrl-C after saving its last completed step; the message says which step
    and how to continue it."""


class StopOnInterrupt(Callback):
    """The first SIGINT stops the run after the current step (see the module docstring)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested = False
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return
        self._previous = signal.signal(signal.SIGINT, self._request_stop)

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C interrupts at once
        print(
            "\ninnerloop train: Ctrl-C: stopping after this step and saving it (press Ctrl-C again to stop "
            "at once, keeping the last checkpoint written)",
            file=sys.stderr,
            flush=True,
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # every process stops at the same step if any was interrupted (a no-op on one process)
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            self.requested = True
            trainer.should_stop = True

    def _restore(self) -> None:
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._request_stop:
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
