"""One two-process training run on CPU (``ddp_spawn``, gloo) that several test files read
(:func:`two_rank_run`): a ``ddp_spawn`` launch costs three interpreters that import Lightning (~22 s of
CPU) before its first step, and the checks of one finished run do not interfere, so the run is paid once
per pytest session, shared by the xdist workers (the first to ask builds it, the others wait for it)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from lm_testing import TINY
from torchmetrics import Metric

from innerloop.train.module import IGNORE_INDEX

TWO_RANK_RUN = [
    *TINY, "trainer.precision=64-true", "trainer.log_every=1", "data.batch_size=5", "trainer.max_steps=4",
    "trainer.val_every=8", "model.ttt.update_rule=momentum",
]  # fmt: skip
"""The shared run's overrides, on top of which :func:`two_rank_run` adds two ``ddp_spawn`` processes:
float64 (2 ranks x batch b and 1 rank x b in 2 micro-batches give the same weights exactly), a row per
step, 5 validation windows (the ranks' shards differ by one, padded and unscored), ``val_every`` past
``max_steps`` (the final validation is the fit's last step's: its row must name that step), and a
momentum model (its unread ``learnable_token_idx`` got no gradient, and DDP refused the first step)."""

TWO_RANKS = ["trainer.devices=2", "trainer.accelerator=cpu", "trainer.strategy=ddp_spawn"]


class RecordMetricStates(L.Callback):
    """Writes, in each process at the end of each validation, which metric states are shared memory
    (another process's updates would land in them) and the tokens this process scored against its
    ``val_ppl``'s own count, before they sync: one JSON line per validation into ``folder/rank<r>.jsonl``."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.scored = folder, 0

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.scored += int((batch[1] != IGNORE_INDEX).sum())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        shared = [
            f"{name}.{state}"
            for name, metric in pl_module.named_modules()
            if isinstance(metric, Metric)
            for state in metric._defaults
            if isinstance(getattr(metric, state), torch.Tensor) and getattr(metric, state).is_shared()
        ]
        seen = {"shared": shared, "count": int(pl_module.val_ppl.count), "scored": self.scored}
        with (self.folder / f"rank{trainer.global_rank}.jsonl").open("a") as file:
            file.write(json.dumps(seen) + "\n")
        self.scored = 0


@contextlib.contextmanager
def stderr_into(path: Path) -> Iterator[None]:
    """File descriptor 2 of this process (and of the processes it starts) into ``path``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("w") as file:
        os.dup2(file.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _train_two_ranks(root: Path) -> None:
    """The run into ``root / "run"``; beside it ``stderr.txt`` (every process's), ``metric_states/``
    (:class:`RecordMetricStates`) and ``result.json`` (the result's metrics and the warnings logged)."""
    from innerloop.config import load_config
    from innerloop.train import train

    for left in (root / "run", root / "metric_states"):  # by a build that failed
        shutil.rmtree(left, ignore_errors=True)
    (root / "metric_states").mkdir()
    run, cfg = load_config("tiny", [*TWO_RANK_RUN, *TWO_RANKS, f"out_dir={root / 'run'}"])
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("innerloop.train.run")
    logger.addHandler(handler)
    try:
        with stderr_into(root / "stderr.txt"):
            result = train(run, cfg, callbacks=[RecordMetricStates(root / "metric_states")])
    finally:
        logger.removeHandler(handler)
    facts = {"metrics": result.metrics, "warnings": warnings, "plot": str(result.plot)}
    (root / "result.json").write_text(json.dumps(facts))


class MetricsNeverSync(L.Callback):
    """Makes torchmetrics skip the evaluation metrics' sync on every process (``bool()`` is False: "not
    distributed"), as a run did once whose val_ppl was rank 0's shard alone (session 41's first full suite)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.val_ppl.distributed_available_fn = bool


def _train_two_ranks_unsynced(root: Path) -> None:
    """2 steps on two ``ddp_spawn`` processes validated at the last (one window), under :class:`MetricsNeverSync` and
    :class:`RecordMetricStates`, into ``root / "run"``; ``raised.json``: the type and message of what the
    run raised (``null`` if nothing)."""
    from lm_testing import two_process_config

    from innerloop.train import train

    for left in (root / "run", root / "metric_states"):  # by a build that failed
        shutil.rmtree(left, ignore_errors=True)
    (root / "metric_states").mkdir()
    # one validation window: rank 1 scores a padding row only, and updates no metric state of its own
    overrides = ["data.batch_size=1", "trainer.max_steps=2", "trainer.val_every=2"]
    run, cfg = two_process_config(root / "run", *overrides)
    raised = None
    try:
        train(run, cfg, callbacks=[MetricsNeverSync(), RecordMetricStates(root / "metric_states")])
    except Exception as error:  # what the tests read
        raised = {"type": type(error).__name__, "message": str(error)}
    (root / "raised.json").write_text(json.dumps(raised))


def _built_once(tmp_path_factory, name: str, build, done: str) -> Path:
    """The folder ``name`` that ``build(folder)`` fills, built once per pytest session: under xdist in the
    workers' common temporary folder, the first worker to ask building it while a lock makes the others
    wait (a build that failed leaves no file ``done``: the next to ask builds again)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    root.mkdir(exist_ok=True)
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (root / done).exists():
            build(root)
    return root


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory) -> Path:
    """The folder of the shared run (:data:`TWO_RANK_RUN` on two ``ddp_spawn`` processes), finished:
    ``run/`` (its ``out_dir``, which a test must not change: copy it to resume it), ``stderr.txt``,
    ``metric_states/`` and ``result.json`` (see :func:`_train_two_ranks`)."""
    return _built_once(tmp_path_factory, "two-rank-run", _train_two_ranks, "result.json")


@pytest.fixture(scope="session")
def unsynced_two_rank_run(tmp_path_factory) -> Path:
    """The folder of a two-process run whose evaluation metrics never sync (see
    :func:`_train_two_ranks_unsynced`): ``metric_states/`` and ``raised.json``."""
    return _built_once(tmp_path_factory, "unsynced-two-rank-run", _train_two_ranks_unsynced, "raised.json")
