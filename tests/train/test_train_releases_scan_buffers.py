"""``innerloop.train`` frees the CPU training scans' kept buffers when it ends (review of s11 regressions,
L5): a finished run, or one that raised, leaves none in the process (a notebook, a sweep), while
during the run the buffers are kept and reused from step to step as before."""

from __future__ import annotations

import lightning as L
import pytest
from lm_testing import TINY

from innerloop.config import load_config
from innerloop.kernels.cpu import buffers, release_buffers
from innerloop.train import train

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skips, with the reason, where nothing compiles


class KeptDuringTraining(L.Callback):
    """Records how many scan buffers are kept after each step; raises after ``fail_at`` steps."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.kept: list[int] = []
        self.fail_at = fail_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.kept.append(len(buffers._kept))
        if self.fail_at is not None and len(self.kept) >= self.fail_at:
            raise RuntimeError("a callback's error, mid-run")


@pytest.fixture(autouse=True)
def _no_kept_buffers():
    release_buffers()
    yield
    release_buffers()


def _run(tmp_path, name: str):
    return load_config(
        "tiny", [*TINY, "trainer.max_steps=2", "trainer.val_every=2", f"out_dir={tmp_path / name}"]
    )


@pytest.mark.slow  # reason: ~0.5 s: trains a finished and a failed run
def test_a_finished_or_failed_run_keeps_no_scan_buffers(tmp_path) -> None:
    watch = KeptDuringTraining()
    train(*_run(tmp_path, "done"), callbacks=[watch])
    assert watch.kept and all(kept > 0 for kept in watch.kept), watch.kept  # the kernel kept them
    assert buffers._kept == []

    failing = KeptDuringTraining(fail_at=1)
    with pytest.raises(RuntimeError, match="a callback's error, mid-run"):
        train(*_run(tmp_path, "failed"), callbacks=[failing])
    assert failing.kept == [failing.kept[0]] and failing.kept[0] > 0
    assert buffers._kept == []
