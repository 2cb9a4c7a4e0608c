"""Review s48j: every config key under hostile values (the sweep is /tmp/s48j/walk.py; its table is in
the session's report). These are the defects it found."""

from __future__ import annotations

import contextlib

import pytest

from innerloop.config import ConfigError, load_config

# -- a string key given an unquoted scalar that YAML reads as a number or a bool --------------------------
# OmegaConf stored str() of what YAML made of it: out_dir=010 trained into runs '8' (octal), 1.10 into
# '1.1', 1:30 into '90' (sexagesimal), on into 'True'. Silently another folder, path or name.


@pytest.mark.parametrize(
    ("override", "stored"),
    [
        ("out_dir=010", "8"),
        ("out_dir=1.10", "1.1"),
        ("out_dir=1:30", "90"),
        ("out_dir=on", "True"),
        ("out_dir=1_000", "1000"),
        ("out_dir=1e3", "1000.0"),
        ("data.paths=[1.10]", "1.1"),
        ("data.tokenizer=0x1F", "31"),
    ],
)
def test_string_key_given_a_yaml_number_or_bool_that_changes_its_text_is_refused(override, stored, tmp_path):
    key, _, text = override.partition("=")
    text = text.strip("[]")
    with pytest.raises(ConfigError) as caught:
        load_config("tiny", [override, f"out_dir={tmp_path}" if key != "out_dir" else "seed=0"])
    message = str(caught.value)
    assert "\n" not in message
    assert key in message and text in message and repr(stored) in message and "quote" in message


@pytest.mark.parametrize("value", ["7", "2024-01-15", "'010'", '"1.10"', "abc", "nan"])
def test_string_key_given_a_scalar_that_keeps_its_text_is_accepted(value):
    run, _ = load_config("tiny", [f"out_dir={value}"], model_only=True)  # model_only: no Lightning import
    assert run.out_dir == value.strip("'\"")


def test_string_key_in_a_yaml_file_given_a_yaml_number_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("out_dir: 010\n")
    with pytest.raises(ConfigError, match=r"out_dir.*010.*'8'.*quote"):
        load_config(str(config))


