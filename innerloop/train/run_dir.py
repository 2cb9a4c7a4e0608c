"""The out_dir of a training run: one run at a time, no run replaced by accident, no stale temporaries.

- :func:`lock_run_dir`: an exclusive ``fcntl.flock`` on the out_dir itself and on
  ``<out_dir>/.innerloop.lock``, held for the life of a run; the operating system releases them when the
  process ends, even when it is killed. The file holds the holder's pid, so a second run into the same
  out_dir fails at once and names it; the lock on the folder holds even when the lock file is deleted.
- :func:`refuse_previous_run`: a new run into an out_dir that holds one is refused (``--resume``
  continues it; ``--overwrite`` replaces it, :func:`set_aside_previous_run`).
- :func:`refuse_foreign_config`: a ``config.yaml`` that is not an innerloop run's is never replaced.
- :func:`settle_interrupted_overwrite`: before ``--resume`` reads ``config.yaml``, undo (or finish) an
  ``--overwrite`` that was killed.
- :func:`remove_stale_temporaries`: the temporary files that the atomic writes of a killed run left.
- :func:`settle_pending_checkpoint`: a checkpoint a killed run wrote but had not confirmed yet
  (:data:`PENDING_CHECKPOINT`) is kept for ``--resume`` if it is whole and later than
  ``last.safetensors``, and removed otherwise.

All of them act on the out_dir of the process that owns the run; :func:`is_launched_worker` tells the
processes that Lightning's DDP launcher starts for the other ranks (they re-run the same command).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from innerloop.checkpoints import (
    CheckpointError,
    CheckpointUnreadableError,
    NewerCheckpointError,
    PluginSettingsError,
    UnverifiedCheckpointWarning,
    load_checkpoint,
    load_training_checkpoint,
)
from innerloop.config.load import ConfigError, given_flag, read_run_config
from innerloop.config.trainer_args import is_launched_worker as is_launched_worker  # first home: config
from innerloop.core.durable import fsync_directory
from innerloop.data.atomic import atomic_write_text, stale_temporaries
from innerloop.data.text import CHECKPOINT_FILE as CHECKPOINT_FILE  # defined once, in data.text
from innerloop.data.text import PENDING_CHECKPOINT as PENDING_CHECKPOINT  # see settle_pending_checkpoint
from innerloop.train.loggers import SUPERSEDED_METRICS, cut_torn_row

log = logging.getLogger(__name__)

#: The files a training run writes at the top of its out_dir (Lightning's logs go under ``logs/``).
RUN_OUTPUTS = ("config.yaml", CHECKPOINT_FILE, "loss_by_position.csv", "loss_by_position.png")
#: A run is in an out_dir when one of these is there.
RUN_MARKERS = ("config.yaml", CHECKPOINT_FILE, PENDING_CHECKPOINT)
#: What ``--overwrite`` sets aside (and puts back if the new run ends without a checkpoint).
SET_ASIDE_OUTPUTS = (*RUN_OUTPUTS, PENDING_CHECKPOINT)
LOCK_NAME = ".innerloop.lock"


class RunDirError(ConfigError):
    """An out_dir that this run cannot use: another run holds it, or it holds a run already."""


@contextmanager
def lock_run_dir(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive lock on ``out_dir`` (created if needed) for the ``with`` block; yield the lock
    file. Raise :class:`RunDirError` naming the holder's pid if another process holds it. A folder this
    call made that holds nothing but the lock at the end (a run refused before it wrote anything) is
    removed: the out_dir is left as it was.

    Two locks are taken, both released by the operating system when the process ends: one on the folder
    itself (:func:`_lock_the_folder`), which deleting the lock file does not undo, and one on
    :data:`LOCK_NAME` in it, which holds the pid that a refused run names."""
    out_dir = Path(out_dir)
    lock_path = out_dir / LOCK_NAME
    made = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(
            f"out_dir={str(out_dir)!r} cannot be used: {_why_not_a_folder(out_dir, err)}"
        ) from None
    folder_fd = _lock_the_folder(out_dir)
    try:
        with _lock_file_held(out_dir, lock_path) as fd:
            try:
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
                except OSError as err:  # e.g. a full disk: the folder this call made is removed below
                    raise RunDirError(
                        f"out_dir={str(out_dir)!r} cannot be used: writing its lock {str(lock_path)!r} "
                        f"failed: {err.strerror or err}"
                    ) from None
                yield lock_path
            finally:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                if made:
                    _remove_if_only_the_lock(out_dir)
    finally:
        if folder_fd is not None:
            os.close(folder_fd)  # releases the folder's lock


