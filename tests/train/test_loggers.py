"""``logger``: csv (the default, as before), tensorboard (its event file holds the logged losses),
wandb (offline, when installed), several at once; all inside the run's folder; a missing package is a
clear error naming it and its ``pip install``."""

from __future__ import annotations

import csv
import importlib.util
import warnings
from pathlib import Path

import pytest
from test_trainer_options import small_run, write_corpus

from innerloop.cli import main
from innerloop.config.load import ConfigError
from innerloop.config.trainer_args import check_loggers
from innerloop.train import train
from innerloop.train.loggers import _CSVLogger
from innerloop.train.run import build_trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def _csv_series(log_dir: Path, name: str) -> list[tuple[int, float]]:
    with open(log_dir / "metrics.csv", newline="") as file:
        return [(int(row["step"]), float(row[name])) for row in csv.DictReader(file) if row.get(name)]


def _tensorboard_series(log_dir: Path, name: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(name)]


def test_the_default_is_one_csv_logger_as_before(corpus, tmp_path) -> None:
    run, _ = small_run(corpus, tmp_path / "run")
    assert run.logger == "csv"
    loggers = build_trainer(run).loggers
    assert len(loggers) == 1 and isinstance(loggers[0], _CSVLogger)
    assert Path(loggers[0].log_dir) == tmp_path / "run" / "logs" / "version_0"


@pytest.mark.slow  # two training runs of a few steps (~3 s)
def test_tensorboard_holds_the_logged_losses_beside_the_csv_log(corpus, tmp_path, monkeypatch) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # nothing may be written outside the run's folder
    out = tmp_path / "run"
    run, cfg = small_run(
        corpus, out, "logger=[csv,tensorboard]", "trainer.log_every=1", "trainer.max_steps=4"
    )
    train(run, cfg)

    launch = out / "logs" / "version_0"
    train_losses = _csv_series(launch, "train_loss")
    assert [step for step, _ in train_losses] == [0, 1, 2, 3]
    # the same values (float32 in both files) at the same steps
    assert _tensorboard_series(launch / "tensorboard", "train_loss") == train_losses
    assert _tensorboard_series(launch / "tensorboard", "val_loss") == _csv_series(launch, "val_loss")
    assert list(elsewhere.iterdir()) == []

    # a second launch (a resume) writes both logs into the next folder, together, without Lightning's
    # warning that the folder TensorBoard made first holds "previous log files" that "will be deleted"
    run, cfg = small_run(
        corpus, out, "logger=[tensorboard,csv]", "trainer.log_every=1", "trainer.max_steps=5"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(run, cfg, resume=True)
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    assert [
        step for step, _ in _tensorboard_series(out / "logs" / "version_1" / "tensorboard", "train_loss")
    ] == [4]
    assert [step for step, _ in _csv_series(out / "logs" / "version_1", "train_loss")] == [4]
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["version_0", "version_1"]
    assert list(elsewhere.iterdir()) == []


WANDB = importlib.util.find_spec("wandb") is not None


@pytest.mark.slow  # a training run (~2 s)
@pytest.mark.skipif(
    not WANDB,
    reason="wandb is not installed here (pip install wandb); its missing-package error is tested below",
)
def test_wandb_offline_writes_its_run_inside_the_run_folder(corpus, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "run"
    run, cfg = small_run(corpus, out, "logger=[csv,wandb]", "trainer.log_every=1", "trainer.max_steps=2")
    train(run, cfg)
    runs = list((out / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(f.stat().st_size > 0 for f in runs[0].glob("*.wandb"))
    assert [step for step, _ in _csv_series(out / "logs" / "version_0", "train_loss")] == [0, 1]
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(("logger", "package"), [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_logger_whose_package_is_missing_says_how_to_install_it(monkeypatch, logger, package) -> None:
    real_find_spec = importlib.util.find_spec
    missing = {"wandb", "tensorboard", "tensorboardX"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find_spec(name, *a)
    )
    message = rf"logger='{logger}' needs the '{package}' package, which is not installed here: pip install {package}"
    with pytest.raises(ConfigError, match=message):
        check_loggers(["csv", logger], ConfigError)


@pytest.mark.skipif(WANDB, reason="wandb is installed here: the CLI's missing-package line needs it absent")
def test_the_cli_says_in_one_line_that_wandb_is_missing(capsys) -> None:
    assert main(["train", "logger=wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "innerloop train: error: logger='wandb' needs the 'wandb' package, which is not installed here: "
        "pip install wandb"
    )


@pytest.mark.parametrize(
    ("logger", "message"),
    [
        ("mlflow", r"logger='mlflow' is not a logger; valid: \['csv', 'tensorboard', 'wandb'\]"),
        ([], r"logger=\[\] names no logger"),
        (["csv", "csv"], r"names 'csv' twice"),
        (3, r"logger=3 must be a logger's name or a list of names"),
        (["csv", 3], r"must be a logger's name or a list of names"),
    ],
)
def test_bad_logger_values_are_one_line_errors(logger, message) -> None:
    with pytest.raises(ConfigError, match=message):
        check_loggers(logger, ConfigError)


def test_logger_lists_come_from_overrides(corpus, tmp_path) -> None:
    run, _ = small_run(corpus, tmp_path, "logger=[csv,tensorboard]")
    assert run.logger == ["csv", "tensorboard"]
    loggers = build_trainer(run).loggers
    assert [type(x).__name__ for x in loggers] == ["_CSVLogger", "_TensorBoardLogger"]
    launch = tmp_path / "logs" / "version_0"  # one folder per launch, for all its loggers
    assert [Path(x.log_dir) for x in loggers] == [launch, launch / "tensorboard"]


def test_tensorboards_hparams_yaml_is_written_atomically(tmp_path, monkeypatch) -> None:
    """Lightning's TensorBoardLogger wrote hparams.yaml in place (a kill meanwhile left it empty or
    partial): it is written to a temporary file and renamed, once."""
    import innerloop.train.loggers as loggers

    written_to: list[Path] = []
    original = loggers.save_hparams_to_yaml

    def recording(path, hparams) -> None:
        written_to.append(Path(path))
        original(path, hparams)

    monkeypatch.setattr(loggers, "save_hparams_to_yaml", recording)
    (tensorboard,) = loggers.build_loggers("tensorboard", tmp_path)
    tensorboard.log_hyperparams({"lr": 0.5})
    tensorboard.save()
    target = Path(tensorboard.log_dir) / "hparams.yaml"
    assert written_to and target not in written_to  # written elsewhere, then renamed into place
    assert "lr: 0.5" in target.read_text()
    tensorboard.save()  # once: an existing file is left as it is
    assert len(written_to) == 1