# -- TTT-E2E windows of at most one chunk ------------------------------------------------------------------
# docs/e2e.md: "training needs data.seq_len > chunk_size". A config with data.seq_len <= chunk_size was
# accepted; the model warned at the first training step that no inner step reaches the outer loss (the run
# trains the sliding-window baseline, test-time training for nothing).


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.seq_len=16"],  # e2e-tiny's chunk_size is 16
        ["data.seq_len=8"],
        ["model.e2e.chunk_size=128"],  # its seq_len is 128
        ["model.e2e.chunk_size=128", "model.e2e.chunk_targets=within_chunk"],
    ],
)
def test_e2e_windows_of_at_most_one_chunk_are_refused_at_config_time(overrides, tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config("e2e-tiny", [*overrides, f"out_dir={tmp_path}"])
    message = str(caught.value)
    assert "\n" not in message
    assert "data.seq_len=" in message and "model.e2e.chunk_size=" in message
    assert "model.e2e.test_time_training=false" in message


def test_e2e_recall_task_of_at_most_one_chunk_is_refused_naming_its_length(tmp_path):
    recall = ["data.name=recall", "data.recall.num_pairs=1", "data.recall.gap=0", "data.seq_len=3"]
    with pytest.raises(ConfigError, match=r"4 \* data\.recall\.num_pairs \+ data\.recall\.gap - 1 = 3 <= "):
        load_config("e2e-tiny", [*recall, f"out_dir={tmp_path}"])


@pytest.mark.slow  # the first full validation imports Lightning (~1 s)
@pytest.mark.parametrize(
    "overrides",
    [["data.seq_len=17"], ["data.seq_len=16", "model.e2e.test_time_training=false"]],
)
def test_e2e_windows_of_more_than_one_chunk_or_the_baseline_are_accepted(overrides, tmp_path):
    # 17 tokens and chunks of 16 under chunk_mean: accepted, with the warning that the last chunk's
    # one target weighs as much as a whole chunk's
    weighs = pytest.warns(UserWarning, match=r"not a multiple of model\.e2e\.chunk_size=16")
    with weighs if "data.seq_len=17" in overrides else contextlib.nullcontext():
        run, _ = load_config("e2e-tiny", [*overrides, f"out_dir={tmp_path}"])
    assert run.data.seq_len == int(overrides[0].partition("=")[2])


# -- size fields without an upper bound --------------------------------------------------------------------
# model.pre_conv_kernel, model.e2e.prime_intermediate_size, model.window and model.e2e.chunk_size were only
# held to >= 1 (>= 0): a config with 2**30 or 10**40 was accepted and the build or first forward failed
# with torch's allocator error or a bare "Overflow when unpacking long long" / OverflowError. Their
# siblings (model.ttt.conv_kernel, model.intermediate_size, data.seq_len) are bounded.

HUGE = 10**40


@pytest.mark.parametrize(
    ("preset", "key", "value", "valid"),
    [
        ("recall-ttt", "model.pre_conv_kernel", 1025, "[1, 1024]"),  # mamba: reads the pre-conv
        ("recall-ttt", "model.pre_conv_kernel", HUGE, "[1, 1024]"),
        ("e2e-tiny", "model.e2e.prime_intermediate_size", 2**24 + 1, "[0, 16777216]"),
        ("e2e-tiny", "model.e2e.prime_intermediate_size", HUGE, "[0, 16777216]"),
        ("tiny-swa", "model.window", 2**30 + 1, "[1, 1073741824]"),
        ("e2e-tiny", "model.window", HUGE, "[1, 1073741824]"),
    ],
)
def test_size_fields_past_any_machine_are_refused_naming_their_range(preset, key, value, valid, tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(preset, [f"{key}={value}", f"out_dir={tmp_path}"])
    assert str(caught.value).startswith(f"{key}={value} must be in {valid}")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pre_conv_kernel", 1025),
        ("window", 2**30 + 1),
        ("e2e.prime_intermediate_size", 2**24 + 1),
        ("e2e.chunk_size", 2**30 + 1),  # a run's is also refused past data.seq_len; a model's was not at all
    ],
)
def test_model_config_built_directly_refuses_the_same_sizes(field, value):
    from dataclasses import replace

    from innerloop.models.config import E2EConfig, ModelConfig, validate_model_config

    if field.startswith("e2e."):
        config = ModelConfig(mixer="e2e", e2e=replace(E2EConfig(), **{field[4:]: value}))
    else:
        config = replace(ModelConfig(backbone="mamba"), **{field: value})
    with pytest.raises(ValueError, match=rf"^model\.{field}={value} must be in \["):
        validate_model_config(config)


# -- data.val_batches without an upper bound ---------------------------------------------------------------
# eval's and compare's --batches are held to [1, 2**24] ("10**30 windows crashed deep in a data module"),
# but the run's data.val_batches (and its Lightning name trainer.limit_val_batches) only to >= 1: a config
# with 10**40 was accepted and RecallDataModule(val_batches=10**40).setup() hung (killed after 200 s).


@pytest.mark.parametrize("override", ["data.val_batches=16777217", f"data.val_batches={10**40}"])
def test_run_val_batches_past_evals_bound_is_refused(override, tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.val_batches=\d+ must be in \[1, 16777216\]"):
        load_config("tiny", [override, f"out_dir={tmp_path}"])


@pytest.mark.parametrize("module", ["RecallDataModule", "TextDataModule", "HFDataModule"])
def test_data_modules_refuse_val_batches_past_the_bound(module):
    from innerloop.train import data

    with pytest.raises(ValueError, match=r"val_batches=16777217 must be in \[1, 16777216\]"):
        getattr(data, module)(
            **({"paths": ["x"]} if module != "RecallDataModule" else {}), val_batches=2**24 + 1
        )


@pytest.mark.parametrize("mixer", ["ttt", "attention", "deltanet", "e2e"])
@pytest.mark.parametrize("key", ["non_finite", "chunk_targets", "compute_dtype"])
def test_a_typo_in_a_fixed_choice_of_model_e2e_is_refused_whatever_the_mixer(mixer, key) -> None:
    # model.e2e.non_finite=abc with another mixer was only warned of as "not read by this model", while
    # model.e2e.chunk_size=0 there was refused: the typo waited for the run that first read the section
    with pytest.raises(ConfigError, match=rf"^model\.e2e\.{key}='abc' is not one of \["):
        load_config("tiny", [f"model.mixer={mixer}", f"model.e2e.{key}=abc"], model_only=True)
