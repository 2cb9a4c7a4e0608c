"""Review s30e: an adversarial last look at the day's changes (f0fcc64..main).

- ``HFDataModule`` refused a checkpoint under a Trainer's epochs of ``n`` batches (``limit_train_batches``,
  ``overfit_batches``) only where its batch was no longer recorded (in a later epoch): one written in the
  first epoch (or at its end, or under ``limit_train_batches=1``, which ``limit not in (None, 1.0)`` took
  for "no limit") was accepted, and its resume read on along the endless stream where the uninterrupted
  run read batches 0 .. n-1 again (batches [353, 346, 353, 346, 257] for [353, 346, 395, 353, 346],
  weights 3e-3 apart). docs/training.md promises such a checkpoint is refused.
- A checkpoint written in ``on_train_batch_end`` (a user's callback calling ``trainer.save_checkpoint``,
  ``ModelCheckpoint(train_time_interval=...)``) at the first micro-batch of an accumulation that starts an
  epoch (or the run) was not rewound to its last optimizer step: its ``completed`` count (one behind, the
  batch not completed yet) was below the surplus, and the rewind's guard left the whole checkpoint as it
  was. Lightning completed the batch on restart while the data restarted at the step boundary, so the
  first resumed step took one micro-batch and later steps paired other batches (weights 1.2e-2 apart).
- Every such batch-end checkpoint the rewind moved to a step boundary resumed with Lightning's loggers'
  step (``_batches_that_stepped``) one ahead of the uninterrupted run's (5 for 4 after 4 steps): the
  restart counts the step of the batch it completes, which the checkpoint's count already held.
- The family layers' q/k L2 norm (``l2_normalize``) turned a finite float32 row of entries 1e20 (its
  sum of squares overflows) into zeros, silently, where the day's overflow-safe RMSNorm/LayerNorm give
  the row's true norm; docs/architecture.md says every norm of the layers scales such a row first.
- Under a ``GradientAccumulationScheduler`` the epochs' optimizer steps differ, and ``_epoch_position``
  (``global_step % steps_per_epoch`` at the current accumulation) started a later epoch mid-stream:
  accumulation 3 then 1 over epochs of 4 batches read batches 2..5 in the second epoch, not 0..3 as
  docs/training.md says every epoch does. It now starts at the count of the epoch's batches Lightning
  processed (0 at an epoch's start, the restored, rewound count on a resume).
- (A guard no test held.) ``overflow_safe_rows``' CPU fast path (a data-dependent branch) is skipped
  while compiling; with it taken, ``torch.compile(RMSNorm, fullgraph=True)`` fails, yet every test passed.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from trainer_testing import FirstTokens

from innerloop.train.data import DataError, HFDataModule
from innerloop.train.module import _rewind_to_the_last_optimizer_step


@pytest.mark.parametrize("limit", [3, 1])
def test_an_hf_checkpoint_in_the_first_of_a_trainer_s_epochs_is_refused(tmp_path, limit) -> None:
    data = HFDataModule(paths=[str(tmp_path / "unread.jsonl")], seq_len=16, batch_size=2, val_batches=1)
    data.trainer = SimpleNamespace(
        num_training_batches=limit, limit_train_batches=limit, global_step=0, accumulate_grad_batches=1,
        world_size=1,
    )  # fmt: skip
    with pytest.raises(DataError, match=rf"limit_train_batches={limit} .*max_steps"):
        data.state_dict()


def test_an_hf_checkpoint_in_an_endless_epoch_records_its_position(tmp_path) -> None:
    data = HFDataModule(paths=[str(tmp_path / "unread.jsonl")], seq_len=16, batch_size=2, val_batches=1)
    data.trainer = SimpleNamespace(
        num_training_batches=float("inf"), limit_train_batches=1.0, global_step=0, accumulate_grad_batches=1,
        world_size=1,
    )  # fmt: skip
    assert data.state_dict() == {"batch": 0, "position": [0, 0, 0]}


def _batch_end_checkpoint(total: int, current: int, stepped: int) -> dict:
    """Lightning's loop state of a checkpoint written in on_train_batch_end (the batch not completed)."""

    def counts(n: int) -> dict:
        return {"ready": n, "started": n, "processed": n, "completed": n - 1}

    progress = {"total": counts(total), "current": counts(current), "is_last_batch": False}
    loop = {"_batches_that_stepped": stepped}  # the loggers' step
    return {"loops": {"fit_loop": {"epoch_loop.batch_progress": progress, "epoch_loop.state_dict": loop}}}


