"""The loggers of a run (the config's ``logger``: ``csv``, ``tensorboard``, ``wandb`` or a list).

Each writes under ``<out_dir>/logs/``, all of one launch in one folder ``version_<n>``:

- ``csv``: ``logs/version_<n>/metrics.csv`` (Lightning's CSVLogger; each flush's rows are appended whole
  or not at all, a rewrite under new columns is atomic) and ``hparams.yaml`` (written atomically here); a resume moves
  the rows earlier launches logged past its checkpoint into ``metrics.superseded.csv`` beside theirs;
- ``tensorboard``: ``logs/version_<n>/tensorboard/events.out.tfevents.*`` (``tensorboard --logdir
  <out_dir>/logs``) and its ``hparams.yaml`` (written atomically here);
- ``wandb``: a Weights & Biases run in ``logs/wandb/`` (``WANDB_MODE=offline`` keeps it on this
  machine; ``wandb sync`` uploads it later).

``<n>`` is chosen once per launch, when the first logger writes (after ``--overwrite`` has removed the
run it replaces), and shared by the loggers: one launch, one folder.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from innerloop.config.trainer_args import logger_names
from innerloop.data.atomic import atomic_write

LOGS_DIR = "logs"


SUPERSEDED_METRICS = "metrics.superseded.csv"
"""Beside a launch's ``metrics.csv``: its rows a resumed launch logged again (:func:`supersede_rows_logged_past`)."""


def supersede_rows_logged_past(out_dir: str | Path, step: int) -> list[Path]:
    """Before a resume from the checkpoint of ``step``: move the rows that earlier launches logged past it
    (a crash or kill after they were logged) out of their ``metrics.csv``, into :data:`SUPERSEDED_METRICS`
    beside it (appended, nothing dropped), since this launch logs those steps again. A training row is
    past it when its ``step`` is ``step`` or later, a validation row when its ``val_step`` is later (the
    validation at the checkpoint's own step ran before it, and is not run again). Each file is rewritten
    atomically, the superseded rows first. Returns the ``metrics.csv`` files changed."""
    changed = []
    for metrics in sorted(Path(out_dir, LOGS_DIR).glob("version_*/metrics.csv")):
        with open(metrics, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            header, rows = list(reader.fieldnames or []), list(reader)
        past = [row for row in rows if _logged_past(row, step)]
        if not past:
            continue
        superseded = metrics.with_name(SUPERSEDED_METRICS)
        earlier, columns = [], list(header)
        if superseded.is_file():
            with open(superseded, newline="", encoding="utf-8") as file:
                reader = csv.DictReader(file)
                earlier = list(reader)
                columns += [c for c in reader.fieldnames or [] if c not in columns]
        # a resume killed after writing the superseded rows, before metrics.csv, left them in both
        moved_already = [row for row in past if _row_among(row, earlier, header)]
        _write_rows(superseded, columns, earlier + [row for row in past if row not in moved_already])
        _write_rows(metrics, header, [row for row in rows if not _logged_past(row, step)])
        changed.append(metrics)
    return changed


def _row_among(row: dict[str, str], rows: list[dict[str, str]], header: list[str]) -> bool:
    """Whether ``rows`` hold ``row`` (the same value in each column of ``header``, the columns of its
    ``metrics.csv``): one ``metrics.csv``'s rows are each a step's of one launch, so only a second move of
    the same row matches."""
    values = [row.get(column) or "" for column in header]
    return any([other.get(column) or "" for column in header] == values for other in rows)


def _logged_past(row: dict[str, str], step: int) -> bool:
    """Whether a ``metrics.csv`` row is of a step after the checkpoint of ``step`` (see
    :func:`supersede_rows_logged_past`)."""
    try:
        if row.get("val_step"):
            return float(row["val_step"]) > step
        return bool(row.get("step")) and int(float(row["step"])) >= step
    except ValueError:  # not a number: not a row of a step
        return False


def _write_rows(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(text.getvalue().encode()))


class _LaunchVersion:
    """The ``<n>`` of ``logs/version_<n>`` for this launch: one more than the largest there, or 0;
    computed on first use and then fixed, so every logger of the launch writes into the same folder."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.value: int | None = None

    def __call__(self) -> int:
        if self.value is None:
            found = [
                int(d.name.removeprefix("version_"))
                for d in (self.logs.iterdir() if self.logs.is_dir() else [])
                if d.is_dir() and d.name.startswith("version_") and d.name.removeprefix("version_").isdigit()
            ]
            self.value = max(found, default=-1) + 1
        return self.value


def append_whole(path: Path, data: bytes) -> None:
    """Append ``data`` (whole rows) to the file ``path``, or nothing: a write that fails partway (a full
    disk, a Ctrl-C) cuts the file back to its size before. A kill partway leaves part of a row, which
    :func:`cut_torn_row` removes at the next launch."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
        except BaseException as err:
            os.ftruncate(fd, size)
            if isinstance(err, OSError) and err.errno is not None and str(path) not in str(err):
                raise OSError(err.errno, f"appending to {str(path)!r} failed: {err.strerror or err}") from err
            raise
    finally:
        os.close(fd)


def cut_torn_row(path: Path) -> bool:
    """Cut the file ``path`` back to its last whole line (one a killed :func:`append_whole` left
    unfinished: a number cut short reads as another number); True if there was one to cut."""
    with open(path, "r+b") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return False
        file.seek(max(0, size - 1))
        if file.read(1) == b"\n":
            return False
        end = size
        while end > 0:  # back, a block at a time, to the last line's end
            start = max(0, end - 65536)
            file.seek(start)
            newline = file.read(end - start).rfind(b"\n")
            if newline >= 0:
                file.truncate(start + newline + 1)
                return True
            end = start
        file.truncate(0)
        return True


class _AtomicExperimentWriter(ExperimentWriter):
    """Lightning's ``metrics.csv`` writer, except that each write of the file is atomic (Lightning appends
    rows in place, and truncates the file to write it again when new columns appear: a full disk or a
    kill meanwhile tore a row or lost the log), and so is each write of ``hparams.yaml`` (Lightning's
    left a kill an empty file). Rows under the same columns are appended (:func:`append_whole`: a
    rewrite of the whole file at each flush costs as much as the run's log, ~0.25 s at 100,000 rows)."""

    def _check_log_dir_exists(self) -> None:
        """Lightning's check (a warning, and the old ``metrics.csv`` removed) only where a
        ``metrics.csv`` is there: the launch's folder holding another logger's files of the same launch
        (``tensorboard/``, when that logger was made first) is not "previous log files"."""
        if self._fs.isfile(self.metrics_file_path):
            super()._check_log_dir_exists()

    def log_hparams(self, params: dict[str, Any]) -> None:
        """Record ``params`` and write all recorded ones to ``hparams.yaml``, atomically."""
        self.hparams.update(params)
        target = Path(self.log_dir) / self.NAME_HPARAMS_FILE
        atomic_write(target, lambda tmp: save_hparams_to_yaml(tmp, self.hparams))

    def save(self) -> None:
        """Write the recorded rows: appended whole, or not at all (:func:`append_whole`; Lightning's
        append left a torn last row at a full disk, a number cut short); under new columns, the file
        with its header and the rows so far, replaced atomically."""
        if not self.metrics:
            return
        new_keys = self._record_new_keys()
        path = Path(self.metrics_file_path)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
        if path.is_file() and not new_keys:  # appended: a rewrite's cost grows with the run
            writer.writerows(self.metrics)
            append_whole(path, text.getvalue().encode("utf-8"))
            self.metrics = []
            return
        writer.writeheader()  # a new file, or new columns: the header, and the rows so far under it
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as file:
                writer.writerows(csv.DictReader(file))
        writer.writerows(self.metrics)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(text.getvalue().encode("utf-8")))
        self.metrics = []