def _why_not_a_folder(out_dir: Path, err: OSError) -> str:
    """Why ``out_dir`` could not be made: the file standing where it or a folder above it goes, named
    (mkdir said only 'File exists' or 'Not a directory'), else ``err``'s reason."""
    blocker = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker is None:
        return str(err.strerror or err)
    return f"{str(blocker)!r} is a file, not a folder; move it, or train into another out_dir"


def _lock_the_folder(out_dir: Path) -> int | None:
    """``flock`` the folder ``out_dir`` and return the descriptor that holds the lock: a lock that
    deleting or replacing the lock file cannot undo (users delete "stale" lock files), so a second run
    is refused while the first lives. A folder that cannot be opened, or a file system that refuses
    locks on folders (e.g. NFS, where an exclusive flock needs a file open for writing), leaves the lock
    file's lock alone in charge, as before (None)."""
    try:
        folder_fd = os.open(out_dir, os.O_RDONLY)
    except OSError as err:
        log.debug("out_dir=%s cannot be opened to lock it (%s); its lock file alone is", out_dir, err)
        return None
    try:
        fcntl.flock(folder_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_pid(out_dir, folder_fd)
        os.close(folder_fd)
        raise _in_use(out_dir, holder) from None
    except OSError as err:
        log.debug("out_dir=%s: the folder cannot be locked (%s); its lock file alone is", out_dir, err)
    return folder_fd


@contextmanager
def _lock_file_held(out_dir: Path, lock_path: Path) -> Iterator[int]:
    """``flock`` :data:`LOCK_NAME` in ``out_dir`` (created if needed) for the ``with`` block; yield its
    descriptor. Raise :class:`RunDirError` naming the pid it holds if another process has it locked."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirError(f"out_dir={str(out_dir)!r} cannot be used: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "unknown"
            raise _in_use(out_dir, holder) from None
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _in_use(out_dir: Path, holder: str) -> RunDirError:
    lock_path = out_dir / LOCK_NAME
    return RunDirError(
        f"out_dir={str(out_dir)!r} is in use by another run (pid {holder}, lock {str(lock_path)!r}); "
        "wait for it to end, or train into another out_dir"
    )


def _holder_pid(out_dir: Path, folder_fd: int) -> str:
    """The pid of the run that holds ``out_dir``'s lock: the one its lock file records, else (the file
    was deleted or emptied) the one the system's lock table gives for the folder (Linux's
    ``/proc/locks``), else ``unknown``."""
    with contextlib.suppress(OSError):
        recorded = (out_dir / LOCK_NAME).read_text(encoding="ascii", errors="replace").strip()
        if recorded:
            return recorded
    stat = os.fstat(folder_fd)
    folder = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text(encoding="ascii", errors="replace").splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == folder:
                return fields[4]
    return "unknown"


def _remove_if_only_the_lock(out_dir: Path) -> None:
    """Remove ``out_dir`` if it holds nothing but its lock file (called holding the lock); a folder that
    another process has begun to use meanwhile is left alone."""
    with contextlib.suppress(OSError):
        if [p.name for p in out_dir.iterdir()] == [LOCK_NAME]:
            (out_dir / LOCK_NAME).unlink()
            out_dir.rmdir()


def refuse_previous_run(out_dir: str | os.PathLike[str]) -> None:
    """Raise :class:`RunDirError` if ``out_dir`` holds a run (its config or checkpoint)."""
    out_dir = Path(out_dir)
    found = [name for name in RUN_MARKERS if (out_dir / name).exists()]
    if found == ["config.yaml"]:  # e.g. a new run killed before its first checkpoint: nothing to resume
        raise RunDirError(
            f"out_dir={str(out_dir)!r} already holds a run's config.yaml but no checkpoint (a run killed "
            "before its first checkpoint leaves it so; it is not removed, as it may be yours): pass "
            f"{given_flag('overwrite')} to start the run again there, or train into another out_dir"
        )
    if found:
        raise RunDirError(
            f"out_dir={str(out_dir)!r} already holds a run ({', '.join(found)}); pass {given_flag('resume')} "
            f"to continue it, {given_flag('overwrite')} to replace it, or train into another out_dir"
        )


def refuse_foreign_config(out_dir: str | os.PathLike[str]) -> None:
    """Raise :class:`RunDirError` if ``out_dir`` holds a ``config.yaml`` that is not an innerloop run's
    (it does not read as a run config, and no checkpoint is beside it): a run writes its own config.yaml
    there, and ``--overwrite`` would remove the user's file, so it is refused even then."""
    out_dir = Path(out_dir)
    config = out_dir / "config.yaml"
    if not config.is_file() or any(
        (out_dir / name).exists() for name in (CHECKPOINT_FILE, PENDING_CHECKPOINT)
    ):
        return
    try:
        read_run_config(config)
    except ConfigError as err:
        raise RunDirError(
            f"out_dir={str(out_dir)!r} holds a config.yaml that is not an innerloop run's ({err}); a run "
            f"writes its own config.yaml there ({given_flag('overwrite')} too): move that file, or train into "
            "another out_dir"
        ) from None


