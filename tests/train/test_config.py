"""Run configs: presets, overrides, and one clear error (with the valid choices) for a bad config."""

from __future__ import annotations

import re

import pytest

from innerloop.cli import main
from innerloop.config import ConfigError, load_config, save_config


def test_overrides_are_typed_and_merged(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("hello world\n" * 200)  # holds a window of seq_len=128 for validation
    paths = f"data.paths=[{tmp_path}/*.txt]"
    run, _ = load_config("tiny", ["trainer.max_steps=7", "model.ttt.inner_model=mlp", paths])
    assert run.trainer.max_steps == 7 and run.model.ttt.inner_model == "mlp"
    assert run.data.paths == [f"{tmp_path}/*.txt"]


def test_later_overrides_win_and_a_wrong_type_names_its_override() -> None:
    """The overrides are merged together in one merge; the error still names the override at fault,
    the first in order when a later one is malformed too."""
    with pytest.warns(UserWarning, match="'trainer.max_steps' is given twice in the overrides"):
        run, _ = load_config("tiny", ["trainer.max_steps=7", "seed=3", "trainer.max_steps=9"])
    assert run.trainer.max_steps == 9 and run.seed == 3
    expected = r"config key 'model.hidden_size' in override 'model.hidden_size=abc': .*\(expected int\)"
    for later in (["seed=4"], ["not an override"]):
        with pytest.raises(ConfigError, match=expected):
            load_config("tiny", ["trainer.max_steps=3", "model.hidden_size=abc", *later])
    with pytest.raises(ConfigError, match="override 'not an override' is not of the form key=value"):
        load_config("tiny", ["trainer.max_steps=3", "not an override"])


def test_the_saved_config_reloads_to_the_same_run(tmp_path) -> None:
    run, cfg = load_config("tiny-swa", ["model.window=5", f"out_dir={tmp_path}"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again, _ = load_config(str(path))
    assert again == run


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.hiden_size=3"],
            r"unknown config key 'model.hiden_size'.*valid keys here: \[.*'hidden_size'",
        ),
        (
            ["optimizer.lr=1"],
            r"unknown config key 'optimizer'.*valid keys here: \['data', 'logger', 'model', 'optim'",
        ),
        (["trainer.max_steps=abc"], r"config key 'trainer.max_steps'.*'abc'.*expected int"),
        (["model.ttt.inner_loss=contrastive"], r"inner_loss='contrastive' is not a registered.*'next_token'"),
        (
            ["model.mixer=lstm"],
            r"model.mixer='lstm'.*\['ttt', 'attention', 'swa', 'linear_attention', 'deltanet', 'gated_deltanet', 'titans'\]",
        ),
        (["trainer.strategy=ddpp"], r"trainer.strategy='ddpp' is not valid; valid: \[.*'ddp_spawn'"),
        (["data.name=imagenet"], r"data.name='imagenet'.*\['text', 'recall', 'hf'\]"),
        (["data.paths=[/no/such/file*.txt]"], r"matches no file"),
        (["max_steps"], r"not of the form key=value"),
    ],
)
def test_bad_configs_fail_before_training_and_list_the_choices(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_unknown_keys_in_a_yaml_file_are_errors(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  mixer: swa\n  windw: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.windw' in file .*valid keys here"):
        load_config(str(path))


def test_an_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ConfigError, match=r"neither a file nor a preset; presets: \[.*'tiny'"):
        load_config("huge")


@pytest.mark.parametrize(
    ("preset_or_file", "overrides", "message"),
    [
        (None, (), r"preset_or_file must be a preset name or a YAML file path, got NoneType"),
        ("tiny", "trainer.max_steps=5", r"overrides must be a list of 'key=value' strings, got str"),
        ("tiny", ["trainer.max_steps=5", 5], r"overrides must be 'key=value' strings, got 5 \(int\)"),
    ],
)
def test_arguments_of_the_wrong_kind_are_named(preset_or_file, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(preset_or_file, overrides)


def test_a_path_object_loads_as_its_string(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  hidden_size: 48\n")
    assert load_config(path)[0].model.hidden_size == load_config(str(path))[0].model.hidden_size == 48


def test_the_cli_prints_one_error_line_and_exits_2(capsys) -> None:
    assert main(["train", "model.ttt.update_rule=adam"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("innerloop train: error: model.ttt.update_rule='adam'")
    assert "'dual_form'" in err and "'minibatch_gd'" in err


def test_the_cli_lists_plugins(capsys) -> None:
    from innerloop.registry import available

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for kind in ("inner_model", "inner_loss", "update_rule"):
        for name in available(kind):
            assert name in out


@pytest.mark.parametrize(
    ("preset", "overrides", "named"),
    [
        (
            "recall-ttt",
            ["data.seq_len=64"],
            "data.seq_len=64 applies to data.name='text' or 'hf' only (this run's data.name is 'recall': the "
            "recall task makes its own sequences of 4 * data.recall.num_pairs + data.recall.gap - 1 = 95 tokens)",
        ),
        (
            "recall-ttt",
            ["data.paths=[a.txt]", "data.val_fraction=0.5"],
            "data.paths=['a.txt'], data.val_fraction=0.5 apply to data.name='text' or 'hf' only",
        ),
        ("tiny", ["data.recall.gap=3"], "data.recall.gap=3 applies to data.name='recall' only (this run's"),
    ],
)
def test_a_data_key_the_dataset_does_not_read_is_refused_by_name(preset, overrides, named) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(preset, overrides)


def test_a_recall_seq_len_equal_to_the_tasks_own_length_is_accepted() -> None:
    assert load_config("recall-ttt", ["data.seq_len=95"])[0].data.seq_len == 95  # 4 * 8 + 64 - 1


def test_the_presets_set_no_data_key_their_dataset_ignores() -> None:
    for preset in ("tiny", "recall-ttt", "recall-swa", "tiny-mlp", "ttt-linear-125m"):
        load_config(preset, [])


@pytest.mark.parametrize(
    ("paths", "shown"),
    [
        ("[[{dir}]]", "['{dir}'] is a list"),
        ("[[a, b], c]", "['a', 'b'] is a list"),
        ("[{a: 1}]", "{'a': 1} is a mapping"),
    ],
)
def test_a_data_paths_entry_that_is_not_a_string_is_one_error_naming_it(tmp_path, paths, shown) -> None:
    """A list or a mapping inside data.paths was a TypeError traceback (OmegaConf does not check the
    elements of a list[str] that are containers)."""
    paths, shown = paths.replace("{dir}", str(tmp_path)), shown.replace("{dir}", str(tmp_path))
    message = f"data.paths entry {shown}, not a path: each entry is one string, a file, folder or glob"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", [f"data.paths={paths}", f"out_dir={tmp_path / 'run'}"])
    (tmp_path / "nested.yaml").write_text(f"data:\n  paths: {paths}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(str(tmp_path / "nested.yaml"), [f"out_dir={tmp_path / 'run'}"])


def test_a_saved_or_resume_config_with_a_nested_data_paths_entry_is_one_error(tmp_path) -> None:
    from innerloop.config.load import (
        PRESET_OR_FILE,
        command_line_options,
        config_differences,
        read_run_config,
    )
    from innerloop.config.schema import RunConfig

    nested = tmp_path / "config.yaml"
    nested.write_text("data:\n  paths:\n    - [a, b]\n")
    with pytest.raises(
        ConfigError, match=re.escape(f"{str(nested)!r}: data.paths entry ['a', 'b'] is a list")
    ):
        read_run_config(nested)
    with pytest.raises(
        ConfigError, match=re.escape(f"--config {str(nested)!r}: data.paths entry ['a', 'b']")
    ):
        with command_line_options({PRESET_OR_FILE: "--config"}):  # train --resume --config nested
            config_differences(str(nested), [], RunConfig())
    with pytest.raises(ConfigError, match=re.escape(f"preset_or_file={str(nested)!r}: data.paths entry")):
        config_differences(str(nested), [], RunConfig())  # from Python: the parameter's name


def test_a_null_data_paths_entry_names_the_string_type() -> None:
    expected = (
        "config key 'data.paths[0]' in override 'data.paths=[null]' is null (no value): it takes a string"
    )
    with pytest.raises(ConfigError, match=re.escape(expected) + "$"):
        load_config("tiny", ["data.paths=[null]"])
