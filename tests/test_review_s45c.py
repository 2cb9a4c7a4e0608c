"""Review s45c: the grader of issues 3 (training via Lightning, configs, the CLI) and 9 (trust), with
overrides, interruptions and Lightning usage the other tests do not use.

Kept here, each a finding (the commit that fixes it names it):

- An unknown ``trainer.*`` key suggested only close spellings among Lightning's arguments, never the same
  key of another section, which every other section's error names (``data.lr``: ``optim.lr``):
  ``trainer.backbone=mamba`` said "did you mean 'barebones'?" (an argument innerloop refuses) instead of
  ``model.backbone``, and ``trainer.grad_clip`` named only Lightning's ``gradient_clip_val``; the
  suggestions also offered arguments a config may not set (``min_steps`` for ``trainer.mxa_steps``).
- Under gradient accumulation a pending checkpoint replaced ``last.safetensors`` at the first micro-batch
  of the next optimizer step, before the others' losses were known: a NaN on a later micro-batch left
  ``last.safetensors`` holding weights whose next step is NaN again at any lr, the checkpoint before it
  gone (docs/training.md: it replaces it "only once the next step's loss on its weights is finite").
- ``LanguageModelModule.load_from_checkpoint`` of a run folder (not its ``last.safetensors``) ended in
  torch.load's bare ``IsADirectoryError``, where ``load_module`` and the commands name the file to give.
- ``trainer.validate(module, dataloaders=[a, b])`` (or ``test``, or a fit with several validation
  loaders) stopped in Lightning's check, whose advice (add ``dataloader_idx`` to ``validation_step``)
  made a subclass log one ``val_loss`` over the loaders together; each loader is now scored on its own,
  its metrics logged as ``val_loss/dataloader_idx_<i>``, ... (the names Lightning gives them).
- ``train(run, callbacks=[print])`` failed inside the fit with a bare AttributeError (``'...' object has
  no attribute 'on_exception'``), and ``callbacks=EarlyStopping(...)``, one callback as Lightning's
  Trainer takes it, with "Value after * must be an iterable"; one is now taken, anything else refused
  naming ``callbacks`` before anything is written.
"""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping
from lm_testing import TINY  # the tiny run of the end-to-end tests
from torch.utils.data import DataLoader

from innerloop.checkpoints import CheckpointError
from innerloop.config import ConfigError, load_config
from innerloop.models import ModelConfig
from innerloop.train import LanguageModelModule, TrainingDivergedError, load_checkpoint, train
from innerloop.train.data import IGNORE_INDEX
from innerloop.train.run import _checked_callbacks
from innerloop.train.run_dir import PENDING_CHECKPOINT


