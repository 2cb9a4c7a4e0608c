"""Review s54a: an old checkpoint whose record lacks a ``data.*`` key is refused, not scored on the default
corpus; notes on relative ``data.paths`` name where they were read; ``trainer.max_time`` resumes and
numbers; one text for a non-finite layer output."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from innerloop.config.load import ConfigError, load_config, save_config
from innerloop.train.checkpoint import save_checkpoint
from innerloop.train.module import LanguageModelModule
from innerloop.train.run import RUN_DATA_KEY, evaluation_windows, run_data_record

MODEL = {"hidden_size": 16, "num_heads": 2, "num_layers": 2, "intermediate_size": 32}
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120))


def _overrides(out: Path, data: str | None, *extra: str) -> list[str]:
    return [
        *(f"model.{key}={value}" for key, value in MODEL.items()),
        "model.ttt.mini_batch_size=4", "data.seq_len=16", "data.batch_size=3", "data.val_batches=2",
        "trainer.num_position_buckets=4", f"out_dir={out}", *([f"data.paths=[{data}]"] if data else []), *extra,
    ]  # fmt: skip


def _run_folder(
    out: Path, data: str | None, *extra: str, drop: tuple[str, ...] = (), paths: list[str] | None = None
) -> tuple[Path, LanguageModelModule]:
    """A run folder: its config.yaml and a checkpoint recording the run's data.* and seed, less the keys
    ``drop`` (an older innerloop's record), its ``data.paths`` replaced by ``paths`` when given."""
    run, config = load_config("tiny", _overrides(out, data, *extra))
    module = LanguageModelModule(model=asdict(run.model), seq_len=16, num_position_buckets=4)
    record = {k: v for k, v in run_data_record(run).items() if k not in drop}
    if paths is not None:
        record["data.paths"] = paths
    tree = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "global_step": 0,
        RUN_DATA_KEY: record,
    }
    checkpoint = save_checkpoint(tree, out / "last.safetensors")
    save_config(config, out / "config.yaml")
    return checkpoint, module


def _copied_beside_another(
    tmp_path: Path, other: list[str], drop: tuple[str, ...]
) -> tuple[Path, LanguageModelModule]:
    data = tmp_path / "code.py"
    data.write_text(TEXT)
    own, module = _run_folder(tmp_path / "a", str(data), drop=drop)
    _run_folder(tmp_path / "b", str(data), *other)
    copied = tmp_path / "b" / "a.safetensors"
    shutil.copy(own, copied)
    return copied, module


@pytest.mark.slow  # ~0.5 s each: two run folders, refused before any window is read
@pytest.mark.parametrize(
    "other",
    [["data.val_batches=5"], ["model.hidden_size=32"]],  # other data settings; another model
)
def test_an_old_record_beside_another_runs_config_is_refused_naming_the_missing_keys(tmp_path, other) -> None:
    copied, module = _copied_beside_another(tmp_path, other, drop=("data.text_field", "data.streaming"))
    # was: the default corpus's held-out split, the reason in the windows' source only
    with pytest.raises(ConfigError) as err:
        evaluation_windows(copied, module, [], 16)
    text = str(err.value)
    assert "data.text_field" in text and "data.streaming" in text, text
    assert "--data" in text or "paths" in text, text
    assert "config.yaml" in text, text


@pytest.mark.slow  # ~0.4 s: a run folder
def test_an_old_record_alone_is_refused_naming_the_missing_keys(tmp_path) -> None:
    data = tmp_path / "code.py"
    data.write_text(TEXT)
    own, module = _run_folder(tmp_path / "a", str(data), drop=("data.split",))
    alone = tmp_path / "alone.safetensors"
    shutil.copy(own, alone)
    with pytest.raises(ConfigError, match="data.split"):  # was: the default corpus
        evaluation_windows(alone, module, [], 16)


@pytest.mark.slow  # ~0.5 s: two run folders, 3 windows
def test_an_old_record_with_files_given_is_scored_on_them(tmp_path) -> None:
    copied, module = _copied_beside_another(tmp_path, ["data.val_batches=5"], drop=("data.text_field",))
    windows = evaluation_windows(copied, module, [str(tmp_path / "code.py")], 16, batches=1)
    assert windows.inputs.shape[1] == 16  # the files named: no refusal


@pytest.mark.slow  # ~0.4 s: a run folder, 3 windows
def test_a_relative_recorded_path_names_the_checkpoint_not_a_config_yaml(tmp_path, monkeypatch) -> None:
    (tmp_path / "code.py").write_text(TEXT)
    monkeypatch.chdir(tmp_path)
    own, module = _run_folder(tmp_path / "a", str(tmp_path / "code.py"), paths=["code.py"])
    alone = tmp_path / "alone.safetensors"
    shutil.copy(own, alone)
    source = evaluation_windows(alone, module, [], 16, batches=1).source
    assert "config.yaml records" not in source, source  # was: "its config.yaml records relative data.paths"
    assert f"{str(alone)!r} records relative data.paths ['code.py']" in source, source


@pytest.mark.slow  # ~0.5 s: two run folders, 3 windows
def test_a_relative_recorded_path_beside_another_run_keeps_the_overruled_clause(
    tmp_path, monkeypatch
) -> None:
    (tmp_path / "code.py").write_text(TEXT)
    monkeypatch.chdir(tmp_path)
    own, module = _run_folder(tmp_path / "a", str(tmp_path / "code.py"), paths=["code.py"])
    _run_folder(tmp_path / "b", str(tmp_path / "code.py"), "data.val_batches=5")
    copied = tmp_path / "b" / "a.safetensors"
    shutil.copy(own, copied)
    source = evaluation_windows(copied, module, [], 16, batches=1).source
    assert "is another run's" in source, source  # was: dropped for the relative-paths note
    assert "config.yaml records" not in source, source
    assert f"{str(copied)!r} records relative data.paths ['code.py']" in source, source


