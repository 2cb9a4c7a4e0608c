"""Config values are taken as the kind their key declares, never converted from another kind.

YAML 1.1 (which OmegaConf reads) and OmegaConf's conversions would read ``yes`` or ``1`` as a bool,
``0x20``, ``017`` or full-width digits as a number: each is refused, naming the key, the value and
what the key takes, wherever the value comes from (an override, a YAML file, a run's config.yaml,
``innerloop params``). Also here: keys given no value, empty paths, and the warning for a ``model.*``
key an override sets that the model never reads.
"""

from __future__ import annotations

import re
import warnings

import pytest

from innerloop.cli import main
from innerloop.config.load import ConfigError, load_config, preset_names, read_run_config, save_config

REFUSED = [
    ("trainer.progress_bar=2", "'2' is not true or false (expected bool)"),
    ("trainer.progress_bar=yes", "'yes' is not true or false"),
    ("trainer.progress_bar=on", "'on' is not true or false"),
    ("trainer.progress_bar='yes'", "'yes' (a quoted string) is not true or false"),
    ("model.hidden_size='0x20'", "'0x20' (a quoted string) is not a decimal integer"),
    ("model.hidden_size='６４'", "'６４' (a quoted string) is not a decimal integer"),
    ("trainer.max_steps='null'", "'null' (a quoted string) is not a decimal integer"),
    ("model.ttt.use_gate='null'", "'null' (a quoted string, not null: write null unquoted) is not true or"),
    ("trainer.enable_progress_bar=1", "config key 'trainer.progress_bar' in override"),  # Lightning's name
    ("model.ttt.use_gate=1", "'1' is not true or false, or null (expected Optional[bool])"),
    ("model.hidden_size=６４", "'６４' is not a decimal integer"),
    ("model.hidden_size=0x20", "'0x20' is not a decimal integer"),
    ("model.hidden_size=017", "'017' is not a decimal integer"),  # YAML 1.1 octal: 15
    ("model.hidden_size=0o20", "'0o20' is not a decimal integer"),
    ("model.hidden_size=0b100000", "'0b100000' is not a decimal integer"),
    ("model.hidden_size=true", "'true' is not a decimal integer"),
    ("optim.lr=0x10", "'0x10' is not a decimal number (e.g. 3e-4, 0.5 or 2) (expected float)"),
    ("optim.lr=1:30", "'1:30' is not a decimal number"),  # YAML 1.1 sexagesimal: 90
    ("optim.lr=１", "'１' is not a decimal number"),
    # Lightning's arguments: their types come from lightning.Trainer, whose import takes seconds
    pytest.param(
        "trainer.deterministic=yes", "'yes' is not true or false, or 'warn', or null", marks=pytest.mark.slow
    ),
    pytest.param(
        "trainer.accumulate_grad_batches=0x2", "'0x2' is not a decimal integer", marks=pytest.mark.slow
    ),
]


@pytest.mark.parametrize(("override", "message"), REFUSED)
def test_a_value_of_another_kind_is_refused_not_converted(override, message) -> None:
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        load_config("tiny", [override])
    assert f"in override {override!r}" in str(caught.value) and key.split(".")[-1] in str(caught.value)


def test_values_of_their_own_kind_are_taken() -> None:
    run, _ = load_config(
        "tiny",
        [
            "trainer.max_steps=10_000",
            "seed=+5",
            "optim.lr=1",
            "optim.min_lr=.5e-5",
            "optim.weight_decay=1e-2",
            "trainer.progress_bar=FALSE",
            "model.ttt.use_gate=null",
            "model.ttt.share_qk=true",
        ],
    )
    assert (run.trainer.max_steps, run.seed, run.optim.lr, run.optim.min_lr) == (10_000, 5, 1.0, 5e-6)
    assert run.optim.weight_decay == 0.01 and run.trainer.progress_bar is False
    assert run.model.ttt.use_gate is None and run.model.ttt.share_qk is True


def test_a_yaml_file_is_held_to_the_same_kinds(tmp_path) -> None:
    for text, message in [
        ("trainer:\n  progress_bar: yes\n", "config key 'trainer.progress_bar' in file"),
        ("model:\n  hidden_size: 0x20\n", "'0x20' is not a decimal integer"),
        ("model:\n  hidden_size: '0x40'\n", "'0x40' (a quoted string) is not a decimal integer"),
        ("model:\n  hidden_size: !!int '0x40'\n", "'0x40' (a quoted string) is not a decimal integer"),
        ("model:\n  tie_embeddings: 'on'\n", "'on' (a quoted string) is not true or false"),
        ("base: &b\n  use_gate: 1\nmodel:\n  ttt:\n    <<: *b\n", "config key 'model.ttt.use_gate'"),
    ]:
        path = tmp_path / "mine.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(str(path))


