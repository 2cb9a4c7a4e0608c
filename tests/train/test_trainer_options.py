"""``trainer.*`` takes any ``lightning.Trainer`` argument: routed, checked against the Trainer's
signature with one-line errors, refused with the reason where innerloop sets it, and each effect seen
in a few training steps (accumulation equals a larger batch in float64, log and validation intervals,
deterministic algorithms, gradient clipping)."""

from __future__ import annotations

import csv
import math
import random
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from test_train import TINY  # the tiny model and run of the end-to-end tests
from torch.utils.data import DataLoader

from innerloop.cli import main
from innerloop.config import load_config, trainer_args
from innerloop.config.load import ConfigError, check_resume_changes, save_config
from innerloop.config.trainer_args import LIGHTNING_NAMES, SET_BY_INNERLOOP, trainer_arguments
from innerloop.train import train
from innerloop.train.data import IGNORE_INDEX, FixedExamples, TextDataModule
from innerloop.train.run import build_module, build_trainer

WORDS = "def class return import for while if else self value data lambda yield with try".split()


def write_corpus(path: Path) -> Path:
    """A small text file (about 40 KB of Python-like words): a run's data without reading the stdlib."""
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(700)))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def small_run(corpus: Path, out_dir: Path, *overrides: str):
    """``load_config`` of the tests' tiny model on ``corpus``, writing into ``out_dir``."""
    return load_config("tiny", [*TINY, f"data.paths=[{corpus}]", f"out_dir={out_dir}", *overrides])