def refuse_foreign_outputs(out_dir: str | os.PathLike[str]) -> None:
    """Raise :class:`RunDirError` if ``out_dir`` holds files named as a run's outputs (its loss plot and
    CSV) but no run (no config.yaml, no checkpoint): a run writes them after its checkpoint, so they are
    someone else's, and the run (``--overwrite`` too) would replace them."""
    out_dir = Path(out_dir)
    if any((out_dir / name).exists() for name in RUN_MARKERS):
        return
    theirs = [name for name in RUN_OUTPUTS if name not in RUN_MARKERS and (out_dir / name).exists()]
    if theirs:
        raise RunDirError(
            f"out_dir={str(out_dir)!r} holds {', '.join(theirs)} but no run (no config.yaml or "
            f"{CHECKPOINT_FILE}): a run writes files of those names there ({given_flag('overwrite')} too); "
            "move them, or "
            "train into another out_dir"
        )


def refuse_outputs_not_files(out_dir: str | os.PathLike[str]) -> None:
    """Raise :class:`RunDirError` if one of a run's output names in ``out_dir`` is something other than a
    file (a folder): a run writes a file there, and ``--overwrite`` sets aside only files."""
    out_dir = Path(out_dir)
    for name in SET_ASIDE_OUTPUTS:
        path = out_dir / name
        if path.exists() and not path.is_file():
            raise RunDirError(
                f"out_dir={str(out_dir)!r} holds {name}, which is a folder, not a file: a run writes its "
                f"{name} there ({given_flag('overwrite')} too, which replaces only files); move it, or train "
                "into another "
                "out_dir"
            )


SET_ASIDE_PREFIX = ".replaced."
"""``--overwrite`` renames the previous run's :data:`SET_ASIDE_OUTPUTS` to ``.replaced.<name>`` until the new
run has written its first checkpoint (see :func:`set_aside_previous_run`)."""
SETTING_ASIDE = ".replaced.incomplete"
"""There while :func:`set_aside_previous_run` renames the previous run's files (before the new run writes
anything) and while :func:`settle_previous_run` puts them back: a launch killed between two renames leaves
it, and every file in place is then the previous run's."""
SET_ASIDE_RECORD = ".replaced.record"
"""The names ``--overwrite`` set aside, written (atomically, on disk) before its first rename and removed
once they are settled: a launch removes or puts back only the files it names. ``.replaced.*`` files
without it (a user's own, or an older innerloop's set-aside) are left alone."""
_RECORD_HEADER = "innerloop --overwrite set these aside (.replaced.<name>):"


def _recorded_set_aside(out_dir: Path) -> list[str] | None:
    """The names :data:`SET_ASIDE_RECORD` lists (None: no record, or a file of that name that is not
    one)."""
    try:
        lines = (out_dir / SET_ASIDE_RECORD).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or lines[0] != _RECORD_HEADER:
        return None
    return [name for name in SET_ASIDE_OUTPUTS if name in lines[1:]]