@pytest.mark.parametrize(
    ("override", "meant", "not_meant"),
    [
        ("trainer.backbone=mamba", "'model.backbone'", "barebones"),
        ("trainer.grad_clip=0.5", "'optim.grad_clip'", None),
        ("trainer.val_batches=2", "'data.val_batches'", None),
        ("trainer.mxa_steps=3", "'max_steps'", "min_steps"),
        ("trainer.lightning.backbone=mamba", "'model.backbone'", "barebones"),
    ],
)
def test_an_unknown_trainer_key_names_the_key_it_may_have_meant(override, meant, not_meant, tmp_path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", [override, f"out_dir={tmp_path / 'run'}"])
    hint = re.search(r"did you mean ([^?]*)\?", str(raised.value))
    assert hint is not None and meant in hint.group(1), str(raised.value)
    assert not_meant is None or not_meant not in hint.group(1), str(raised.value)


class _NanAtSecondMicroBatch(L.Callback):
    """Make the loss NaN at the second micro-batch of the optimizer step after ``step`` steps (the
    weights the checkpoint of that many steps holds give a NaN loss on it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and batch_idx % 2 == 1:
            with torch.no_grad():
                pl_module.model.blocks[0].mlp.down_proj.weight.fill_(float("nan"))


@pytest.mark.slow  # ~2-5 s (by the load): a training run of three optimizer steps, its set-up the most of it
def test_under_accumulation_a_checkpoint_whose_next_step_diverges_does_not_replace_last(tmp_path) -> None:
    """A pending checkpoint replaced last.safetensors at the first micro-batch of the next step: when a later
    micro-batch of that step was NaN, last.safetensors held weights whose next step diverges again at any
    lr (the step is a function of them and of the batches), and the checkpoint before was gone."""
    out = tmp_path / "run"
    overrides = [
        *TINY,
        "trainer.accumulate_grad_batches=2",
        "trainer.checkpoint_every=1",
        "trainer.max_steps=4",
    ]
    run, cfg = load_config("tiny", [*overrides, f"out_dir={out}"])
    with pytest.raises(TrainingDivergedError, match="after 2 optimizer steps"):
        train(run, cfg, callbacks=[_NanAtSecondMicroBatch(step=2)])
    assert load_checkpoint(out / "last.safetensors")["global_step"] == 1
    assert not (out / PENDING_CHECKPOINT).exists()


def test_load_from_checkpoint_of_a_run_folder_names_the_file_to_give(tmp_path) -> None:
    """LanguageModelModule.load_from_checkpoint('runs/tiny') went to torch.load: a bare IsADirectoryError,
    where load_module and every command name the checkpoint file in the folder."""
    with pytest.raises(
        CheckpointError, match=r"is a directory; give the checkpoint file in it .*last\.safetensors"
    ):
        LanguageModelModule.load_from_checkpoint(tmp_path)


def _windows(seed: int, count: int, length: int, unscored: int) -> DataLoader:
    """``count`` (inputs, targets) batches of 2 windows of random bytes, the last ``unscored`` targets
    of each window IGNORE_INDEX (padding)."""
    ids = torch.randint(0, 256, (count, 2, length + 1), generator=torch.Generator().manual_seed(seed))
    targets = ids[..., 1:].clone()
    targets[..., length - unscored :] = IGNORE_INDEX
    return DataLoader([(ids[i, :, :-1], targets[i]) for i in range(count)], batch_size=None)


def test_several_validation_loaders_are_each_scored_on_their_own() -> None:
    """trainer.validate(module, dataloaders=[a, b]) (and fit's several val loaders) stopped in Lightning's
    check, whose advice (add dataloader_idx to validation_step) gave one val_loss over the loaders
    together in a subclass; each loader's val_loss and val_acc are now its own scored tokens'."""
    torch.manual_seed(0)
    config = ModelConfig(
        hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32, ttt={"mini_batch_size": 4}
    )
    module = LanguageModelModule(config, num_position_buckets=2, diagnostics_batches=0).eval()
    loaders = [_windows(1, 2, 8, unscored=3), _windows(2, 1, 12, unscored=0)]
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    results = trainer.validate(module, dataloaders=loaders, verbose=False)  # one dict per loader
    for i, loader in enumerate(loaders):
        with torch.no_grad():
            scored = [(module(x).double(), y) for x, y in loader]
        loss = sum(
            F.cross_entropy(z.transpose(1, 2), y, ignore_index=IGNORE_INDEX, reduction="sum")
            for z, y in scored
        )
        right = sum(int((z.argmax(-1) == y).sum()) for z, y in scored)
        count = sum(int((y != IGNORE_INDEX).sum()) for _, y in scored)
        logged = results[i]
        assert logged[f"val_loss/dataloader_idx_{i}"] == pytest.approx(float(loss) / count, rel=1e-6)
        assert logged[f"val_acc/dataloader_idx_{i}"] == pytest.approx(right / count, rel=1e-6)


@pytest.mark.parametrize("callbacks", [[print], 3])
def test_train_refuses_callbacks_that_are_not_callbacks_before_writing(callbacks, tmp_path) -> None:
    """train(run, callbacks=[print]) failed inside the fit with "'builtin_function_or_method' object has no
    attribute 'on_exception'" (and ``callbacks=EarlyStopping(...)``, one callback as Lightning's Trainer
    takes it, with "Value after * must be an iterable")."""
    run, cfg = load_config("tiny", [*TINY, f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(TypeError, match=r"^callbacks must be a Lightning Callback or a list of them"):
        train(run, cfg, callbacks=callbacks)
    assert not (tmp_path / "run").exists()
    one = EarlyStopping(monitor="val_loss")  # one callback, as lightning.Trainer(callbacks=...) takes it
    assert _checked_callbacks(one) == [one] and _checked_callbacks((one,)) == [one]


def test_a_config_file_with_a_key_given_twice_is_one_line_from_python_too(tmp_path) -> None:
    """s45c's LOW: ``load_config`` of a YAML file with a duplicate key raised omegaconf's message over
    several lines (the CLI joined them); the error is one line wherever it is read."""
    from innerloop.config.load import ConfigError, load_config

    path = tmp_path / "twice.yaml"
    path.write_text("trainer:\n  max_steps: 3\n  max_steps: 4\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML: .*duplicate key max_steps") as error:
        load_config(str(path), [])
    assert "\n" not in str(error.value)