def _metrics_rows(out_dir: Path, version: int = 0) -> list[dict[str, str]]:
    with open(out_dir / "logs" / f"version_{version}" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


# -- the config: any Trainer argument, routed and checked ---------------------------------------------


def test_trainer_arguments_from_overrides_and_files_reach_the_trainer(corpus, tmp_path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run, cfg = small_run(
            corpus,
            tmp_path / "run",
            "trainer.accumulate_grad_batches=2",
            "trainer.deterministic=warn",
            "trainer.gradient_clip_algorithm=value",
            "trainer.log_every_n_steps=5",  # Lightning's names of innerloop's own keys set those keys
            "trainer.val_check_interval=7",
            "trainer.gradient_clip_val=0.25",
            "trainer.enable_progress_bar=false",
        )
    # TINY sets val_every and progress_bar too: the alias is the same key given twice, and said so
    twice = sorted(str(w.message).split("'")[1] for w in caught if "is given twice" in str(w.message))
    assert twice == ["trainer.progress_bar", "trainer.val_every"], [str(w.message) for w in caught]
    assert run.trainer.lightning == {
        "accumulate_grad_batches": 2,
        "deterministic": "warn",
        "gradient_clip_algorithm": "value",
    }
    assert (run.trainer.log_every, run.trainer.val_every, run.optim.grad_clip) == (5, 7, 0.25)
    assert run.trainer.progress_bar is False

    trainer = build_trainer(run)
    assert trainer.accumulate_grad_batches == 2
    assert trainer.gradient_clip_algorithm == "value" and trainer.gradient_clip_val == 0.25
    assert trainer.log_every_n_steps == 5
    assert trainer.val_check_interval == 14  # val_every counts optimizer steps, Lightning batches

    # the saved config holds them under trainer.lightning and reloads to the same run
    saved = save_config(cfg, tmp_path / "config.yaml")
    assert "lightning:\n    accumulate_grad_batches: 2" in saved.read_text()
    assert load_config(str(saved))[0] == run

    # the same in a YAML file, directly under trainer
    config = tmp_path / "mine.yaml"
    config.write_text("trainer:\n  accumulate_grad_batches: 3\n  log_every_n_steps: 4\n  max_steps: 9\n")
    from_file, _ = load_config(str(config), [f"out_dir={tmp_path}"])
    assert from_file.trainer.lightning == {"accumulate_grad_batches": 3}
    assert (from_file.trainer.log_every, from_file.trainer.max_steps) == (4, 9)
    torch.use_deterministic_algorithms(False)  # building the Trainer applied deterministic='warn'


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.acumulate_grad_batches=2"], r"unknown config key 'trainer.acumulate_grad_batches' in override "
         r"'trainer.acumulate_grad_batches=2'; did you mean 'accumulate_grad_batches'"),
        (["trainer.zzz=1"], r"unknown config key 'trainer.zzz'.* valid keys here: innerloop's \['accelerator'"),
        (["trainer.accumulate_grad_batches=two"],
         r"trainer.accumulate_grad_batches='two' must be int \(lightning.Trainer's accumulate_grad_batches\), got str"),
        (["trainer.accumulate_grad_batches=0"], r"trainer.accumulate_grad_batches=0 must be in \[1, 16777216\]"),
        (["trainer.deterministic=maybe"], r"trainer.deterministic='maybe' must be bool or 'warn' or null"),
        (["trainer.detect_anomaly=1"], r"trainer.detect_anomaly=1 must be bool"),
        (["trainer.max_time=[1]"], r"trainer.max_time=\[1\] \(list\) is not a time limit: give DD:HH:MM:SS .* or null"),
        (["trainer.callbacks=[]"], r"trainer.callbacks cannot be set: innerloop adds its own checkpointing"),
        (["trainer.logger=false"], r"trainer.logger cannot be set: the loggers are the top-level key `logger`"),
        (["trainer.max_epochs=3"], r"trainer.max_epochs cannot be set: the training stream is endless"),
        (["trainer.default_root_dir=x"], r"trainer.default_root_dir cannot be set: .* set out_dir"),
        (["trainer.lightning.log_every_n_steps=3"], r"trainer.log_every_n_steps is innerloop's trainer.log_every"),
        (["trainer.lightning.max_steps=3"], r"unknown config key 'trainer.lightning.max_steps' in override 'trainer.lightning.max_steps=3': it is innerloop's own key trainer.max_steps"),
        (["trainer.lightning=3"], r"trainer.lightning"),
        (["trainer.val_check_interval=0.5"], r"'trainer.val_every' in override 'trainer.val_check_interval=0.5'"),
    ],
)  # fmt: skip
def test_bad_trainer_arguments_are_one_line_errors(corpus, tmp_path, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        small_run(corpus, tmp_path, *overrides)


def test_a_file_giving_two_names_for_one_setting_is_refused(tmp_path) -> None:
    config = tmp_path / "both.yaml"
    config.write_text("trainer:\n  log_every: 10\n  log_every_n_steps: 5\n")
    with pytest.raises(
        ConfigError, match=r"trainer.log_every_n_steps=5 and trainer.log_every=10 in file .* give one"
    ):
        load_config(str(config))
    config.write_text("trainer:\n  log_every: 5\n  log_every_n_steps: 5\n")  # the same value: fine
    assert load_config(str(config), [f"out_dir={tmp_path}"])[0].trainer.log_every == 5


def test_every_argument_named_here_is_one_of_the_installed_trainers() -> None:
    """A Lightning that renames an argument shows here, not as a silently ignored refusal."""
    arguments = trainer_arguments()
    assert set(SET_BY_INNERLOOP) <= set(arguments)
    assert set(LIGHTNING_NAMES) <= set(arguments)
    assert {"accumulate_grad_batches", "deterministic", "val_check_interval"} <= set(arguments)


def test_the_cli_reports_a_bad_trainer_argument_in_one_line(capsys) -> None:
    assert main(["train", "trainer.acumulate_grad_batches=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("innerloop train: error: unknown config key 'trainer.acumulate_grad_batches'")
    assert "did you mean 'accumulate_grad_batches'" in err and "\n" not in err


def test_a_value_lightning_refuses_is_a_config_error_before_anything_is_written(
    corpus, tmp_path, monkeypatch
) -> None:
    out = tmp_path / "run"
    # the config checks this text value itself (review s52q): without that check, Lightning's refusal
    # when the Trainer is built is the same one line, before anything is written
    with pytest.raises(ConfigError, match=r"trainer.gradient_clip_algorithm='norm2' is not valid"):
        small_run(corpus, out, "trainer.gradient_clip_algorithm=norm2")
    monkeypatch.setattr(trainer_args, "lightning_text_choices", dict)
    run, cfg = small_run(corpus, out, "trainer.gradient_clip_algorithm=norm2")  # Lightning's check, not ours
    with pytest.raises(
        ConfigError, match=r"lightning.Trainer refuses trainer.gradient_clip_algorithm='norm2'"
    ):
        train(run, cfg)
    assert not (out / "config.yaml").exists() and not (out / "logs").exists()


def test_a_resume_cannot_change_the_accumulation(corpus, tmp_path) -> None:
    saved, _ = small_run(corpus, tmp_path, "trainer.accumulate_grad_batches=2")
    check_resume_changes(saved, small_run(corpus, tmp_path, "trainer.accumulate_grad_batches=2")[0])
    with pytest.raises(ConfigError, match=r"cannot change trainer.accumulate_grad_batches \(2 -> 1\)"):
        check_resume_changes(saved, small_run(corpus, tmp_path)[0])


# -- the effects, in a few training steps -------------------------------------------------------------


class _RecordGradients(L.Callback):
    """The gradients each optimizer step is about to apply (after all its micro-batches)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})


def _fit_on_examples(corpus, out, batch_size: int, accumulate: int, examples, initial_state):
    """Two optimizer steps in float64 on ``examples`` in order (no shuffling), from ``initial_state``;
    returns the gradients of each step and the final parameters."""
    run, _ = small_run(
        corpus, out, "trainer.precision=64-true", "optim.grad_clip=0",  # clipping would hide a scale error
        f"data.batch_size={batch_size}", f"trainer.accumulate_grad_batches={accumulate}", "trainer.max_steps=2",
    )  # fmt: skip
    module = build_module(run)
    module.load_state_dict(initial_state)
    record = _RecordGradients()
    trainer = build_trainer(run, callbacks=[record])
    trainer.fit(module, train_dataloaders=DataLoader(FixedExamples(*examples), batch_size=batch_size))
    return record.steps, dict(module.named_parameters())


@pytest.mark.slow  # three short float64 runs (~3 s)
# Lightning's own notes on these few-batch fits without validation data
@pytest.mark.filterwarnings("ignore:You defined a .validation_step. but have no .val_dataloader.")
@pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than the logging interval")
def test_accumulating_two_batches_of_4_equals_one_batch_of_8_in_float64(corpus, tmp_path) -> None:
    """Equal because every micro-batch scores as many tokens (full text windows: the mean of the two
    micro-batch means is the mean over the 8 windows), there is no dropout, and the micro-batches are
    the big batch's halves in order."""
    run, _ = small_run(corpus, tmp_path, "data.batch_size=16")
    data = TextDataModule(run.data.paths, run.data.seq_len, batch_size=16, seed=0)
    data.setup()
    examples = data.make_train_batch(0)  # 16 windows: two steps of 8
    assert bool((examples[1] != IGNORE_INDEX).all())  # every token scored in every micro-batch
    initial = {k: v.double() for k, v in build_module(run).state_dict().items()}

    big_grads, big_params = _fit_on_examples(corpus, tmp_path / "b8", 8, 1, examples, initial)
    acc_grads, acc_params = _fit_on_examples(corpus, tmp_path / "b4x2", 4, 2, examples, initial)
    assert len(big_grads) == len(acc_grads) == 2
    for big, acc in zip(big_grads, acc_grads, strict=True):
        for name in big:
            assert big[name].dtype == torch.float64
            torch.testing.assert_close(acc[name], big[name], rtol=0, atol=1e-10)
    for name in big_params:
        torch.testing.assert_close(acc_params[name], big_params[name], rtol=0, atol=1e-10)

    # the comparison can fail: without accumulation, a step of 4 windows has other gradients
    small_grads, _ = _fit_on_examples(corpus, tmp_path / "b4", 4, 1, examples, initial)
    differences = [float((small_grads[0][n] - big_grads[0][n]).abs().max()) for n in big_grads[0]]
    assert max(differences) > 1e-4


@pytest.mark.slow  # a training run of 7 steps with 3 validations (~3 s)
def test_log_and_validation_intervals_count_optimizer_steps(corpus, tmp_path) -> None:
    out = tmp_path / "run"
    run, cfg = small_run(
        corpus, out, "trainer.max_steps=7", "trainer.log_every_n_steps=3", "trainer.val_check_interval=3",
        "trainer.accumulate_grad_batches=2", "trainer.diagnostics_batches=0",
    )  # fmt: skip
    train(run, cfg)
    rows = _metrics_rows(out)
    logged = [int(r["step"]) for r in rows if r["train_loss"]]
    # Lightning's rule, in optimizer steps, and the last step (its final validation)
    assert logged == [s for s in range(7) if (s + 1) % 3 == 0] + [6]
    validated = [float(r["val_step"]) for r in rows if r.get("val_step")]
    assert validated == [3.0, 6.0, 7.0]  # every 3 optimizer steps (6 batches), then the final one


class _RecordDeterminism(L.Callback):
    def __init__(self):
        self.seen: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        flags = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        self.seen.append(flags)


@pytest.mark.slow  # two training runs of 2 steps (~2 s)
@pytest.mark.parametrize(("value", "expected"), [("true", (True, False)), ("warn", (True, True))])
def test_deterministic_holds_during_the_run_and_is_undone_after(corpus, tmp_path, value, expected) -> None:
    run, cfg = small_run(corpus, tmp_path / "run", "trainer.max_steps=2", f"trainer.deterministic={value}")
    assert not torch.are_deterministic_algorithms_enabled()
    record = _RecordDeterminism()
    train(run, cfg, callbacks=[record])
    assert record.seen == [expected, expected]
    assert not torch.are_deterministic_algorithms_enabled()  # the process is as it was


@pytest.mark.slow  # a training run of 3 steps (~1 s)
def test_gradient_clip_val_clips_the_applied_gradients(corpus, tmp_path) -> None:
    """``trainer.gradient_clip_val`` is ``optim.grad_clip``: every step applies gradients of norm <= it."""
    norms: list[float] = []

    class RecordAppliedNorm(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            # after the step the gradients it applied are still there (zeroed before the next backward)
            grads = [p.grad.norm() for p in pl_module.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))

    run, cfg = small_run(corpus, tmp_path / "run", "trainer.max_steps=3", "trainer.gradient_clip_val=0.01")
    assert run.optim.grad_clip == 0.01
    train(run, cfg, callbacks=[RecordAppliedNorm()])
    assert len(norms) == 3 and all(0.01 * (1 - 1e-4) <= n <= 0.01 * (1 + 1e-4) for n in norms), norms


@pytest.mark.slow  # ~3 s: a short training run in bf16
def test_a_bf16_true_run_trains_validates_and_counts_its_tokens_exactly(corpus, tmp_path) -> None:
    # bf16-true casts the whole LightningModule, its metrics too; their sums stay float64, so the
    # validation perplexity is the exponential of the mean validation loss, not a bf16 count's.
    run, cfg = small_run(
        corpus, tmp_path / "run", "trainer.precision=bf16-true", "trainer.max_steps=2", "trainer.val_every=2"
    )
    result = train(run, cfg)
    assert math.isfinite(result.metrics["val_ppl"])
    assert result.metrics["val_ppl"] == pytest.approx(math.exp(result.metrics["val_loss"]), rel=1e-3)


@pytest.mark.slow  # a few one- or two-step fits of a tiny model (~1 s)
@pytest.mark.parametrize(
    ("schedule", "module_steps", "trainer_length", "warned"),
    [
        ("cosine", 1000, {"max_steps": 2}, True),
        ("wsd", 1000, {"max_epochs": 1}, True),  # epochs decide: 2 batches, one step each
        ("cosine", 2, {"max_steps": 2}, False),
        ("linear", 2, {"max_epochs": 1}, False),
        ("constant", 1000, {"max_steps": 2}, False),  # a constant schedule does not depend on its length
    ],
)
def test_a_users_trainer_of_another_length_than_the_schedule_is_warned_once(
    tmp_path, caplog, schedule, module_steps, trainer_length, warned
) -> None:
    from innerloop.train import LanguageModelModule

    module = LanguageModelModule(
        model={"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 32},
        schedule=schedule, max_steps=module_steps, warmup_steps=0, decay_steps=0,
    )  # fmt: skip
    tokens = torch.randint(0, 256, (4, 17))
    data = DataLoader(FixedExamples(tokens[:, :-1], tokens[:, 1:]), batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **trainer_length,
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="innerloop.train.module"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes on a tiny run without validation data
        trainer.fit(module, train_dataloaders=data)
    messages = [r.getMessage() for r in caplog.records if "learning-rate schedule" in r.getMessage()]
    if warned:
        assert len(messages) == 1, messages
        assert (
            "take 2 optimizer steps" in messages[0] and f"runs over max_steps={module_steps}" in messages[0]
        )
        assert "build the module with max_steps=2" in messages[0]
    else:
        assert messages == []
