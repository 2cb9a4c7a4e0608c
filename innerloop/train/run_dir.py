"""The out_dir of a training run: one run at a time, no run replaced by accident, no stale temporaries.

- :func:`lock_run_dir`: an exclusive ``fcntl.flock`` on ``<out_dir>/.innerloop.lock``, held for the life
  of a run; the operating system releases it when the process ends, even when it is killed. The file
  holds the holder's pid, so a second run into the same out_dir fails at once and names it.
- :func:`refuse_previous_run`: a new run into an out_dir that holds one is refused (``--resume``
  continues it; ``--overwrite`` replaces it, :func:`set_aside_previous_run`).
- :func:`remove_stale_temporaries`: the temporary files that the atomic writes of a killed run left.

All three act on the out_dir of the process that owns the run; :func:`is_launched_worker` tells the
processes that Lightning's DDP launcher starts for the other ranks (they re-run the same command).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from innerloop.config.load import ConfigError
from innerloop.data.atomic import stale_temporaries

log = logging.getLogger(__name__)

#: The files a training run writes at the top of its out_dir (Lightning's logs go under ``logs/``).
CHECKPOINT_FILE = "last.safetensors"
RUN_OUTPUTS = ("config.yaml", CHECKPOINT_FILE, "loss_by_position.csv", "loss_by_position.png")
#: A run is in an out_dir when one of these is there.
RUN_MARKERS = ("config.yaml", CHECKPOINT_FILE)
LOCK_NAME = ".innerloop.lock"
#: A checkpoint written but not yet known good (see ``innerloop.train.run``); stale when a run starts.
PENDING_CHECKPOINT = ".last.safetensors.pending"


class RunDirError(ConfigError):
    """An out_dir that this run cannot use: another run holds it, or it holds a run already."""


def is_launched_worker() -> bool:
    """True in a process that Lightning's DDP launcher started for a rank other than 0 (it re-runs the
    command with ``LOCAL_RANK``/``NODE_RANK`` set); the process of rank 0 owns the out_dir."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in ("LOCAL_RANK", "NODE_RANK"))


@contextmanager
def lock_run_dir(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive lock on ``out_dir`` (created if needed) for the ``with`` block; yield the lock
    file. Raise :class:`RunDirError` naming the holder's pid if another process holds it."""
    out_dir = Path(out_dir)
    lock_path = out_dir / LOCK_NAME
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirError(f"out_dir={str(out_dir)!r} cannot be used: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "unknown"
            raise RunDirError(
                f"out_dir={str(out_dir)!r} is in use by another run (pid {holder}, lock {str(lock_path)!r}); "
                "wait for it to end, or train into another out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        try:
            yield lock_path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def refuse_previous_run(out_dir: str | os.PathLike[str]) -> None:
    """Raise :class:`RunDirError` if ``out_dir`` holds a run (its config or checkpoint)."""
    out_dir = Path(out_dir)
    found = [name for name in RUN_MARKERS if (out_dir / name).exists()]
    if found:
        raise RunDirError(
            f"out_dir={str(out_dir)!r} already holds a run ({', '.join(found)}); pass --resume to continue "
            "it, --overwrite to replace it, or train into another out_dir"
        )


SET_ASIDE_PREFIX = ".replaced."
"""``--overwrite`` renames the previous run's :data:`RUN_OUTPUTS` to ``.replaced.<name>`` until the new
run has written its first checkpoint (see :func:`set_aside_previous_run`)."""


def set_aside_previous_run(out_dir: str | os.PathLike[str]) -> list[str]:
    """Rename the :data:`RUN_OUTPUTS` of the run in ``out_dir`` out of the new run's way (``--overwrite``;
    its ``logs/`` stay), keeping them until the new run has a checkpoint: :func:`settle_previous_run`
    then removes them, or puts them back if the new run ended without one (a launch that fails on its
    data, its first step, or a kill leaves the previous run as it was). Call it holding the lock.
    Returns the names set aside."""
    out_dir = Path(out_dir)
    moved = [name for name in RUN_OUTPUTS if (out_dir / name).is_file()]
    for name in moved:
        os.replace(out_dir / name, out_dir / f"{SET_ASIDE_PREFIX}{name}")
    if moved:
        log.warning(
            "--overwrite: the previous run's %s in %s are replaced once this run writes its first checkpoint",
            ", ".join(moved),
            out_dir,
        )
    return moved


def settle_previous_run(out_dir: str | os.PathLike[str]) -> list[str]:
    """Remove a previous run's outputs that ``--overwrite`` set aside when the run that replaced it has
    a checkpoint; otherwise put them back (over whatever the failed replacement wrote). Call it holding
    the lock, after the replacing run has ended (or, for a launch that was killed, at the next launch).
    Returns the names settled."""
    out_dir = Path(out_dir)
    aside = [name for name in RUN_OUTPUTS if (out_dir / f"{SET_ASIDE_PREFIX}{name}").is_file()]
    if not aside:
        return []
    replaced = (out_dir / CHECKPOINT_FILE).is_file()  # the new run wrote its checkpoint
    for name in aside:
        kept = out_dir / f"{SET_ASIDE_PREFIX}{name}"
        if replaced:
            kept.unlink()
        else:
            os.replace(kept, out_dir / name)
    if replaced:
        log.warning("--overwrite: removed the previous run's %s from %s", ", ".join(aside), out_dir)
    else:
        log.warning(
            "--overwrite: the replacing run ended without a checkpoint; the previous run's %s are back in %s",
            ", ".join(aside),
            out_dir,
        )
    return aside


def remove_stale_temporaries(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that atomic writes of :data:`RUN_OUTPUTS` and :data:`PENDING_CHECKPOINT`
    (and of each launch's ``logs/version_<n>/metrics.csv``) left in ``out_dir`` (a run killed while writing), and a
    :data:`PENDING_CHECKPOINT` never confirmed. Call it holding the lock, so that no writer of this
    out_dir is running. Says in one line what it removed; returns their paths."""
    out_dir = Path(out_dir)
    stale = stale_temporaries(out_dir, (*RUN_OUTPUTS, PENDING_CHECKPOINT))  # a checkpoint's size each
    if (out_dir / PENDING_CHECKPOINT).is_file():
        stale.append(out_dir / PENDING_CHECKPOINT)
    for logs in sorted(out_dir.glob("logs/version_*")):
        stale += stale_temporaries(logs, ["metrics.csv"])
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        names = ", ".join(str(p.relative_to(out_dir)) for p in stale)
        log.warning(
            "removed %d temporary file(s) left by an interrupted run in %s: %s", len(stale), out_dir, names
        )
    return stale
