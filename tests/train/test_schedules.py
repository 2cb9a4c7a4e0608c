"""``optim.schedule`` (cosine, linear, constant, wsd) against closed forms, in the optimizer and in a
run; and the JAX reference's TTT base-lr warm-up, step by step in training and across a resume."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from test_trainer_options import small_run, write_corpus

from innerloop.config.load import ConfigError, decay_steps, warmup_steps
from innerloop.config.schema import SCHEDULES
from innerloop.core.layer import TTTLayer
from innerloop.train import load_checkpoint, train
from innerloop.train.module import LanguageModelModule
from innerloop.train.schedules import make_schedule, ttt_base_lr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


SMALL = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}

# W = 10 warm-up steps, N = 110 steps, lr 1.0, min_lr 0.1; wsd decays over the last D = 20 steps.
# Every schedule warms up the same way: lr * (s + 1) / W.
WARMUP = {0: 0.1, 4: 0.5, 9: 1.0}
CLOSED_FORMS = {
    # p = (s - 10) / 100; min_lr + (lr - min_lr) * (1 + cos(pi p)) / 2
    "cosine": {10: 1.0, 35: 0.1 + 0.45 * (1 + math.sqrt(0.5)), 60: 0.55, 85: 0.1 + 0.45 * (1 - math.sqrt(0.5)),
               110: 0.1, 500: 0.1},
    # lr + (min_lr - lr) p
    "linear": {10: 1.0, 35: 0.775, 60: 0.55, 85: 0.325, 110: 0.1, 500: 0.1},
    "constant": {10: 1.0, 60: 1.0, 110: 1.0, 500: 1.0},
    # lr until N - D = 90, then lr + (min_lr - lr) (s - 90) / 20
    "wsd": {10: 1.0, 60: 1.0, 89: 1.0, 90: 1.0, 95: 0.775, 100: 0.55, 105: 0.325, 110: 0.1, 500: 0.1},
}  # fmt: skip


@pytest.mark.parametrize("name", SCHEDULES)
def test_each_schedule_equals_its_closed_form(name) -> None:
    schedule = make_schedule(name, warmup_steps=10, max_steps=110, lr=1.0, min_lr=0.1, decay_steps=20)
    for step, expected in {**WARMUP, **CLOSED_FORMS[name]}.items():
        assert schedule(step) == pytest.approx(expected, rel=1e-12, abs=1e-15), (name, step)


def test_the_schedules_are_the_configs() -> None:
    assert set(CLOSED_FORMS) == set(SCHEDULES)
    with pytest.raises(ValueError, match=r"schedule='step' is not a schedule; valid: \['cosine'"):
        make_schedule("step", 1, 10, 1.0, 0.1)


def _cosine_before_schedules(step: int, warmup_steps: int, max_steps: int, lr: float, min_lr: float) -> float:
    """The schedule of innerloop before ``optim.schedule`` existed, verbatim (``warmup_cosine``)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize(("warmup", "max_steps"), [(60, 600), (0, 5), (3, 3), (1, 2)])
def test_the_default_cosine_gives_the_numbers_it_gave_before(warmup, max_steps) -> None:
    schedule = make_schedule("cosine", warmup, max_steps, 3e-3, 1e-5)
    for step in range(max_steps + 3):
        assert schedule(step) == _cosine_before_schedules(step, warmup, max_steps, 3e-3, 1e-5)  # bit for bit


