"""Review s15 (config), load.py findings: omegaconf's ``???`` marker, symbolic link loops, a list or a
mapping where the other is expected, a min_lr that a constant schedule never reads, a key given twice,
an empty YAML file, and optim/trainer keys that change nothing."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from innerloop.cli import main
from innerloop.config import ConfigError, load_config
from innerloop.config.load import (
    _merge,
    _schema,
    check_output_dir,
    check_tokenizer_out_outside_data,
    read_run_config,
)
from innerloop.train.run import build_module


def _load(overrides, tmp_path, config="tiny", **kwargs):
    """load_config with an out_dir in ``tmp_path`` (unless the overrides give one) and its warnings."""
    if not any(item.startswith("out_dir=") for item in overrides):
        overrides = [*overrides, f"out_dir={tmp_path / 'run'}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run, _ = load_config(config, overrides, **kwargs)
    return run, [str(w.message) for w in caught]


# -- H1: '???' (omegaconf's mandatory-value marker) ---------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "takes"),
    [
        ("model.mixer=???", "model.mixer", "a string, e.g. its default 'ttt'"),
        ("out_dir=???", "out_dir", "a string"),
        ("data.tokenizer=???", "data.tokenizer", "a string"),
        ("data.paths=???", "data.paths", "a list of paths"),
        ("trainer.precision=???", "trainer.precision", "a string"),
        ("model.ttt.inner_model=???", "model.ttt.inner_model", "'linear'"),
        ("logger=???", "logger", "a logger's name or a list of names"),
        ("trainer.lightning=???", "trainer.lightning", "a mapping of lightning.Trainer arguments"),
        ("trainer.lightning.deterministic=???", "trainer.lightning.deterministic", "true or false"),
        ("trainer.deterministic=???", "trainer.lightning.deterministic", "true or false"),
        ("model.hidden_size=???", "model.hidden_size", "a decimal integer"),
        ("optim.lr=???", "optim.lr", "a decimal number"),
        ("trainer.progress_bar=???", "trainer.progress_bar", "true or false"),
        ("seed='???'", "seed", "quoted or not"),
    ],
)
def test_the_missing_marker_in_an_override_is_refused_naming_the_key(tmp_path, override, key, takes) -> None:
    with pytest.raises(ConfigError) as caught:
        _load([override], tmp_path)
    message = str(caught.value)
    assert f"config key {key!r} in override {override!r} is '???', a value to fill in" in message
    assert takes in message and "not a decimal integer" not in message


def test_the_missing_marker_in_a_template_file_is_refused_naming_the_file(tmp_path) -> None:
    """A template whose data.paths nobody filled in trained on the standard library's source."""
    template = tmp_path / "template.yaml"
    template.write_text("data:\n  paths: ???\nmodel:\n  mixer: ???\n")
    with pytest.raises(ConfigError, match=r"config key 'data.paths' in file '.*template.yaml' is '\?\?\?'"):
        _load([], tmp_path, config=str(template))
    template.write_text("data:\n  paths:\n    - ???\n")
    with pytest.raises(ConfigError, match=r"'data.paths\[0\]' in file .* is '\?\?\?', a value to fill in"):
        _load([], tmp_path, config=str(template))
    template.write_text("trainer:\n  lightning:\n    deterministic: ???\n")
    with pytest.raises(ConfigError, match=r"'trainer.lightning.deterministic' in file .* a value to fill in"):
        _load([], tmp_path, config=str(template))


# -- M1: a symbolic link loop as a path ------------------------------------------------------------------


@pytest.fixture
def loop(tmp_path) -> Path:
    """``loop/a -> b -> a``: a link that leads back to itself."""
    folder = tmp_path / "loop"
    folder.mkdir()
    os.symlink("b", folder / "a")
    os.symlink("a", folder / "b")
    return folder / "a"


def test_a_link_loop_as_data_path_or_out_dir_is_one_config_error(tmp_path, loop) -> None:
    with pytest.raises(ConfigError, match=rf"data.paths entry {str(loop)!r} is a symbolic link loop"):
        _load([f"data.paths=[{loop}]"], tmp_path)
    with pytest.raises(ConfigError, match=rf"data.paths entry '{loop}/\*.txt' is a symbolic link loop"):
        _load([f"data.paths=[{loop}/*.txt]"], tmp_path)
    with pytest.raises(ConfigError, match=rf"out_dir={str(loop)!r} is a symbolic link loop"):
        _load([f"out_dir={loop}"], tmp_path)
    with pytest.raises(ConfigError, match=rf"out_dir='{loop}/run' is a symbolic link loop"):
        _load([f"out_dir={loop}/run", "data.name=recall"], tmp_path)