def test_a_quoted_value_whose_text_fits_its_key_is_taken(tmp_path) -> None:
    """As innerloop read them before 0.1's kind checks: a quoted number or bool whose text is one."""
    run, _ = load_config(
        "tiny",
        ['optim.lr="0.001"', "trainer.max_steps='5'", 'model.tie_embeddings="true"', "seed='+7'"],
    )
    assert (run.optim.lr, run.trainer.max_steps, run.model.tie_embeddings, run.seed) == (0.001, 5, True, 7)
    path = tmp_path / "mine.yaml"
    path.write_text(
        'optim:\n  lr: "3e-4"\n  min_lr: \'.5e-5\'\ntrainer:\n  max_steps: !!int "10_000"\n'
        "  progress_bar: \"False\"\nmodel:\n  ttt:\n    use_gate: 'true'\n"
    )
    for loaded in (load_config(str(path))[0], read_run_config(path)):
        assert (loaded.optim.lr, loaded.optim.min_lr, loaded.trainer.max_steps) == (3e-4, 5e-6, 10_000)
        assert loaded.trainer.progress_bar is False and loaded.model.ttt.use_gate is True


@pytest.mark.parametrize(
    ("text", "override"),
    [("model:\n", "model="), ("model:\n  ttt:\n", "model.ttt="), ("model: ~\n", "model=null")],
)
def test_a_section_given_no_value_lists_its_keys(tmp_path, text, override) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    key = override.partition("=")[0]
    message = f"config key {key!r} in {{}} is a section, not a value: give a mapping of its keys ["
    with pytest.raises(ConfigError, match=re.escape(message.format(f"file {str(path)!r}"))):
        load_config(str(path))
    with pytest.raises(ConfigError, match=re.escape(message.format(f"override {override!r}"))):
        load_config("tiny", [override])


def test_a_hand_edited_run_config_is_held_to_the_same_kinds(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  ttt:\n    use_gate: 1\n")
    with pytest.raises(ConfigError, match=r"config key 'model.ttt.use_gate' in '.*config.yaml': '1' is not"):
        read_run_config(path)


@pytest.mark.slow  # ~1.5 s in all: every preset, loaded, saved and loaded again
@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_and_the_config_yaml_innerloop_saves_of_it_still_load(tmp_path, preset) -> None:
    """Presets, and config.yaml files written by innerloop (floats as 1.0e-05, nulls, booleans), are
    read as they were."""
    run, cfg = load_config(preset, [f"out_dir={tmp_path}"], model_only=True)
    saved = save_config(cfg, tmp_path / "config.yaml")
    assert read_run_config(saved) == run
    assert load_config(str(saved), model_only=True)[0] == run


def test_an_interpolation_is_checked_once_resolved(monkeypatch) -> None:
    with pytest.raises(
        ConfigError, match=r"the interpolation resolves to 0 \(int\), which is not true or false"
    ):
        load_config("tiny", ["trainer.progress_bar=${seed}"])
    monkeypatch.setenv("INNERLOOP_TEST_STEPS", "0x5")
    with pytest.raises(ConfigError, match=r"resolves to '0x5' \(str\), which is not a decimal integer"):
        load_config("tiny", ["trainer.max_steps=${oc.env:INNERLOOP_TEST_STEPS}"])
    monkeypatch.setenv("INNERLOOP_TEST_STEPS", "5")
    run, _ = load_config(
        "tiny", ["trainer.max_steps=${oc.env:INNERLOOP_TEST_STEPS}", "seed=2", "optim.lr=${seed}"]
    )
    assert run.trainer.max_steps == 5 and run.optim.lr == 2.0  # an int for a float key, as given directly


def test_params_refuses_a_value_of_another_kind(capsys) -> None:
    assert main(["params", "model.hidden_size=0x20"]) == 2
    assert "'0x20' is not a decimal integer" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("out_dir=", "config key 'out_dir' in override 'out_dir=' is given no value: it takes a string, e.g. its default 'runs/tiny'"),
        ("model.mixer=", "config key 'model.mixer' in override 'model.mixer=' is given no value: it takes a string, e.g. its default 'ttt'"),
        ("data.tokenizer=null", "config key 'data.tokenizer' in override 'data.tokenizer=null' is null (no value): it takes a string, e.g. its default 'bytes'"),
        ("trainer.max_steps=", "is given no value: it takes a decimal integer (ASCII digits, an optional sign, e.g. 64 or 10_000), e.g. its default 1000"),
    ],
)  # fmt: skip
def test_a_key_given_no_value_says_so(override, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message) + "$"):
        load_config("tiny", [override])


