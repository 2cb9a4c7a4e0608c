"""Review s52n: a user's stateful callbacks (ModelCheckpoint, EarlyStopping) across --resume, and stops."""

from __future__ import annotations

import pytest
from test_review_s52_s52h import _StepsSeen  # the same per-batch record of steps said and taken


@pytest.mark.slow  # a 4-step training run of the tiny model (~1.5 s)
def test_the_checkpoint_of_a_validated_step_holds_the_user_callbacks_states_after_that_validation(
    tmp_path,
) -> None:
    """The checkpoint of step 4 (validated: val_every=2) is written at the step's batch end, before its
    validation; a user's EarlyStopping and ModelCheckpoint update their best at the validation's end. The
    checkpoint held their states from step 2's validation (EarlyStopping's best_score a step behind, so a
    resumed run counts its patience from another best), and now holds those the callbacks end the step
    with; the weights and the loop counters (what a bitwise resume needs) are those of the batch end."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lm_testing import TINY

    from innerloop.checkpoints import load_checkpoint
    from innerloop.config import load_config
    from innerloop.train import train

    out = tmp_path / "run"
    run, cfg = load_config("tiny", [*TINY, "trainer.max_steps=4", "trainer.val_every=2", f"out_dir={out}"])
    stopping = EarlyStopping(monitor="val_loss", patience=5)
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_loss", save_top_k=1)
    train(run, cfg, callbacks=[stopping, best])
    checkpoint = load_checkpoint(out / "last.safetensors")
    states = checkpoint["callbacks"]
    assert checkpoint["global_step"] == 4
    assert float(states[stopping.state_key]["best_score"]) == float(stopping.best_score)
    assert states[stopping.state_key]["wait_count"] == stopping.wait_count
    assert states[best.state_key]["best_model_path"] == best.best_model_path
    assert best.best_model_path.endswith("step=4.ckpt")  # the test can tell: step 2's was the best before
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert progress["completed"] == progress["processed"] - 1  # written at the batch end, as before


def _rows(out_dir) -> list[dict[str, str]]:
    """Every row of every launch's metrics.csv, in launch order, without timing columns and empty cells."""
    import csv

    rows = []
    for launch in sorted((out_dir / "logs").glob("version_*"), key=lambda d: int(d.name.split("_")[1])):
        with open(launch / "metrics.csv", newline="", encoding="utf-8") as file:
            for row in csv.DictReader(file):
                rows.append({k: v for k, v in row.items() if v and k not in {"wall_time", "tokens_per_s"}})
    return rows


class _StopAt:
    """Sets ``trainer.should_stop`` in the callback hook ``hook`` once the fit has taken ``step``
    optimizer steps (EarlyStopping does it in ``on_validation_end``)."""

    def __new__(cls, hook: str, step: int):
        import lightning as L

        def stop(self, trainer, *args) -> None:
            if trainer.global_step == step:
                trainer.should_stop = True

        return type("StopAt", (L.Callback,), {hook: stop})()


def _stopped_and_resumed(tmp_path, stop, stopped_at: int, settings=()) -> None:
    """An 8-step run, once straight and once stopped by the callback ``stop`` at step ``stopped_at`` and
    resumed: the checkpoint holds that step, the two log the same rows (timing columns aside) and end
    with the same weights, AdamW moments and lr schedule, bitwise."""
    import torch
    from lm_testing import TINY, state_tensors

    from innerloop.checkpoints import load_checkpoint
    from innerloop.config import load_config
    from innerloop.train import train

    settings = [*TINY, "trainer.val_every=3", "trainer.checkpoint_every=4", "trainer.log_every=1", *settings]
    settings += ["optim.schedule=constant", "optim.warmup_fraction=0", "trainer.max_steps=8"]

    def fit(out, resume=False, callbacks=()):
        run, cfg = load_config("tiny", [*settings, f"out_dir={out}"])
        train(run, cfg, resume=resume, callbacks=list(callbacks))

    fit(tmp_path / "straight")
    fit(tmp_path / "stopped", callbacks=[stop])
    assert load_checkpoint(tmp_path / "stopped" / "last.safetensors")["global_step"] == stopped_at
    fit(tmp_path / "stopped", resume=True)
    assert _rows(tmp_path / "stopped") == _rows(tmp_path / "straight")
    ends = [load_checkpoint(tmp_path / name / "last.safetensors") for name in ("straight", "stopped")]
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        one, other = (state_tensors(end[key]) for end in ends)
        assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)
    assert ends[0]["lr_schedulers"] == ends[1]["lr_schedulers"]


@pytest.mark.slow  # three short training runs of the tiny model (~4 s)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_stop_asked_for_at_the_end_of_a_validation_resumes_to_the_uninterrupted_rows(
    tmp_path, accumulate
) -> None:
    """EarlyStopping (or any callback) stopping the fit at the end of step 6's validation (step 6 not a
    checkpoint_every step): step 6 was saved at the end of training instead, with the counters of a
    finished epoch, and the resumed run logged its rows one step late and with epoch 1 where the
    uninterrupted run has step 6, epoch 0."""
    lightning = f"trainer.lightning={{accumulate_grad_batches: {accumulate}}}"
    _stopped_and_resumed(tmp_path, _StopAt("on_validation_end", 6), 6, [lightning])


@pytest.mark.slow  # a float64 fit of the small model, up to 14 batches (~0.5 s)
@pytest.mark.parametrize(
    ("accumulate", "epoch_batches", "steps"),
    [(1, 3, 4), (2, 4, 4), (2, 5, 5), (3, 6, 4), (3, 7, 5), (5, 7, 4), (5, 10, 3)],
)
def test_optimizer_step_ends_here_says_where_the_optimizer_steps(
    tmp_path, accumulate, epoch_batches, steps
) -> None:
    """Checked against the optimizer's own steps: accumulations of 1, 2, 3 and 5 micro-batches over
    epochs (``limit_train_batches``) whose batch count they divide or not (the epoch's last batch steps
    whatever the count), across epoch ends."""
    from trainer_testing import user_fit

    seen = _StepsSeen()
    options = dict(max_steps=steps, limit_train_batches=epoch_batches, accumulate_grad_batches=accumulate)
    user_fit(tmp_path, steps, options, callbacks=[seen])
    assert sum(seen.stepped) == steps
    assert seen.said == seen.stepped


@pytest.mark.slow  # two float64 fits of the small model (~1 s)
def test_optimizer_step_ends_here_after_a_resume_inside_an_epoch(tmp_path) -> None:
    """Resumed from step 2 of a 7-batch epoch under accumulate_grad_batches=3 (steps end after batches 3,
    6 and 7): the resumed fit's first batch is the epoch's 7th, a step of its own."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from trainer_testing import user_fit

    options = dict(limit_train_batches=7, accumulate_grad_batches=3)
    saving = ModelCheckpoint(dirpath=tmp_path / "saved", every_n_train_steps=2, save_top_k=-1)
    user_fit(tmp_path, 6, dict(options, max_steps=2), callbacks=[saving])
    seen = _StepsSeen()
    start = tmp_path / "saved" / "epoch=0-step=2.ckpt"
    user_fit(tmp_path, 6, dict(options, max_steps=6), callbacks=[seen], ckpt_path=start)
    assert seen.stepped == [True, False, False, True, False, False, True, True]
    assert seen.said == seen.stepped