@pytest.mark.parametrize("name", SCHEDULES)
def test_the_optimizer_follows_the_schedule_step_by_step(name) -> None:
    module = LanguageModelModule(
        model=SMALL, lr=0.02, min_lr=0.002, warmup_steps=3, max_steps=12, schedule=name, decay_steps=4
    )
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    expected = make_schedule(name, 3, 12, 0.02, 0.002, 4)
    for step in range(15):
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected(step)] * 2, rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_wsd_steps_come_from_the_fractions_and_must_fit(corpus, tmp_path) -> None:
    run, _ = small_run(
        corpus, tmp_path, "optim.schedule=wsd", "trainer.max_steps=50", "optim.decay_fraction=0.3"
    )
    assert (warmup_steps(run), decay_steps(run)) == (5, 15)
    run, _ = small_run(corpus, tmp_path, "optim.schedule=wsd", "trainer.max_steps=2")
    assert decay_steps(run) == 1  # at least one step decays
    with pytest.raises(ConfigError, match=r"optim.schedule='wsd' .* \(30 \+ 40 steps\): the two must fit"):
        small_run(corpus, tmp_path, "optim.schedule=wsd", "trainer.max_steps=50", "optim.warmup_fraction=0.6",
                  "optim.decay_fraction=0.8")  # fmt: skip
    with pytest.raises(ConfigError, match=r"optim.decay_fraction=0.0 must be in \(0, 1\]"):
        small_run(corpus, tmp_path, "optim.decay_fraction=0")
    with pytest.raises(ConfigError, match=r"optim.schedule='cosin' is not a schedule; valid: \['cosine'"):
        small_run(corpus, tmp_path, "optim.schedule=cosin")


class _RecordLearningRates(L.Callback):
    def __init__(self):
        self.lrs: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


@pytest.mark.slow  # a training run of 8 steps (~2 s)
def test_a_run_trains_on_the_wsd_schedule(corpus, tmp_path) -> None:
    run, cfg = small_run(
        corpus, tmp_path / "run", "optim.schedule=wsd", "optim.decay_fraction=0.25", "optim.warmup_fraction=0.25",
        "trainer.max_steps=8", "optim.lr=0.01", "optim.min_lr=0.001", "trainer.diagnostics_batches=0",
    )  # fmt: skip
    record = _RecordLearningRates()
    train(run, cfg, callbacks=[record])
    # warm-up 2 steps, stable until step 6, decay over steps 6, 7 to min_lr at 8
    expected = [0.005, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.0055]
    assert [record.lrs[s] for s in range(8)] == pytest.approx(expected, rel=1e-12)


# -- the TTT layers' base-lr warm-up (ttt-lm-jax, ttt/train.py, make_get_ttt_lr_mult) -----------------


def _reference_base_lr(step_1_based: int, init: float, peak: float, warmup: int) -> float:
    """The reference's multiplier times its ``ttt_base_lr`` (``peak``), in float (it rounds the
    multiplier to bfloat16); written as the reference's code is."""
    if not (init > 0 and warmup > 0):
        return peak
    multiplier = init + min(1.0, (step_1_based - 1) / warmup) * (peak - init)
    return peak * (multiplier / peak)


def test_the_ttt_base_lr_warmup_is_the_references() -> None:
    for init, peak, warmup in [(0.01, 0.1, 5000), (0.01, 0.1, 7), (0.5, 1.0, 1), (0.3, 0.1, 4)]:
        for step in [0, 1, 2, 3, 6, 7, 8, 100, 4999, 5000, 5001, 20000]:
            reference = _reference_base_lr(step + 1, init, peak, warmup)  # its steps count from 1
            assert ttt_base_lr(step, init, peak, warmup) == pytest.approx(reference, rel=1e-12)
    assert ttt_base_lr(0, 0.01, 0.1, 4) == 0.01 and ttt_base_lr(2, 0.01, 0.1, 4) == pytest.approx(0.055)
    assert ttt_base_lr(4, 0.01, 0.1, 4) == 0.1 and ttt_base_lr(3, 0.01, 0.1, 0) == 0.1  # 0 steps: off


def test_the_ttt_base_lr_warmup_needs_ttt_layers(corpus, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"optim.ttt_base_lr_warmup=4 .* model.mixer='attention' has none"):
        small_run(corpus, tmp_path, "optim.ttt_base_lr_warmup=4", "model.mixer=attention")
    with pytest.raises(ConfigError, match=r"optim.ttt_base_lr_warmup=-1 must be >= 0"):
        small_run(corpus, tmp_path, "optim.ttt_base_lr_warmup=-1")


