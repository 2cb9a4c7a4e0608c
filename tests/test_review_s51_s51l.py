"""Review s51l: the LightningModule as a Lightning user drives it (their own Trainer, data, checkpoints)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from innerloop.core.diagnostics import inner_loss_before_after
from innerloop.train import IGNORE_INDEX, LanguageModelModule
from innerloop.train.interrupt import StopOnInterrupt
from tests.trainer_testing import SMALL_MODEL


def _lightning_checkpoint(module: LanguageModelModule, path) -> None:
    """Write ``module`` as ``trainer.save_checkpoint`` writes it without a plugin (a pickled dict)."""
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": L.__version__,
    }
    torch.save(checkpoint, path)


@pytest.mark.slow  # 0.9 s: Lightning's loader
def test_load_from_checkpoint_of_a_64_true_lightning_checkpoint_keeps_its_float64_weights(tmp_path) -> None:
    """A ``64-true`` run of the user's own Trainer (no ``SafetensorsCheckpointIO``) writes a pickled
    checkpoint of float64 weights; ``LanguageModelModule.load_from_checkpoint`` loaded them into the
    float32 module it built, rounding every weight (5.8e-8 measured) without a word, where the same
    weights in innerloop's own format load in float64 (``load_weights``). Both now load them unrounded."""
    torch.manual_seed(0)
    module = LanguageModelModule(SMALL_MODEL, diagnostics_batches=0).double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-3)
    _lightning_checkpoint(module, tmp_path / "run.ckpt")
    loaded = LanguageModelModule.load_from_checkpoint(tmp_path / "run.ckpt")
    for name, weight in module.state_dict().items():
        assert loaded.state_dict()[name].dtype == weight.dtype, name
        assert torch.equal(loaded.state_dict()[name], weight), name


@pytest.mark.slow  # 1 s: a Trainer's validation
def test_a_64_true_validation_logs_its_loss_and_loss_by_position_in_float64(tmp_path) -> None:
    """Under ``precision="64-true"`` every logit and metric sum is float64, but ``val_loss``, ``val_acc`` and
    ``val_loss_pos/<b>`` were logged rounded to float32 (2e-8 off the token-weighted mean measured, beside
    a float64 ``val_ppl``): a float64 comparison of two runs or implementations saw float32's rounding.
    They are now logged in float64 where the module's weights are (float32 otherwise, as before); the
    mean is over the scored tokens of batches of other sizes and lengths, one batch scoring none."""
    torch.manual_seed(0)
    module = LanguageModelModule(SMALL_MODEL, diagnostics_batches=0)
    vocab = SMALL_MODEL.vocab_size
    batches = [
        (torch.randint(0, vocab, (b, t)), torch.randint(0, vocab, (b, t)))
        for b, t in [(1, 6), (3, 4), (2, 6)]
    ]
    batches[0][1][:] = IGNORE_INDEX  # a batch that scores no token
    batches[1][1][1, 1:] = IGNORE_INDEX
    with torch.no_grad():  # some targets the model predicts: an accuracy of 4/21, not a float32 number
        batches[2][1][:, ::3] = module.double()(batches[2][0]).argmax(-1)[:, ::3]
    trainer = L.Trainer(
        accelerator="cpu", precision="64-true", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    results = trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]
    losses, scored_at, correct = [], [], []
    with torch.no_grad():
        for inputs, targets in batches:
            logits = module(inputs)
            token_loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            losses.append(token_loss[targets != IGNORE_INDEX])
            correct.append((logits.argmax(-1) == targets)[targets != IGNORE_INDEX])
            scored_at.append(torch.where(targets != IGNORE_INDEX, token_loss, torch.nan))
    expected = torch.cat(losses).mean()
    assert expected.dtype == torch.float64
    assert abs(results["val_loss"] - float(expected)) < 1e-13
    assert abs(math.log(results["val_ppl"]) - float(expected)) < 1e-13
    at_position_0 = torch.cat([s[:, 0] for s in scored_at])  # one bucket a position: 6 positions, 16 buckets
    assert abs(results["val_loss_pos/0"] - float(at_position_0.nanmean())) < 1e-13
    # val_acc too: a ratio of counts, float32's 1/3 is 6e-9 off
    assert abs(results["val_acc"] - float(torch.cat(correct).double().mean())) < 1e-15


