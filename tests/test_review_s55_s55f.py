"""Review s55f: metrics, loggers and evaluation under interrupts, several processes and resume."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
import torch
from torchmetrics import Metric

from innerloop.train.metrics import (
    AllOrNothingAccuracy,
    AllOrNothingUpdate,
    Float64Perplexity,
    InnerLossDiagnostics,
    LossByPosition,
)
from innerloop.train.module import LanguageModelModule


def _states(metric: Metric) -> dict[str, Any]:
    """Copies of a metric's states and of its update count: what an interrupted update must leave."""
    kept = {name: getattr(metric, name).clone() for name in metric._defaults}
    return {**kept, "_update_count": metric._update_count}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype
        if isinstance(a[k], torch.Tensor)
        else a[k] == b[k]
        for k in a
    )


def _interrupted_at(event_number: int, call: Callable[[], None]) -> bool:
    """Run ``call`` with a KeyboardInterrupt raised at its ``event_number``-th traced line (of any frame
    it calls: torchmetrics' wrapper, ``nn.Module.__setattr__``), as a Ctrl-C is raised between two
    bytecodes; whether it was interrupted (False: it ran to its end first)."""
    seen = 0

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal seen
        if event == "line":
            seen += 1
            if seen == event_number:
                raise KeyboardInterrupt
        return trace

    sys.settrace(trace)
    try:
        call()
    except KeyboardInterrupt:
        return True
    finally:
        sys.settrace(None)
    return False


def _vocab_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 7, (2, 5), generator=generator)
    target[0, 1] = -100
    return logits, target


def _loss_batch(seed: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, length, generator=generator), torch.rand(3, length, generator=generator) > 0.3


def _diagnostics_batch(seed: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return seed % 3, torch.rand(4, generator=generator), torch.rand(4, generator=generator)


_MULTI_STATE_METRICS: dict[str, tuple[Callable[[], Metric], Callable[[int], tuple]]] = {
    "perplexity": (lambda: Float64Perplexity(ignore_index=-100), _vocab_batch),
    "loss_by_position": (lambda: LossByPosition(4, varying_lengths=True), lambda s: _loss_batch(s, 6)),
    # the interrupted batch is longer than those before: the sums grow first (two states replaced)
    "loss_by_position_growing": (
        lambda: LossByPosition(4, varying_lengths=True),
        lambda s: _loss_batch(s, 6 if s == 0 else 9),
    ),
    "inner_diagnostics": (lambda: InnerLossDiagnostics(3), _diagnostics_batch),
    "accuracy": (  # the module's val_acc, given the logits' argmax ids
        lambda: AllOrNothingAccuracy(num_classes=7, average="micro", ignore_index=-100),
        lambda s: (_vocab_batch(s)[0].argmax(-1).flatten(), _vocab_batch(s)[1].flatten()),
    ),
}


@pytest.mark.parametrize("name", list(_MULTI_STATE_METRICS))
def test_an_update_interrupted_anywhere_leaves_the_metric_as_before(name: str) -> None:
    """A metric of several states, its ``update`` called directly (validation, a notebook) and interrupted
    between any two of its lines (Ctrl-C between ``total += ...`` and ``count += ...``), is left as
    before the call: its states and update count equal, so a later ``compute()`` is the one of the
    batches it did take. Before s55f the first state kept the batch's sum without its count."""
    make, batch = _MULTI_STATE_METRICS[name]
    metric, reference = make(), make()
    metric.update(*batch(0))
    reference.update(*batch(0))
    before = _states(metric)
    event = 1
    while _interrupted_at(event, lambda: metric.update(*batch(1))):
        assert _same(_states(metric), before), f"interrupted at traced line {event}: states changed"
        event += 1
    assert event > 3  # the update was interrupted at each of its lines before it ran through
    reference.update(*batch(1))
    assert _same(_states(metric), {**_states(reference), "_update_count": 2})


@pytest.mark.slow  # builds a module: about 0.5 s
def test_every_evaluation_metric_of_the_module_updates_all_or_nothing() -> None:
    """The module's evaluation metrics (perplexity, accuracy, loss by position, inner diagnostics), each of
    several states, are all :class:`AllOrNothingUpdate`: ``val_acc`` was torchmetrics' own accuracy,
    whose four counts an interrupt could leave half written."""
    module = LanguageModelModule(
        model={"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 32},
        num_position_buckets=4,
        diagnostics_batches=0,
    )
    metrics = {name: m for name, m in module.named_modules() if isinstance(m, Metric)}
    assert {"val_ppl", "val_acc", "val_loss_by_position", "inner_diagnostics"} <= metrics.keys()
    assert all(len(m._defaults) > 1 for m in metrics.values())
    assert [name for name, m in metrics.items() if not isinstance(m, AllOrNothingUpdate)] == []


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this one process, so that torchmetrics syncs the metric states (it does
    whenever torch.distributed is initialized) as under several processes; destroyed afterwards."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("reason: a process group is already initialized in this test process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # builds a module and a process group: about 0.6 s
def test_an_evaluation_syncs_the_perplexity_once(one_process_group, monkeypatch) -> None:
    """The evaluation's end synced ``val_ppl``'s two sums once for its loss and again for its count of
    scored tokens (and once more for the several-process check: 3 syncs, 6 gathers and 3 barriers per
    validation and process under ``ddp_spawn`` at s55f): each state's sync is a collective, so one sync
    reads them all. The logged values are those of the sums."""
    torch.manual_seed(0)
    module = LanguageModelModule(
        model={"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 32},
        num_position_buckets=4,
        diagnostics_batches=0,
    ).eval()
    with torch.no_grad():
        ids = torch.randint(0, 256, (2, 9))
        module._evaluate_batch((ids[:, :-1], ids[:, 1:]), 0)
    total, count = float(module.val_ppl.total_log_probs), float(module.val_ppl.count)
    syncs = []
    real_sync = type(module.val_ppl).sync
    monkeypatch.setattr(
        type(module.val_ppl), "sync", lambda self, *a, **k: syncs.append(1) or real_sync(self, *a, **k)
    )
    values = {name: value for name, value, _ in module._evaluation_values("val_", "")}
    assert len(syncs) == 1
    assert float(values["val_loss"]) == pytest.approx(total / count, rel=1e-6) and count == 16
