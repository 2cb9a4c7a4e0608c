"""Review s56o: attacks on this session's merges that were measured to hold (kept as regression tests).

s56b's ``run_scan_without_autocast`` guards the scan's backward nodes, found by autograd sequence numbers
(per thread). Measured here (TTT-Linear and Titans, width 32, two layers with a linear between them,
bfloat16 and float16 CPU autocast): the gradients of a backward inside the region equal, bit for bit,
those of one outside it, also with the backward on another thread, under reentrant and non-reentrant
activation checkpointing; and no node outside the two scans' sequence windows is guarded (the second
scan's walk stops at its own projections, the first layer's projections keep the region's autocast).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import innerloop.core.layer as layer_module
import innerloop.core.scan as scan_module
from innerloop import TTTLayer

WIDTH = 32


class _TwoLayers(torch.nn.Module):
    def __init__(self, checkpointing: str | None = None) -> None:
        super().__init__()
        self.first, self.second = TTTLayer(WIDTH, 2, kernel="torch"), TTTLayer(WIDTH, 2, kernel="torch")
        self.between = torch.nn.Linear(WIDTH, WIDTH)
        self.checkpointing = checkpointing

    def _run(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing is None:
            return layer(x)[0]
        return checkpoint(lambda t: layer(t)[0], x, use_reentrant=self.checkpointing == "reentrant")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.second, self.between(self._run(self.first, x)))


@pytest.fixture(scope="module")
def two_layers() -> _TwoLayers:
    """One model for the cases (its build runs the layers' checks: 0.3-2 s); each case sets its checkpointing."""
    torch.manual_seed(0)
    return _TwoLayers()


def _gradients(model: torch.nn.Module, x: torch.Tensor, backward: str) -> list[torch.Tensor]:
    """``backward``: "outside" the region, "inside" it, or inside it on "another thread"."""
    x = x.clone().requires_grad_(True)
    wrt = [*model.parameters(), x]
    for tensor in wrt:
        tensor.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).double().square().sum()
        if backward == "inside":
            loss.backward()
    if backward == "outside":
        loss.backward()
    if backward == "another thread":

        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss.backward()

        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    return [t.grad for t in wrt]


# reason: two forward+backward passes of two layers, recomputed under checkpointing (0.4-2 s a case on a
# loaded 2-core machine, over the fast loop's 0.3 s)
@pytest.mark.slow
@pytest.mark.parametrize(
    ("checkpointing", "backward"),
    [(None, "inside"), (None, "another thread"), ("reentrant", "inside"), ("non-reentrant", "inside")],
)
def test_a_backward_inside_autocast_equals_one_outside_for_two_scans(
    two_layers, monkeypatch, checkpointing, backward
):
    model = two_layers
    monkeypatch.setattr(model, "checkpointing", checkpointing)
    x = torch.randn(1, 16, WIDTH, generator=torch.Generator().manual_seed(1))
    outside, inside = _gradients(model, x, "outside"), _gradients(model, x, backward)
    for got, want in zip(inside, outside, strict=True):
        assert torch.equal(got, want)


def _nodes(root: torch.autograd.graph.Node) -> list[torch.autograd.graph.Node]:
    seen, pending, nodes = set(), [root], []
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        pending.extend(child for child, _ in node.next_functions)
    return nodes


def test_only_the_scans_nodes_are_guarded_with_two_layers(monkeypatch):
    windows: list[tuple[int, int]] = []
    guarded_run = scan_module.run_scan_without_autocast

    def recording(*args, **kwargs):
        before = scan_module._last_sequence_number()
        result = guarded_run(*args, **kwargs)
        windows.append((before, scan_module._last_sequence_number()))
        return result

    monkeypatch.setattr(layer_module, "run_scan_without_autocast", recording)
    torch.manual_seed(0)
    model = _TwoLayers()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(1, 16, WIDTH, requires_grad=True))
        nodes = _nodes(y.grad_fn)
        y.float().sum().backward()
    guarded = [node for node in nodes if node.metadata.get(scan_module._GUARDED)]
    assert len(windows) == 2 and guarded
    outside = [node.name() for node in guarded if not any(a < node._sequence_nr() < b for a, b in windows)]
    assert outside == []
    projections = [node for node in nodes if node.name().startswith(("Addmm", "Mm", "Linear"))]
    assert projections and not any(node.metadata.get(scan_module._GUARDED) for node in projections)


# -- s56d: a pending checkpoint this install cannot judge, and --overwrite -----------------------------------


def _newer_pending_beside_a_run(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``out_dir`` with a run's last.safetensors (step 4) and a pending checkpoint (step 6) of a newer format."""
    from test_review_s56_s56d import _training_checkpoint

    from innerloop import checkpoints
    from innerloop.train.run_dir import CHECKPOINT_FILE, PENDING_CHECKPOINT

    out_dir.mkdir(parents=True, exist_ok=True)
    _training_checkpoint(out_dir / CHECKPOINT_FILE, step=4)
    with monkeypatch.context() as newer:
        newer.setattr(checkpoints, "FORMAT_VERSION", str(int(checkpoints.FORMAT_VERSION) + 1))
        return _training_checkpoint(out_dir / PENDING_CHECKPOINT, step=6)


def test_a_pending_checkpoint_that_cannot_be_judged_does_not_block_replacing_the_run(tmp_path, monkeypatch):
    """s56d keeps a pending checkpoint it cannot judge (a newer format, unreadable now, a plugin's other
    settings) and refuses the launch; a launch that replaces the run (``--overwrite``) was refused too,
    though it sets the pending file aside with the previous run's files (put back if it fails): the
    user's explicit replacement blocked until the file was removed by hand."""
    from innerloop.train.run_dir import settle_pending_checkpoint

    pending = _newer_pending_beside_a_run(tmp_path, monkeypatch)
    written = pending.read_bytes()
    assert settle_pending_checkpoint(tmp_path, replacing=True) is None
    assert pending.read_bytes() == written  # kept: --overwrite sets it aside, it is not judged here


# reason: load_config validates the run with Lightning (its first import in the worker: 2-10 s loaded)
@pytest.mark.slow
def test_overwrite_replaces_a_run_whose_pending_checkpoint_is_of_a_newer_format(tmp_path, monkeypatch):
    from lm_testing import TINY as TINY_RUN

    import innerloop.train.run as run_module
    from innerloop.config import load_config

    out = tmp_path / "run"
    pending = _newer_pending_beside_a_run(out, monkeypatch)
    (out / "config.yaml").write_text("{}\n")  # the run's config (what --overwrite replaces)
    run, cfg = load_config("tiny", [*TINY_RUN, f"out_dir={out}"])
    reached = []
    monkeypatch.setattr(run_module, "_train_in_locked_dir", lambda *args, **kwargs: reached.append(kwargs))
    run_module.train(run, cfg, overwrite=True)
    assert reached == [{"replace_previous": True}] and pending.is_file()