class _CSVLogger(CSVLogger):
    """Lightning's CSVLogger (``logs/version_<n>/metrics.csv``) with :class:`_AtomicExperimentWriter`,
    its version chosen by the launch's :class:`_LaunchVersion` when one is given."""

    def __init__(self, *args: Any, launch_version: _LaunchVersion | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._launch_version = launch_version

    def _get_next_version(self) -> int:
        return self._launch_version() if self._launch_version is not None else super()._get_next_version()

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AtomicExperimentWriter(log_dir=self.log_dir)
        return self._experiment


class _TensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger in ``logs/version_<n>/tensorboard``, ``<n>`` the launch's."""

    def __init__(self, *args: Any, launch_version: _LaunchVersion, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._launch_version = launch_version

    def _get_next_version(self) -> int:
        return self._launch_version()

    @rank_zero_only
    def save(self) -> None:
        """Lightning's (flush the events; write ``hparams.yaml`` once, when the folder exists and the
        file does not), with ``hparams.yaml`` written atomically: Lightning writes it in place, and a run
        killed meanwhile left an empty or partial file."""
        super(TensorBoardLogger, self).save()  # the events, as TensorBoardLogger's own parent flushes them
        target = Path(self.log_dir) / self.NAME_HPARAMS_FILE
        if Path(self.log_dir).is_dir() and not target.is_file():
            atomic_write(target, lambda tmp: save_hparams_to_yaml(tmp, self.hparams))


class _WandbLogger(WandbLogger):
    """Lightning's WandbLogger, its run files in ``save_dir`` (``logs/wandb/``): the folder is made when
    the run starts (wandb writes into the system's temporary folder when ``save_dir`` does not exist).
    ``WANDB_MODE`` decides whether it uploads (``offline``: never)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:  # a wandb Run (a stand-in on ranks other than 0)
        if self._experiment is None:
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
        return WandbLogger.experiment.fget(self)


def build_loggers(logger: object, out_dir: str | Path) -> list[Logger]:
    """The loggers named by ``logger`` (a name or a list of names, already validated by the config),
    writing under ``<out_dir>/logs``."""
    logs = Path(out_dir) / LOGS_DIR
    version = _LaunchVersion(logs)
    built: list[Logger] = []
    for name in logger_names(logger):
        if name == "csv":
            built.append(_CSVLogger(out_dir, name=LOGS_DIR, launch_version=version))
        elif name == "tensorboard":
            built.append(
                _TensorBoardLogger(
                    out_dir,
                    name=LOGS_DIR,
                    sub_dir="tensorboard",
                    default_hp_metric=False,
                    launch_version=version,
                )
            )
        elif name == "wandb":
            built.append(
                _WandbLogger(name=Path(out_dir).resolve().name, save_dir=str(logs), project="innerloop")
            )
        else:
            raise ValueError(f"logger={name!r} is not a logger; valid: csv, tensorboard, wandb")
    return built