class _StopAtTheFirstEpochsEnd(L.Callback):
    """Asks for a stop at the first epoch's last batch: ``trainer.should_stop`` (as ``max_time`` does),
    or a Ctrl-C's request to :class:`StopOnInterrupt` (``interrupt``)."""

    def __init__(self, last_batch: int, interrupt: StopOnInterrupt | None = None) -> None:
        self.last_batch, self.interrupt = last_batch, interrupt

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.last_batch:
            if self.interrupt is None:
                trainer.should_stop = True
            else:
                self.interrupt.requested = True


@pytest.mark.slow  # 1.5 s: two fits of 2 or 3 optimizer steps
@pytest.mark.parametrize("by", ["should_stop", "ctrl_c"])
# the fits here have no validation data on purpose (Lightning says it skips its loop)
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_a_stop_at_an_epochs_short_last_step_ends_the_fit_there(tmp_path, by) -> None:
    """An epoch of 3 batches under ``accumulate_grad_batches=2`` steps after batches 2 and 3 (Lightning
    steps on an epoch's last batch whatever the count). A stop asked for at batch 3 (``max_time``, a
    callback's ``trainer.should_stop``, a Ctrl-C) was taken for one inside an accumulation and deferred
    to the next "whole" step, counted as ``(batch_idx + 1) % 2``: the fit went on into the next epoch
    and took one more optimizer step (global_step 3, not 2) than it was asked to."""
    torch.manual_seed(0)
    module = LanguageModelModule(SMALL_MODEL, max_steps=6, warmup_steps=0, diagnostics_batches=0)
    ids = torch.randint(0, SMALL_MODEL.vocab_size, (3, 8))
    interrupt = StopOnInterrupt() if by == "ctrl_c" else None
    callbacks = [_StopAtTheFirstEpochsEnd(2, interrupt), *([interrupt] if interrupt else [])]
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, accumulate_grad_batches=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, DataLoader(list(zip(ids, ids, strict=True)), batch_size=1))
    assert trainer.global_step == 2


@pytest.mark.slow  # 1 s: a Trainer's validation
def test_a_64_true_validation_logs_the_inner_loss_diagnostics_in_float64(tmp_path) -> None:
    """The sibling of ``val_loss``'s rounding: ``inner_loss_before/<layer>`` and ``..._after/<layer>`` of a
    ``64-true`` validation were logged rounded to float32, beside float64 sums. Now float64 there: the
    mean over the diagnosed batches' sequences of :func:`inner_loss_before_after` (two batches of 2 and 1
    rows, both diagnosed), within 1e-13."""
    torch.manual_seed(0)
    module = LanguageModelModule(SMALL_MODEL, diagnostics_batches=2).double()
    vocab = SMALL_MODEL.vocab_size
    batches = [(torch.randint(0, vocab, (b, 8)), torch.randint(0, vocab, (b, 8))) for b in (2, 1)]
    trainer = L.Trainer(
        accelerator="cpu", precision="64-true", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    results = trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]
    mixer, inputs = module.model.blocks[0].mixer, []
    hook = mixer.register_forward_pre_hook(lambda layer, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        for ids, _ in batches:
            module(ids)
    hook.remove()
    before, after = (
        torch.cat(v) for v in zip(*(inner_loss_before_after(mixer, x) for x in inputs), strict=True)
    )
    assert before.dtype == torch.float64
    assert abs(results["inner_loss_before/0"] - float(before.mean())) < 1e-13
    assert abs(results["inner_loss_after/0"] - float(after.mean())) < 1e-13