def test_a_link_loop_is_named_as_a_loop_not_as_a_link_to_a_missing_target(tmp_path, loop) -> None:
    """``--out`` of eval, compare and convert: it said 'a symbolic link to 'b', which does not exist'."""
    with pytest.raises(ConfigError, match=rf"--out={str(loop)!r} is a symbolic link loop"):
        check_output_dir(loop, "--out")
    with pytest.raises(ConfigError, match=rf"{str(loop)!r} is a symbolic link loop"):
        read_run_config(loop)


def test_a_link_loop_given_to_tokenizer_train_is_one_line_and_exit_2(tmp_path, loop, capsys) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text " * 50)
    with pytest.raises(ConfigError, match=rf"PATH {str(loop)!r} is a symbolic link loop"):
        check_tokenizer_out_outside_data(tmp_path / "tk", [str(loop)], ("tokenizer.json",))
    with pytest.raises(ConfigError, match=rf"--out {str(loop)!r} is a symbolic link loop"):
        check_tokenizer_out_outside_data(loop, [str(corpus)], ("tokenizer.json",))
    for arguments in ([str(loop), "--out", str(tmp_path / "tk")], [str(corpus), "--out", str(loop)]):
        assert main(["tokenizer", "train", *arguments, "--vocab-size", "300"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is a symbolic link loop" in err and "Traceback" not in err


# -- M2/M3: a list where a mapping is expected, or the reverse ----------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.paths={a: 1}", r"'data.paths' in override .* takes a list of paths .*, got a mapping: e.g. "),
        (
            "trainer.lightning=[1]",
            r"'trainer.lightning' in override .* takes a mapping .*, got a list: e.g. ",
        ),
        ("trainer.lightning=5", r"'trainer.lightning' .* takes a mapping .*, got one value '5'"),
        ("out_dir=[a]", r"'out_dir' in override .* takes a string, got a list"),
        (
            "data.paths=corpus.txt",
            r"'data.paths' in override .* got one value 'corpus.txt': write data.paths=\[corpus.txt\] "
            r"\(in YAML: paths: \[corpus.txt\]\)",
        ),
    ],
)
def test_a_container_of_the_wrong_kind_in_an_override_is_one_line(tmp_path, override, expected) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        _load([override], tmp_path)
    assert "AnyNode" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data:\n  paths:\n    a: 1\n", r"'data.paths' in file .* takes a list of paths .*, got a mapping"),
        ("trainer:\n  lightning: [1]\n", r"'trainer.lightning' in file .* takes a mapping .*, got a list"),
        (
            "data:\n  paths: corpus.txt\n",
            r"write data.paths=\[corpus.txt\] \(in YAML: paths: \[corpus.txt\]\)",
        ),
    ],
)
def test_a_container_of_the_wrong_kind_in_a_file_is_one_line(tmp_path, text, expected) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        _load([], tmp_path, config=str(path))
    with pytest.raises(ConfigError, match=expected.replace("in file", "in")):
        read_run_config(path)  # a run's config.yaml, as eval and compare read it


def test_a_yaml_merge_of_a_list_of_mappings_into_trainer_lightning_is_no_list(tmp_path) -> None:
    """``<<: [*a, *b]`` under a mapping key merges mappings: the kind check must not read it as a list."""
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lightning:\n    <<: [{deterministic: true}, {benchmark: false}]\n")
    run, _ = _load([], tmp_path, config=str(path))
    assert run.trainer.lightning == {"deterministic": True, "benchmark": False}


def test_a_merge_type_error_is_a_config_error() -> None:
    """omegaconf's TypeError ("Cannot merge incompatible container types") names no key."""
    with pytest.raises(ConfigError, match=r"file 'x.yaml': Cannot merge incompatible container types"):
        _merge(_schema(), OmegaConf.create({"data": {"paths": {"a": 1}}}), "file 'x.yaml'")