def _refuse_blocked_set_aside(out_dir: Path, moved: list[str]) -> None:
    """Raise :class:`RunDirError` if a file that setting ``moved`` aside would write over or remove is
    there already: not one this ``--overwrite`` set aside (a user's, or an older innerloop's)."""
    names = [f"{SET_ASIDE_PREFIX}{name}" for name in moved] + [SETTING_ASIDE, SET_ASIDE_RECORD]
    blocking = [name for name in names if os.path.lexists(out_dir / name)]
    if blocking:
        raise RunDirError(
            f"out_dir={str(out_dir)!r} holds {', '.join(blocking)}, which no {SET_ASIDE_RECORD} names (a file of "
            f"yours, or one an older innerloop set aside), where {given_flag('overwrite')} sets the previous "
            f"run's {', '.join(moved)} aside: it is not written over; move it, or train into another out_dir"
        )


def set_aside_previous_run(out_dir: str | os.PathLike[str]) -> list[str]:
    """Rename the :data:`SET_ASIDE_OUTPUTS` of the run in ``out_dir`` (its pending checkpoint too) out of
    the new run's way (``--overwrite``; its ``logs/`` stay), keeping them until the new run has a
    checkpoint: :func:`settle_previous_run` then removes them, or puts them back if the new run ended
    without one (a launch that fails on its data, its first step, or a kill leaves the previous run as it
    was). Their names are recorded (:data:`SET_ASIDE_RECORD`) before the first rename; a ``.replaced.*``
    file already where one goes is refused (:class:`RunDirError`), not written over. Call it holding the
    lock, after :func:`settle_previous_run`. Returns the names set aside."""
    out_dir = Path(out_dir)
    moved = [name for name in SET_ASIDE_OUTPUTS if (out_dir / name).is_file()]
    if not moved:
        return []
    _refuse_blocked_set_aside(out_dir, moved)
    atomic_write_text(out_dir / SET_ASIDE_RECORD, "\n".join([_RECORD_HEADER, *moved]) + "\n")
    (out_dir / SETTING_ASIDE).touch()
    fsync_directory(out_dir)  # on disk before the first rename
    for name in moved:
        os.replace(out_dir / name, out_dir / f"{SET_ASIDE_PREFIX}{name}")
    (out_dir / SETTING_ASIDE).unlink(missing_ok=True)
    log.warning(
        "%s: the previous run's %s in %s %s replaced once this run writes its first checkpoint",
        given_flag("overwrite"),
        ", ".join(moved),
        out_dir,
        "is" if len(moved) == 1 else "are",
    )
    return moved


def _warn_of_unrecorded(out_dir: Path) -> None:
    """Say which ``.replaced.<name>`` files in ``out_dir`` no record names: they are left as they are."""
    found = [
        f"{SET_ASIDE_PREFIX}{name}"
        for name in SET_ASIDE_OUTPUTS
        if (out_dir / f"{SET_ASIDE_PREFIX}{name}").is_file()
    ]
    if found:
        log.warning(
            "%s holds %s but no %s (a file of yours, or one an older innerloop's %s set aside): left as "
            "it is; to put a previous run back, rename .replaced.<name> to <name> yourself",
            out_dir,
            ", ".join(found),
            SET_ASIDE_RECORD,
            given_flag("overwrite"),
        )


def settle_previous_run(out_dir: str | os.PathLike[str]) -> list[str]:
    """Remove a previous run's outputs that ``--overwrite`` set aside (those its
    :data:`SET_ASIDE_RECORD` names) when the run that replaced it has a checkpoint; otherwise put them
    back (over whatever the failed replacement wrote). ``.replaced.*`` files no record names are left
    alone. Call it holding the lock, after the replacing run has ended (or, for a launch that was
    killed, at the next launch). Returns the names settled."""
    out_dir = Path(out_dir)
    recorded = _recorded_set_aside(out_dir)
    if recorded is None:
        _warn_of_unrecorded(out_dir)
        return []
    aside = [name for name in recorded if (out_dir / f"{SET_ASIDE_PREFIX}{name}").is_file()]
    complete = not (
        out_dir / SETTING_ASIDE
    ).is_file()  # else killed while setting aside: all is the old run's
    replaced = complete and (out_dir / CHECKPOINT_FILE).is_file()  # the new run wrote its checkpoint
    # the replacement's unconfirmed first checkpoint goes with it: it must not pair with the old run
    dropped = bool(aside) and complete and not replaced and (out_dir / PENDING_CHECKPOINT).is_file()
    if dropped:
        (out_dir / PENDING_CHECKPOINT).unlink()
    if (
        aside and not replaced and complete
    ):  # from here on all in place is the previous run's, after a kill too
        (out_dir / SETTING_ASIDE).touch()
        fsync_directory(out_dir)
    for name in aside:
        kept = out_dir / f"{SET_ASIDE_PREFIX}{name}"
        if replaced:
            kept.unlink()
        else:
            os.replace(kept, out_dir / name)
    (out_dir / SETTING_ASIDE).unlink(missing_ok=True)
    (out_dir / SET_ASIDE_RECORD).unlink(missing_ok=True)  # last: what it named is settled
    if aside:
        _log_settled(out_dir, aside, replaced, complete, dropped)
    return aside