def test_an_empty_tokenizer_path_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=re.escape("data.tokenizer='' is empty: give 'bytes', a tokenizer.json")
    ):
        load_config("tiny", ["data.tokenizer=''"])


@pytest.mark.parametrize(
    ("arguments", "command", "shown"),
    [
        (["export", "{ckpt}", "{out}", "--tokenizer", ""], "export", "--tokenizer ''"),
        (["export", "{ckpt}", ""], "export", "OUT_DIR ''"),
        (["convert", "--tokenizer", "", "ttt-lm-pytorch", "{out}", "{out}"], "convert", "--tokenizer ''"),
        (["convert", "ttt-lm-pytorch", "", "{out}"], "convert", "SRC ''"),
        (["train", "--config", "", "trainer.max_steps=1"], "train", "--config ''"),
        (["params", "--config", ""], "params", "--config ''"),
        (["compare", "{ckpt}", ""], "compare", "RUN_OR_CKPT ''"),
        (["tokenizer", "train", "--vocab-size", "300", "--out", "{out}", ""], "tokenizer train", "PATH ''"),
        (["generate", ""], "generate", "checkpoint ''"),
    ],
)
def test_an_empty_path_argument_is_one_line_naming_the_option(
    capsys, tmp_path, monkeypatch, arguments, command, shown
) -> None:
    monkeypatch.chdir(tmp_path)  # where an empty path would lead: nothing may be read or written there
    filled = [a.format(ckpt=tmp_path / "last.safetensors", out=tmp_path / "out") for a in arguments]
    assert main(filled) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"innerloop {command}: error: {shown} is empty: give ")
    assert len(captured.err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def _unread_warnings(preset: str, overrides: list[str]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(preset, overrides, model_only=True)
    return [str(w.message) for w in caught if "is not read by this model" in str(w.message)]


def test_an_override_the_model_never_reads_is_warned_about(tmp_path) -> None:
    (message,) = _unread_warnings("tiny-attention", ["model.ttt.base_lr=5"])
    assert message.startswith("model.ttt.base_lr (override 'model.ttt.base_lr=5') is not read by this model")
    assert "only model.mixer='ttt' reads it" in message
    (message,) = _unread_warnings("tiny", ["model.window=16"])
    assert "model.window (override 'model.window=16')" in message
    (message,) = _unread_warnings("tiny-swa", ["model.e2e.chunk_size=8"])
    assert "model.e2e.chunk_size" in message
    assert _unread_warnings("tiny-swa", ["model.window=16", "model.hidden_size=64"]) == []  # both read


def test_keys_of_a_preset_or_a_saved_config_at_their_defaults_are_not_warned_about(tmp_path) -> None:
    for preset in preset_names():
        assert _unread_warnings(preset, []) == [], preset
    _, cfg = load_config("tiny-attention", [f"out_dir={tmp_path}"], model_only=True)
    saved = save_config(cfg, tmp_path / "config.yaml")  # holds every key, model.ttt.* too
    assert _unread_warnings(str(saved), []) == []
    mine = tmp_path / "mine.yaml"
    mine.write_text("model:\n  mixer: attention\n  ttt:\n    base_lr: 5.0\n")
    (message,) = _unread_warnings(str(mine), [])
    assert f"model.ttt.base_lr (file {str(mine)!r})" in message


def test_each_load_of_a_source_is_a_config_of_its_own() -> None:
    """load_config keeps each source merged into the schema (pickled; a859b431, a deepcopy before)
    and makes every load's config from it: what one load's overrides set, or a caller writes into the
    config it was given (a resume writes out_dir), never reaches a later load of the same source."""
    _, first = load_config("tiny", ["trainer.max_steps=3", "data.paths=[a.txt]"], model_only=True)
    first.model.hidden_size = 8
    first.trainer.lightning = {"accumulate_grad_batches": 4}
    run, again = load_config("tiny", model_only=True)
    _, fresh = load_config("tiny", model_only=True)
    assert again is not fresh and again.model is not fresh.model
    assert (again.trainer.max_steps, again.model.hidden_size, again.data.paths) == (
        run.trainer.max_steps, run.model.hidden_size, run.data.paths,
    )  # fmt: skip
    assert run.model.hidden_size != 8 and run.data.paths != ["a.txt"] and run.trainer.max_steps != 3
    assert "accumulate_grad_batches" not in again.trainer.lightning
