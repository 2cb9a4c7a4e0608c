"""Review s31d: an adversarial look at the day's diff (0828fac..2549e55); report: /work/notes/review_s31d.md.

- the scan's out-of-memory rewording rebuilt every allocation failure as ``type(error)(message)``: a
  plugin's own ``MemoryError`` subclass whose ``__init__`` takes other arguments came out as an unrelated
  ``TypeError`` (its type, which callers catch, lost);
- ``trainer.test`` (and ``trainer.validate``) of a batch of token ids alone, which ``trainer.predict``
  takes, failed as ``too many values to unpack`` or, for two-row batches, as the model's complaint about
  a 1-D ``input_ids`` of shape ``(T,)`` (the batch unpacked into its rows);
- the run's progress bar was rich's even when written to a file (a cluster job's log), where rich
  prints nothing until the run ends; tqdm's writes each step's progress and loss.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from trainer_testing import SMALL_MODEL

import innerloop
from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.train import LanguageModelModule
from innerloop.train import run as run_module

# ------------------------------------------------------------------------------------------------
# Finding 1: a plugin's MemoryError subclass became a TypeError
# ------------------------------------------------------------------------------------------------


class PoolExhausted(MemoryError):
    """A plugin's own allocation failure, whose constructor takes two arguments."""

    def __init__(self, pool: str, need: int) -> None:
        super().__init__(f"pool {pool} exhausted, {need} bytes needed")
        self.pool, self.need = pool, need


def test_a_plugins_memory_error_subclass_keeps_its_type_and_fields_and_gets_the_advice(monkeypatch):
    def fail(*args: object, **kwargs: object) -> None:
        raise PoolExhausted("scratch", 4096)

    monkeypatch.setattr(DualForm, "forward", fail)
    with pytest.raises(PoolExhausted) as caught:  # was: TypeError: __init__() missing ... 'need'
        innerloop.TTTLayer(8, 2, mini_batch_size=4, kernel="torch")(torch.randn(1, 5, 8))
    assert caught.value.need == 4096 and str(caught.value) == "pool scratch exhausted, 4096 bytes needed"
    notes = "\n".join(getattr(caught.value, "__notes__", ()))
    assert "mini_batch_size=4" in notes and "smaller mini_batch_size" in notes


def test_torchs_own_allocation_failure_is_still_reworded_as_its_own_type(monkeypatch):
    def fail(*args: object, **kwargs: object) -> None:
        raise MemoryError()

    monkeypatch.setattr(DualForm, "forward", fail)
    with pytest.raises(MemoryError, match="^the inner scan ran out of memory") as caught:
        innerloop.TTTLayer(8, 2, mini_batch_size=4, kernel="torch")(torch.randn(1, 5, 8))
    assert type(caught.value) is MemoryError and "MemoryError" in str(caught.value)


# ------------------------------------------------------------------------------------------------
# Finding 2: trainer.test / trainer.validate of batches that are not (inputs, targets) pairs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "got"),
    [
        (torch.zeros(2, 16, dtype=torch.long), "a tensor of shape (2, 16)"),  # was: input_ids ... (16,)
        (torch.zeros(3, 16, dtype=torch.long), "a tensor of shape (3, 16)"),  # was: too many values to unpack
        ([torch.zeros(2, 16, dtype=torch.long)], "a list of shape (2, 16)"),  # a TensorDataset's batch
        ((torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 15, dtype=torch.long)), "(2, 15)"),
    ],
)
@pytest.mark.parametrize("step", ["test_step", "validation_step", "training_step"])
def test_an_evaluation_batch_that_is_not_a_pair_is_refused_saying_what_came(batch, got, step):
    module = LanguageModelModule(SMALL_MODEL)
    with pytest.raises(TypeError, match=r"\(inputs \[B, T\], targets \[B, T\]\) pairs") as caught:
        getattr(module, step)(batch, 0)
    assert got in str(caught.value) and "trainer.predict" in str(caught.value)


def test_an_evaluation_pair_still_evaluates() -> None:
    module = LanguageModelModule(SMALL_MODEL, diagnostics_batches=0)
    ids = torch.randint(0, 256, (2, 9))
    module.test_step((ids[:, :-1], ids[:, 1:]), 0)
    assert module.val_ppl.mean_loss().isfinite()


# ------------------------------------------------------------------------------------------------
# Finding 3: rich's bar written to a file shows nothing until the run ends
# ------------------------------------------------------------------------------------------------


def test_the_progress_bar_is_tqdms_when_rich_cannot_draw_as_the_run_goes(monkeypatch) -> None:
    monkeypatch.setattr(run_module, "_rich_bar_shows", lambda: False)
    (bar,) = run_module._progress_bar(True, [], log_every=25)
    assert type(bar) is TQDMProgressBar  # Lightning's own default would be rich's, when it is installed
    assert bar.refresh_rate == 25  # in a log file every redraw stays: one per trainer.log_every steps
    monkeypatch.setattr(run_module, "_rich_bar_shows", lambda: True)
    (bar,) = run_module._progress_bar(True, [])
    assert isinstance(bar, run_module._StepsProgressBar)
    assert run_module._progress_bar(False, []) == []
    mine = TQDMProgressBar()
    assert run_module._progress_bar(True, [mine]) == []


def test_rich_draws_only_on_a_terminal(monkeypatch) -> None:
    pytest.importorskip("rich")
    for variable in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS"):
        monkeypatch.delenv(variable, raising=False)

    class File:  # what sys.stdout is under `innerloop train > log.txt`
        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return self.terminal

    monkeypatch.setattr("sys.stdout", File())
    File.terminal = False
    assert not run_module._rich_bar_shows()
    File.terminal = True
    assert run_module._rich_bar_shows()