# -- L2, L1: keys the run never reads ---------------------------------------------------------------------


def test_a_constant_schedule_names_min_lr_as_unread_and_does_not_hold_lr_to_it(tmp_path) -> None:
    # regression review s15: the refusal advised a min_lr that the warning then called unread
    for min_lr in ("0.5", "0.001"):  # above and below optim.lr
        run, caught = _load(["optim.schedule=constant", f"optim.min_lr={min_lr}"], tmp_path)
        assert any(m.startswith("optim.min_lr (override") and "changes nothing" in m for m in caught)
    build_module(run)  # the training module takes it too
    with pytest.raises(ConfigError, match=r"must be <= optim.lr=.*decays from optim.lr to optim.min_lr"):
        _load(["optim.schedule=cosine", "optim.min_lr=0.5"], tmp_path)
    _, caught = _load(["optim.schedule=cosine", "optim.min_lr=0.001"], tmp_path)
    assert not [m for m in caught if "changes nothing" in m]


def test_diagnostics_batches_0_is_not_warned_about_on_a_model_without_ttt_layers(tmp_path) -> None:
    # regression review s15: the e2e presets set 0 (off) themselves, and a saved e2e config.yaml repeats it
    _, caught = _load(["trainer.diagnostics_batches=0", "model.mixer=attention"], tmp_path)
    assert not [m for m in caught if "changes nothing" in m]


@pytest.mark.parametrize(
    ("unread", "read"),
    [
        (["optim.decay_fraction=0.5"], ["optim.decay_fraction=0.5", "optim.schedule=wsd"]),
        (["optim.ttt_base_lr_init=0.5"], ["optim.ttt_base_lr_init=0.5", "optim.ttt_base_lr_warmup=5"]),
        (["trainer.diagnostics_batches=3", "model.mixer=attention"], ["trainer.diagnostics_batches=3"]),
    ],
)
def test_optim_and_trainer_keys_that_change_nothing_are_warned_about(tmp_path, unread, read) -> None:
    key = unread[0].partition("=")[0]
    _, caught = _load(unread, tmp_path)
    assert [m for m in caught if m.startswith(f"{key} (override") and "so it changes nothing" in m]
    _, caught = _load(read, tmp_path)
    assert not [m for m in caught if "changes nothing" in m]


def test_a_files_unread_optim_key_is_warned_about_and_params_does_not_warn(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  decay_fraction: 0.5\n")
    _, caught = _load([], tmp_path, config=str(path))
    assert any(m.startswith(f"optim.decay_fraction (file {str(path)!r})") for m in caught)
    _, caught = _load(["optim.decay_fraction=0.5"], tmp_path, model_only=True)  # innerloop params
    assert not [m for m in caught if "changes nothing" in m]


# -- L4: one key given twice -------------------------------------------------------------------------------


def test_a_key_given_twice_is_warned_about_naming_both(tmp_path) -> None:
    run, caught = _load([f"out_dir={tmp_path / 'A'}", f"out_dir={tmp_path / 'B'}"], tmp_path)
    assert run.out_dir == str(tmp_path / "B")  # the last, as before; now with a warning
    assert [m for m in caught if "config key 'out_dir' is given twice" in m and "'out_dir=" in m]
    _, caught = _load(["trainer.log_every=3", "trainer.log_every_n_steps=4"], tmp_path)  # one key, two names
    assert [m for m in caught if "'trainer.log_every' is given twice" in m and "log_every_n_steps=4" in m]
    _, caught = _load(["trainer.log_every=3", "trainer.max_steps=4"], tmp_path)
    assert not [m for m in caught if "twice" in m]


# -- L5: an empty YAML file ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "~\n", "# only a comment\n"])
def test_an_empty_yaml_file_is_refused(tmp_path, text) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"file {str(path)!r} is empty: no settings"):
        _load([], tmp_path, config=str(path))


def test_an_unknown_schedule_is_named_before_min_lr_is_held_to_it(tmp_path) -> None:
    # review s15 last commits, LOW: the min_lr error came first and hid the misspelt schedule
    with pytest.raises(ConfigError, match=r"optim.schedule='cosin' is not a schedule"):
        _load(["optim.schedule=cosin", "optim.min_lr=0.5"], tmp_path)