class _RecordBaseLR(L.Callback):
    """``(training, global step, base lr)`` of every TTT layer at every forward of the run."""

    def __init__(self):
        self.calls: list[tuple[bool, int, float]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        for layer in pl_module.modules():
            if isinstance(layer, TTTLayer):
                layer.register_forward_pre_hook(
                    lambda layer, args: self.calls.append(
                        (layer.training, trainer.global_step, layer.base_lr)
                    )
                )


WARMUP_RUN = [
    "model.ttt.base_lr=0.1",
    "optim.ttt_base_lr_init=0.01",
    "optim.ttt_base_lr_warmup=4",
    "trainer.accumulate_grad_batches=2",
    "optim.schedule=constant",
    "optim.warmup_fraction=0",
    "trainer.val_every=3",
    "trainer.checkpoint_every=3",
    "trainer.diagnostics_batches=0",
]  # fmt: skip  (a constant lr: the interrupted run's schedule does not depend on its max_steps)


def _check_calls(calls: list[tuple[bool, int, float]], steps: range) -> None:
    training = [(step, lr) for is_training, step, lr in calls if is_training]
    # every micro-batch (2 per step) of every layer (2) of a step has the step's base lr
    expected = [(s, ttt_base_lr(s, 0.01, 0.1, 4)) for s in steps for _ in range(2 * 2)]
    assert [s for s, _ in training] == [s for s, _ in expected]
    assert [lr for _, lr in training] == pytest.approx([lr for _, lr in expected], rel=1e-12)
    assert {lr for is_training, _, lr in calls if not is_training} == {0.1}  # validation at the peak


@pytest.mark.slow  # three short training runs (~4 s)
def test_the_layers_base_lr_warms_up_step_by_step_and_across_a_resume(corpus, tmp_path) -> None:
    whole = _RecordBaseLR()
    run, cfg = small_run(corpus, tmp_path / "whole", *WARMUP_RUN, "trainer.max_steps=6")
    train(run, cfg, callbacks=[whole])
    _check_calls(whole.calls, range(6))

    first, resumed = _RecordBaseLR(), _RecordBaseLR()
    run, cfg = small_run(corpus, tmp_path / "parts", *WARMUP_RUN, "trainer.max_steps=3")
    train(run, cfg, callbacks=[first])
    _check_calls(first.calls, range(3))
    run, cfg = small_run(corpus, tmp_path / "parts", *WARMUP_RUN, "trainer.max_steps=6")
    train(run, cfg, resume=True, callbacks=[resumed])
    _check_calls(resumed.calls, range(3, 6))  # it goes on where it was: 0.0775 at step 3, then 0.1

    ends = [
        load_checkpoint(tmp_path / name / "last.safetensors")["state_dict"] for name in ("whole", "parts")
    ]
    for key in ends[0]:
        assert torch.equal(ends[0][key], ends[1][key]), key  # the resumed run ends where the whole one did


@pytest.mark.slow  # two training runs of 3 steps (~3 s)
def test_a_resume_may_change_the_schedule_from_the_step_reached(corpus, tmp_path) -> None:
    out = tmp_path / "run"
    common = ["optim.lr=0.01", "optim.min_lr=0.001", "trainer.diagnostics_batches=0", "trainer.val_every=3"]
    run, cfg = small_run(corpus, out, *common, "trainer.max_steps=3")
    train(run, cfg)
    run, cfg = small_run(
        corpus, out, *common, "trainer.max_steps=6", "optim.schedule=wsd", "optim.decay_fraction=0.5"
    )
    record = _RecordLearningRates()
    train(run, cfg, resume=True, callbacks=[record])
    wsd = make_schedule("wsd", warmup_steps=0, max_steps=6, lr=0.01, min_lr=0.001, decay_steps=3)
    assert sorted(record.lrs) == [3, 4, 5]
    assert [record.lrs[s] for s in (3, 4, 5)] == pytest.approx([wsd(3), wsd(4), wsd(5)], rel=1e-12)
    assert [wsd(3), wsd(4), wsd(5)] == pytest.approx([0.01, 0.007, 0.004])