def _log_settled(out_dir: Path, aside: list[str], replaced: bool, complete: bool, dropped: bool) -> None:
    """Say what :func:`settle_previous_run` did with the previous run's files ``aside``."""
    if replaced:
        log.warning(
            "%s: removed the previous run's %s from %s", given_flag("overwrite"), ", ".join(aside), out_dir
        )
        return
    log.warning(
        "%s: the replacing run %s%s; the previous run's %s are back in %s, as before the %s",
        given_flag("overwrite"),
        "ended without a confirmed checkpoint" if complete else "was killed while it set them aside",
        f" (its unconfirmed first checkpoint {PENDING_CHECKPOINT} is removed)" if dropped else "",
        ", ".join(aside),
        out_dir,
        given_flag("overwrite"),
    )


def settle_interrupted_overwrite(out_dir: str | os.PathLike[str]) -> list[str]:
    """Before ``--resume`` reads the run's ``config.yaml``: :func:`settle_previous_run` what an
    ``--overwrite`` launch that was killed left set aside (holding the lock for it), so that the resume
    reads the config of the run it continues (the previous run's, put back, when the killed one had no
    checkpoint), not the killed launch's. Nothing recorded as set aside (the usual case): nothing is
    done. Raises :class:`RunDirError` if another run holds the out_dir. Returns the names settled."""
    out_dir = Path(out_dir)
    if is_launched_worker() or not (out_dir / SET_ASIDE_RECORD).is_file():
        return []
    with lock_run_dir(out_dir):
        return settle_previous_run(out_dir)