@pytest.mark.parametrize(("total", "current"), [(1, 1), (5, 1), (7, 3)])
def test_a_batch_end_checkpoint_at_an_accumulation_s_first_micro_batch_is_rewound(total, current) -> None:
    checkpoint = _batch_end_checkpoint(total, current, stepped=total // 2)
    _rewind_to_the_last_optimizer_step(checkpoint, accumulate=2)
    # Lightning's restart completes the batch of a batch-end checkpoint (completed = processed there) and
    # counts its optimizer step in the loggers' step: the rewound one is that of the step's last batch
    assert checkpoint == _batch_end_checkpoint(total - 1, current - 1, stepped=total // 2 - 1)


@pytest.mark.slow  # three short float64 fits (~0.6 s)
def test_a_resume_from_a_batch_end_checkpoint_at_the_first_micro_batch_is_the_uninterrupted_run(
    tmp_path,
) -> None:
    import warnings

    import lightning as L
    import torch

    from innerloop.models import ModelConfig, TTTConfig
    from innerloop.train import LanguageModelModule, TextDataModule

    model = ModelConfig(
        hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32, ttt=TTTConfig(mini_batch_size=4)
    )
    path = tmp_path / "first.ckpt"

    class Record(L.Callback):
        def __init__(self, save: bool) -> None:
            self.save, self.batches = save, []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.batches.append(int(batch[0][0, :4].sum()))
            if self.save and len(self.batches) == 1:
                trainer.save_checkpoint(path)

    def fit(save: bool = False, ckpt_path=None) -> tuple[LanguageModelModule, list[int], int]:
        L.seed_everything(0, verbose=False)
        module = LanguageModelModule(model, max_steps=3, warmup_steps=0, diagnostics_batches=0)
        record = Record(save)
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=3, max_epochs=-1, limit_val_batches=0,
            accumulate_grad_batches=2, precision="64-true", logger=False, default_root_dir=tmp_path,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's advice on workers, mid-epoch resumes and the like
            data = TextDataModule(seq_len=16, batch_size=2, val_batches=1)
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module, record.batches, trainer.fit_loop.epoch_loop._batches_that_stepped

    whole, whole_batches, whole_logged_step = fit()
    fit(save=True)
    resumed, resumed_batches, resumed_logged_step = fit(ckpt_path=path)
    assert resumed_batches == whole_batches
    assert resumed_logged_step == whole_logged_step == 3
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters(), strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_family_l2_norm_of_a_finite_row_whose_squares_overflow_is_its_true_norm(dtype) -> None:
    from innerloop.core.family_layers import l2_normalize

    rows = torch.ones(3, 64, dtype=dtype)
    rows[0] *= 1e20 if dtype != torch.float64 else 1e160  # squares beyond the compute dtype's range
    rows[1, 5] = -3e38 if dtype != torch.float64 else -1e300  # one huge entry: the row is (nearly) -e_5
    normed = l2_normalize(rows).double()
    rtol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-14}[dtype]  # the bug gave zeros
    assert torch.allclose(normed[0], torch.full((64,), 0.125, dtype=torch.float64), rtol=rtol, atol=0)
    assert normed[1, 5] == pytest.approx(-1.0, rel=rtol) and normed[1].abs().sum() == pytest.approx(
        1.0, rel=rtol
    )
    assert torch.equal(l2_normalize(rows[2:]), l2_normalize(torch.ones(1, 64, dtype=dtype)))  # unscaled row


@pytest.mark.slow  # two fullgraph compiles with the eager backend (~1.5 s)
def test_the_overflow_safe_norms_compile_in_one_graph_and_scale_there() -> None:
    from innerloop.core.functional import LayerNorm, RMSNorm

    x = torch.ones(2, 8)
    x[0] *= 1e20  # its squares overflow float32
    x[1, 0] = 3.0
    for norm in (RMSNorm(8), LayerNorm(8)):
        compiled = torch.compile(norm, fullgraph=True, backend="eager")
        assert torch.equal(compiled(x), norm(x))
    assert torch.equal(RMSNorm(8)(x)[0], torch.ones(8))  # the huge row's true norm, not 0


@pytest.mark.slow  # one short float64 fit (~0.4 s)
def test_every_epoch_reads_the_stream_s_first_batches_under_an_accumulation_schedule(tmp_path) -> None:
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    from innerloop.models import ModelConfig, TTTConfig
    from innerloop.train import LanguageModelModule, TextDataModule

    model = ModelConfig(
        hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32, ttt=TTTConfig(mini_batch_size=4)
    )

    L.seed_everything(0, verbose=False)
    record = FirstTokens()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=6, max_epochs=2, limit_train_batches=4, limit_val_batches=0,
        precision="64-true", logger=False, default_root_dir=tmp_path, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[record, GradientAccumulationScheduler({0: 3, 1: 1})],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and the like
        trainer.fit(
            LanguageModelModule(model, max_steps=6, warmup_steps=0, diagnostics_batches=0),
            datamodule=TextDataModule(seq_len=16, batch_size=2, val_batches=1),
        )
    assert record.batches[4:] == record.batches[:4]  # the second epoch reads batches 0 .. 3 again
