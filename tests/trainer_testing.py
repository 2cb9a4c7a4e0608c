"""A user's own Lightning Trainer in tests: the small float64-friendly model (:data:`SMALL_MODEL`), a
callback recording which stream batch each step read (:class:`FirstTokens`) and a quiet fit
(:func:`user_fit`)."""

from __future__ import annotations

import warnings

import lightning as L

from innerloop.models import ModelConfig, TTTConfig
from innerloop.train import LanguageModelModule, TextDataModule

SMALL_MODEL = ModelConfig(
    hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32, ttt=TTTConfig(mini_batch_size=4)
)


class FirstTokens(L.Callback):
    """The sum of the first tokens of each training batch's first row: which batch of the stream it is."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(int(batch[0][0, :4].sum()))


def user_fit(
    tmp_path, module_steps: int, trainer_options: dict, callbacks=(), ckpt_path=None
) -> tuple[LanguageModelModule, list[int]]:
    """A float64 fit of the small model from the user's own Trainer (``trainer_options`` on top of quiet,
    validation-free defaults): the module, and which stream batch each training step read."""
    L.seed_everything(0, verbose=False)
    module = LanguageModelModule(SMALL_MODEL, max_steps=module_steps, warmup_steps=0, diagnostics_batches=0)
    seen = FirstTokens()
    options = dict(
        accelerator="cpu", devices=1, limit_val_batches=0, precision="64-true", logger=False,
        default_root_dir=tmp_path, enable_checkpointing=bool(callbacks), enable_progress_bar=False,
        enable_model_summary=False, callbacks=[seen, *callbacks],
    )  # fmt: skip
    trainer = L.Trainer(**{**options, **trainer_options})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers, mid-epoch resumes and the like
        data = TextDataModule(seq_len=16, batch_size=2, val_batches=1)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, seen.batches


VALIDATION_INSIDE_AN_ACCUMULATION = dict(
    max_steps=4, max_epochs=-1, val_check_interval=3, check_val_every_n_epoch=None,
    limit_val_batches=1, num_sanity_val_steps=0, accumulate_grad_batches=2,
)  # fmt: skip
"""Trainer options of 4 steps of 2 micro-batches with a validation after batch 3: one micro-batch into
step 2 (where a ``ModelCheckpoint(monitor="val_loss")`` writes its first checkpoint, ``step=1.ckpt``)."""