@pytest.mark.slow  # ~0.5 s: run folders and a model loaded
@pytest.mark.parametrize("beside_another", [False, True])
def test_compares_reason_for_an_unknown_run_names_the_records_gap(tmp_path, beside_another) -> None:
    from innerloop.train.compare import _training_data, load_compared_model

    data = tmp_path / "code.py"
    data.write_text(TEXT)
    if beside_another:
        path, _ = _copied_beside_another(tmp_path, ["data.val_batches=5"], drop=("data.split",))
    else:
        own, _ = _run_folder(tmp_path / "a", str(data), drop=("data.split",))
        path = tmp_path / "alone.safetensors"
        shutil.copy(own, path)
    unknown = _training_data(load_compared_model(path, "m", False)).unknown
    assert "records no run" not in unknown, unknown  # was: "no config.yaml beside ..., and it records no run"
    assert "lacks data.split" in unknown, unknown  # was: only "the config.yaml beside ... is another run's"


def _stopped_timer(limit: float, at_launch: float, elapsed: float):
    """Lightning's Timer of a launch that started with ``at_launch`` s spent (the checkpoint's) and
    stopped with ``elapsed`` s spent over all launches, under ``trainer.max_time`` = ``limit`` s."""
    from datetime import timedelta

    from lightning.pytorch.callbacks import Timer
    from lightning.pytorch.trainer.states import RunningStage

    timer = Timer(duration=timedelta(seconds=limit))
    timer.load_state_dict({"time_elapsed": {RunningStage.TRAINING.value: at_launch}})
    timer._start_time[RunningStage.TRAINING] = 100.0
    timer._end_time[RunningStage.TRAINING] = 100.0 + elapsed - at_launch
    return timer


@pytest.mark.parametrize(
    ("limit", "at_launch", "elapsed", "suggested"),
    [
        (60, 0, 61, "00:00:02:01"),  # the first stop: 61 s spent + 60 s
        (121, 61, 122, "00:00:03:02"),  # the resumed launch (60 s given) stops: 122 + 60, not 122 + 121
        (
            182,
            122,
            184,
            "00:00:04:04",
        ),  # a third leg (given 182 as told): still 60 s more each leg, not doubling
        (60, 61, 61.5, "00:00:02:02"),  # a bare resume (its limit already spent): 61.5 + 60
    ],
)
def test_a_max_time_stop_suggests_the_time_spent_and_what_this_launch_was_given(
    limit, at_launch, elapsed, suggested
) -> None:
    from types import SimpleNamespace

    from innerloop.train import run as run_module

    trainer = SimpleNamespace(callbacks=[_stopped_timer(limit, at_launch, elapsed)])
    said = run_module._continuing(SimpleNamespace(out_dir="runs/x"), trainer)
    assert f"trainer.max_time={suggested}" in said, said


def _checked_max_time(value):
    from innerloop.config.trainer_args import check_lightning_arguments

    check_lightning_arguments({"max_time": value}, ConfigError)


@pytest.mark.parametrize(
    ("amount", "kind"),
    [
        ("np.int64(2)", "int64"),  # was: "is not a finite number"
        ("np.float32(1.5)", "float32"),  # was: "is not a finite number"
        (
            "np.float64(1.5)",
            "float64",
        ),  # was: accepted, then a bare OmegaConf UnsupportedValueType saving config.yaml
        ("Decimal(2)", "Decimal"),
        ("Fraction(3, 2)", "Fraction"),
    ],
)
def test_a_max_time_part_of_another_number_type_is_told_to_be_converted(amount, kind) -> None:
    from decimal import Decimal  # noqa: F401 (eval)
    from fractions import Fraction  # noqa: F401 (eval)

    import numpy as np  # noqa: F401 (eval)

    with pytest.raises(ConfigError) as err:
        _checked_max_time({"hours": eval(amount)})
    text = str(err.value)
    assert "trainer.max_time" in text and "hours=" in text and kind in text, text
    assert "Python int or float" in text and "float(...)" in text, text


@pytest.mark.parametrize("amount", [True, "np.bool_(True)", float("nan"), "2", [2]])
def test_a_max_time_part_that_is_no_number_is_refused_naming_its_type(amount) -> None:
    import numpy as np  # noqa: F401 (eval)

    value = eval(amount) if amount == "np.bool_(True)" else amount
    with pytest.raises(ConfigError) as err:
        _checked_max_time({"hours": value})
    text = str(err.value)
    assert "trainer.max_time" in text and "hours=" in text and "not a finite number" in text, text
    assert f"({type(value).__name__})" in text, text


def test_python_numbers_stay_accepted_as_max_time_parts() -> None:
    _checked_max_time({"hours": 2, "minutes": 1.5})


def test_a_timedelta_max_time_is_kept_as_a_mapping_config_yaml_holds(tmp_path) -> None:
    from dataclasses import replace
    from datetime import timedelta

    from innerloop.config.load import validate_run_config

    run, _ = load_config("tiny", [f"out_dir={tmp_path / 'out'}"])
    limit = timedelta(hours=1, microseconds=5)
    run = replace(run, trainer=replace(run.trainer, lightning={"max_time": limit}))
    validate_run_config(run)
    # was: accepted, then OmegaConf's UnsupportedValueType ('timedelta') when the run saved config.yaml
    save_config(run, tmp_path / "config.yaml")
    saved, _ = load_config(str(tmp_path / "config.yaml"))
    assert timedelta(**saved.trainer.lightning["max_time"]) == limit  # the same limit for the Timer
