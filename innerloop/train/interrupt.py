"""Ctrl-C during ``innerloop train``: finish the step, save it, stop, and say how to continue.

Python turns Ctrl-C (SIGINT) into a ``KeyboardInterrupt`` wherever the program happens to be, which
may be halfway through an optimizer step, so a checkpoint cannot safely be written from there, and a
run that just dies keeps only its last periodic checkpoint (up to ``trainer.checkpoint_every - 1``
steps behind). :class:`StopOnInterrupt` instead takes the first Ctrl-C as a request: the step in
progress completes and becomes the fit's last (:func:`end_the_fit_after_this_step`), the checkpoint
callback writes it as it writes a periodic checkpoint (so the resumed run logs the rows an uninterrupted
one does), and :func:`innerloop.train.run.train` raises :class:`TrainingInterrupted` naming the step and
the command that continues it. A second Ctrl-C interrupts at once, as usual (the checkpoint on disk is
always whole: every write is atomic), and ``train`` raises :class:`TrainingInterrupted` naming the last
checkpoint, with the shell's status for Ctrl-C, 130 (Lightning's own handling exits 1).

SIGTERM (a job scheduler's stop, ``docker stop``, ``kill``) is taken the same way: Lightning's own
handler would end the run at the next batch, without saving the steps since the last checkpoint and,
through ``SystemExit``, with exit status 0, as if it had finished. A second SIGTERM ends the process at
once.

The SIGINT handler is installed only in the main thread, and only where SIGINT has Python's default
handler (a notebook or another program that handles SIGINT itself keeps its own, and one started with
SIGINT ignored, as a shell without job control starts a background command, keeps it ignored), for the
duration of ``trainer.fit`` (:meth:`StopOnInterrupt.listening`); the previous handler is back when it
returns or raises. The SIGTERM handler replaces Lightning's when training starts, in the main thread; Lightning
puts back the handler from before the fit when the fit ends. Around the fit, ``listening`` takes SIGTERM
too, for a main process that only waits (``ddp_spawn``): it passes the request on to the processes it
started as SIGUSR1 (not SIGTERM, which a ``kill`` of the whole group gave them already: twice, it would
stop them at once); those take SIGINT and SIGUSR1 as stop requests from the start of their training.

The run's final validation is the last step's, inside the fit: a stop asked for during it (or during
the last step) waits for its end, as during any validation, and ``train`` then raises
:class:`TrainingInterrupted` before the loss-by-position files are written. A validation after the fit
(a finished run resumed: the files written again) runs under :func:`ended_by_signals`: there is no step
left to save, so a Ctrl-C or SIGTERM ends it and ``train`` raises :class:`TrainingInterrupted` with the
signal's status.

A stop never lands between the micro-batches of one optimizer step: :class:`StopOnInterrupt` waits for
the step's last one (as the language-model module does for other stops, ``trainer.max_time`` or a
callback's ``trainer.should_stop``: ``LanguageModelModule.on_train_batch_end``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class TrainingInterrupted(RuntimeError):
    """The run stopped at a Ctrl-C or SIGTERM after saving its last completed step; the message says
    which step and how to continue it. ``exit_code`` is the shell's for a process ended by that signal
    (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int = 128 + signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

RANK_STOP_SIGNAL = getattr(signal, "SIGUSR1", None)
"""How a main process that only waits (ddp_spawn) passes a SIGTERM on to the processes it started (None
where the platform has no SIGUSR1)."""


class StopOnInterrupt(Callback):
    """The first SIGINT stops the run after the current step (see the module docstring).

    The handler is installed by :meth:`listening`, around ``trainer.fit``, not from a fit hook:
    Lightning records the signal handlers when a fit starts and puts them back when it ends, after the
    fit hooks have run, which would leave a hook's handler installed after the run.
    """

    def __init__(self, watch: Sequence[Path] = ()) -> None:
        self.requested = False
        self.signal: int | None = None  # the signal that asked for the stop
        self.stopped_at_once = False  # a second Ctrl-C interrupted the step (Lightning then exits 1)
        self.keyboard_interrupt = False  # a KeyboardInterrupt ended the fit (Lightning then exits 1)
        self.watch = tuple(watch)  # checkpoint files: whether one existed when the stop was asked for
        self.had_checkpoint = False

    @property
    def signal_name(self) -> str:
        """How the stop was asked for, in words."""
        return SIGNAL_NAMES.get(self.signal, "a stop request")  # None (no signal) too

    @contextmanager
    def listening(self) -> Iterator[None]:
        """Take SIGINT as a stop request inside the ``with`` block (see the module docstring)."""
        self.requested, self.signal, self.stopped_at_once = False, None, False
        self.had_checkpoint = self.keyboard_interrupt = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        # SIGTERM whatever SIGINT's handler: a shell without job control starts `innerloop train ... &`
        # with SIGINT ignored, and a scheduler's SIGTERM during the set-up would end the run unsaid
        previous_term = signal.signal(signal.SIGTERM, self._request_stop_of_every_process)
        previous = signal.getsignal(signal.SIGINT)
        if previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._request_stop)
        try:
            yield
        finally:
            # also where SIGINT was not taken: Lightning sets it to SIG_IGN when a KeyboardInterrupt ends a fit
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_term)

    def _request_stop_of_every_process(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM before the fit's own handler is installed, or in a main process that only waits for
        the processes ddp_spawn started: a stop request, passed on to those processes as
        :data:`RANK_STOP_SIGNAL` (not as SIGTERM, which they may have had from the same ``kill`` of the
        whole group, and whose second arrival stops at once)."""
        self._request_stop(signum, frame)
        if RANK_STOP_SIGNAL is not None:
            for child in multiprocessing.active_children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, RANK_STOP_SIGNAL)

    def _request_stop_quietly(self, signum: int, frame: FrameType | None) -> None:
        """A spawned process's stop request passed on by its main process: idempotent, never at once."""
        if not self.requested:
            self._request_stop(signal.SIGTERM, frame)
            signal.signal(signal.SIGTERM, self._request_stop)  # the main process said it: not yet "again"

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            self.had_checkpoint = any(path.exists() for path in self.watch)
        self.requested, self.signal = True, signum
        # a second signal interrupts at once
        signal.signal(signum, self._interrupt_at_once if signum == signal.SIGINT else signal.SIG_DFL)
        again = "press Ctrl-C again" if signum == signal.SIGINT else "send SIGTERM again"
        print(
            f"\ninnerloop train: {self.signal_name}: stopping after this step and saving it ({again} to stop "
            "at once, keeping the last checkpoint written)",
            file=sys.stderr,
            flush=True,
        )

    def _interrupt_at_once(self, signum: int, frame: FrameType | None) -> None:
        """The second Ctrl-C: Python's own KeyboardInterrupt, remembered (Lightning turns it into
        ``exit(1)``; :func:`innerloop.train.run.train` raises :class:`TrainingInterrupted` instead)."""
        self.stopped_at_once = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Remember a KeyboardInterrupt (a second Ctrl-C, a callback's, one another SIGINT handler
        raised), which Lightning turns into ``exit(1)``: :func:`innerloop.train.run.train` raises
        :class:`TrainingInterrupted` instead."""
        self.keyboard_interrupt = self.keyboard_interrupt or isinstance(exception, KeyboardInterrupt)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installed its SIGTERM handler when the fit started (after the fit-start hooks)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._request_stop)
            # A process ddp_spawn started trains where no listening() runs (its main process only waits):
            # a terminal's Ctrl-C, which reaches the whole process group, is its stop request too
            spawned = multiprocessing.parent_process() is not None
            if spawned and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signal.signal(signal.SIGINT, self._request_stop)
            if spawned and RANK_STOP_SIGNAL is not None:  # a SIGTERM its main process had, passed on
                signal.signal(RANK_STOP_SIGNAL, self._request_stop_quietly)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # every process stops at the same step if any was interrupted (a no-op on one process)
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.requested = True
        if optimizer_step_ends_here(trainer, batch_idx):  # the optimizer step is whole
            end_the_fit_after_this_step(trainer)


def optimizer_step_ends_here(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the training batch ``batch_idx`` (in ``on_train_batch_end``) ends an optimizer step: the
    last of ``accumulate_grad_batches`` micro-batches, or an epoch's last batch, on which Lightning steps
    whatever the count (an epoch of 7 batches under ``accumulate_grad_batches=3`` steps after its 3rd,
    6th and 7th) unless the strategy accumulates itself (DeepSpeed).

    Read from Lightning's public loop state (the epoch loop's ``batch_progress``, which counts the
    batches of the epoch as a resumed run does too, and ``trainer.num_training_batches``), as its
    training loop decides it (checked against the optimizer's own steps with Lightning 2.6:
    ``test_optimizer_step_ends_here_says_where_lightning_steps``). ``batch_idx`` is the hook's, unused:
    after a resume inside an epoch it need not count from the epoch's start."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    batches = progress.current.ready  # of this epoch, this one included
    accumulated = batches % trainer.accumulate_grad_batches == 0
    epoch_ends = batches == trainer.num_training_batches or progress.is_last_batch
    return accumulated or (epoch_ends and not trainer.strategy.handles_gradient_accumulation)


def end_the_fit_after_this_step(trainer: L.Trainer) -> None:
    """Make the optimizer step just taken the fit's last, as if ``trainer.max_steps`` ended there.

    Not through ``trainer.should_stop``: Lightning takes that as an early stop, which adds a validation
    and a ``metrics.csv`` row that an uninterrupted run does not have at that step, so a stopped and
    resumed run would not log what the uninterrupted one logs. Ended like this, the fit runs what the
    step would have run anyway (its validation, at ``trainer.val_every``), and the checkpoint of the step
    is written where a periodic one is (``_SafetensorsModelCheckpoint.on_train_batch_end``), which a
    resume continues from as from any periodic checkpoint."""
    trainer.fit_loop.epoch_loop.max_steps = trainer.global_step  # never past max_steps: it is not reached


@contextmanager
def ended_by_signals(message: str) -> Iterator[None]:
    """Around the validation after training (there is no step left to save): the first Ctrl-C or
    SIGTERM ends it (Ctrl-C at once, SIGTERM at Lightning's next batch) and raises
    :class:`TrainingInterrupted` ``"stopped at <signal> <message>"`` with the signal's exit status (130,
    143), also when the validation had reached its end, as its outputs are not written. Without this,
    Lightning turns them into ``SystemExit``: 1 for Ctrl-C and 0, as if finished, for SIGTERM. The
    handlers are installed in the main thread only, SIGINT only where it has Python's default handler;
    the previous ones (SIGINT's also where it was not taken) are back when the block ends."""
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt

    previous = {}
    if threading.current_thread() is threading.main_thread():
        # put back also where not taken: Lightning sets SIGINT to SIG_IGN when a KeyboardInterrupt ends a loop
        previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
        if previous[signal.SIGINT] is signal.default_int_handler:
            signal.signal(signal.SIGINT, on_signal)
        # the validation adds Lightning's SIGTERM handler to this one (it ends the loop at the next batch)
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_signal)
    try:
        try:
            yield
        except (KeyboardInterrupt, SystemExit) as err:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            if not received and not isinstance(err, SIGTERMException):
                raise
            received.append(signal.SIGTERM)
        if received:
            name = SIGNAL_NAMES.get(received[0], "a signal")
            raise TrainingInterrupted(f"stopped at {name} {message}", exit_code=128 + received[0])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