def remove_stale_temporaries(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that atomic writes of :data:`RUN_OUTPUTS` and :data:`PENDING_CHECKPOINT`
    (and of each launch's ``logs/version_<n>/metrics.csv``, ``hparams.yaml`` and the tensorboard logger's
    ``tensorboard/hparams.yaml``) left in ``out_dir`` (a run killed while writing). The pending checkpoint itself is a whole file, judged by :func:`settle_pending_checkpoint`.
    Call it holding the lock, so that no writer of this out_dir is running. Says in one line what it
    removed; returns their paths."""
    out_dir = Path(out_dir)
    stale = stale_temporaries(
        out_dir, (*RUN_OUTPUTS, PENDING_CHECKPOINT, SET_ASIDE_RECORD)
    )  # a checkpoint's size each
    for logs in sorted(out_dir.glob("logs/version_*")):
        stale += stale_temporaries(logs, ["metrics.csv", SUPERSEDED_METRICS, "hparams.yaml"])
        stale += stale_temporaries(logs / "tensorboard", ["hparams.yaml"])  # the tensorboard logger's
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        names = ", ".join(str(p.relative_to(out_dir)) for p in stale)
        log.warning(
            "removed %d temporary file(s) left by an interrupted run in %s: %s", len(stale), out_dir, names
        )
    for metrics in sorted(out_dir.glob("logs/version_*/metrics.csv")):
        if metrics.is_file() and cut_torn_row(metrics):  # a flush's append that was killed
            log.warning("removed the unfinished last row an interrupted run left in %s", metrics)
    return stale


def settle_pending_checkpoint(out_dir: str | os.PathLike[str], replacing: bool = False) -> int | None:
    """Keep or remove the :data:`PENDING_CHECKPOINT` a killed run left in ``out_dir`` (one killed, e.g.
    during a validation, between writing the checkpoint of a step and confirming it at the next step).

    It is kept when it is whole (its checksum matches; format version 1, which has none, is not
    accepted), a training checkpoint whose weights and optimizer state are finite (what the run checked
    before writing it), and holds a later ``global_step`` than ``last.safetensors`` (or there is no
    readable ``last.safetensors``): ``--resume`` then continues from it, and it replaces
    ``last.safetensors`` once the resumed run finds the next step's loss on its weights finite, as in
    the run that wrote it. Otherwise it is removed. Says in one line which, and why; returns the step
    of a kept one. Call it holding the lock. One this process cannot read for a reason that says nothing
    against the file (:data:`_NOT_ABOUT_THE_FILE`: written by a newer innerloop, unreadable to the file
    system now, a plugin registered with other settings) is neither: it is kept, and
    :class:`RunDirError` says so, unless the launch is ``replacing`` the run (``--overwrite``, which sets
    the file aside with the previous run's, put back if the new run ends without a checkpoint)."""
    out_dir = Path(out_dir)
    pending = out_dir / PENDING_CHECKPOINT
    if not pending.is_file():
        return None
    last_step = _step_of(out_dir / CHECKPOINT_FILE)
    try:
        step, problem = _judge_pending(pending, last_step)
    except RunDirError as unjudged:  # the file may be whole: kept
        if not replacing:
            raise
        log.warning(
            "%s: %s, which cannot be judged here (%s), is set aside with the previous run's files: removed once "
            "this run writes its first checkpoint, put back if it ends without one",
            given_flag("overwrite"),
            pending,
            unjudged.__context__,  # the reason _judge_pending gave (raised "from None")
        )
        return None
    if problem is not None:
        pending.unlink()
        log.warning(
            "removed %s, a checkpoint an interrupted run wrote but had not confirmed: %s", pending, problem
        )
        return None
    log.warning(
        "kept %s, the checkpoint of global_step %d that an interrupted run wrote but had not confirmed "
        "(it is whole and later than %s): %s continues from step %d, and it replaces %s once the "
        "next step's loss on its weights is finite",
        pending,
        step,
        f"{CHECKPOINT_FILE} ({'none' if last_step is None else f'global_step {last_step}'})",
        given_flag("resume"),
        step,
        CHECKPOINT_FILE,
    )
    return step


_NOT_ABOUT_THE_FILE = (NewerCheckpointError, CheckpointUnreadableError, PluginSettingsError)
"""Why a checkpoint is not read that says nothing against the file itself: a newer format (an upgrade
reads it), the file system's refusal (permissions, a mount's I/O error), a plugin registered now with
other settings than it was saved with."""


def _judge_pending(pending: Path, last_step: int | None) -> tuple[int, str | None]:
    """The pending checkpoint's global_step, and why it must not be kept (None if it may) beside a
    ``last.safetensors`` of ``last_step`` (None: none there, or not readable)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnverifiedCheckpointWarning)
            checkpoint = load_training_checkpoint(pending)
    except _NOT_ABOUT_THE_FILE as err:  # the file may be whole: never removed for it
        raise RunDirError(
            f"{str(pending)!r}, the latest checkpoint an interrupted run wrote but had not confirmed, cannot "
            f"be judged here ({err}); it is kept: once that is fixed, launch again to continue the run from "
            "it, or remove the file to drop its steps"
        ) from None
    except (CheckpointError, UnverifiedCheckpointWarning) as err:
        return -1, f"it is not a whole checkpoint ({err})"
    step = checkpoint.get("global_step")
    if not isinstance(step, int):
        return -1, f"it records no global_step (got {step!r})"
    if _has_non_finite(checkpoint.get("optimizer_states")):
        return step, f"its optimizer state (global_step {step}) holds NaN or inf"
    if last_step is not None and step <= last_step:
        return step, f"it holds global_step {step}, not later than {CHECKPOINT_FILE}'s {last_step}"
    return step, None


def _step_of(checkpoint: Path) -> int | None:
    """The global_step of a readable training checkpoint, or None (none there, unreadable, corrupt)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnverifiedCheckpointWarning)
            step = load_checkpoint(checkpoint).get("global_step")
    except CheckpointError:
        return None
    return step if isinstance(step, int) else None


def _has_non_finite(tree: Any) -> bool:
    """Whether a floating tensor anywhere in ``tree`` (dicts, lists, tuples) holds NaN or inf."""
    if isinstance(tree, torch.Tensor):
        return tree.is_floating_point() and not bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return any(_has_non_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_has_non_finite(v) for v in tree)
    return False
