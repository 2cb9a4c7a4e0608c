"""Review s51c: config values -- one numeric rule for every section, and a bound on every int key.

- The model section of a config converts a numpy number or a 0-d integer tensor given as it is built
  (``ModelConfig(hidden_size=np.int64(64))``) to the plain Python number; the run config's other
  sections (``data``, ``data.recall``, ``optim``, ``trainer``, and ``seed``) kept it, and
  :func:`~innerloop.config.validate_run_config` then refused ``TrainerConfig(max_steps=np.int64(5))``
  ("must be a Python int"), and ``RunConfig(trainer={...})`` failed with "must be a TrainerConfig".
  Every section now builds through :func:`innerloop.models.config.with_plain_values`.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from innerloop.config.load import ConfigError, load_config, validate_run_config
from innerloop.config.schema import DataConfig, OptimConfig, RecallConfig, RunConfig, TrainerConfig

# -- one numeric rule for every section: what the model section converts, the others do too ---------------

SECTIONS = {"data": DataConfig, "data.recall": RecallConfig, "optim": OptimConfig, "trainer": TrainerConfig}

CONVERTED = [
    ("trainer", "max_steps", np.int64(5), 5),
    ("trainer", "max_steps", torch.tensor(5), 5),
    ("trainer", "log_every", np.int32(3), 3),
    ("trainer", "progress_bar", np.False_, False),
    ("data", "batch_size", np.int64(4), 4),
    ("data", "val_fraction", np.float32(0.25), 0.25),
    ("data.recall", "gap", np.uint8(3), 3),
    ("optim", "ttt_base_lr_warmup", torch.tensor(2), 2),
    ("optim", "lr", np.float32(0.5), 0.5),
    ("optim", "lr", Fraction(1, 4), 0.25),
    ("optim", "lr", np.int64(1), 1.0),
]


@pytest.mark.parametrize(("section", "key", "value", "plain"), CONVERTED, ids=lambda x: repr(x)[:30])
def test_every_section_converts_a_numpy_number_as_the_model_section_does(section, key, value, plain):
    built = SECTIONS[section](**{key: value})
    assert getattr(built, key) == plain and type(getattr(built, key)) is type(plain)


def test_a_run_built_with_numpy_numbers_validates(recall_run):
    run = RunConfig(
        model=recall_run.model,
        data=DataConfig(name="recall", batch_size=np.int64(2), recall=RecallConfig(gap=np.int64(8))),
        optim=OptimConfig(lr=np.float32(1e-3)),
        trainer=TrainerConfig(max_steps=np.int64(3), val_every=torch.tensor(2), checkpoint_every=np.int16(2)),
        seed=np.uint32(7),
        out_dir=recall_run.out_dir,
    )
    validate_run_config(run)
    assert (run.trainer.max_steps, run.seed, run.data.recall.gap) == (3, 7, 8)
    assert type(run.seed) is int and type(run.optim.lr) is float


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "must be an integer"),
        (4.0, "must be an integer"),
        (Fraction(4), "must be an integer"),
        (np.float32(4), "must be an integer"),
    ],
    ids=repr,
)
def test_what_is_no_integer_stays_refused_in_every_section(recall_run, value, message):
    run = RunConfig(model=recall_run.model, data=recall_run.data, trainer=TrainerConfig(max_steps=value))
    with pytest.raises(ConfigError, match=rf"^trainer\.max_steps=.*\({type(value).__name__}\) {message}"):
        validate_run_config(run)


def test_a_run_section_given_as_a_mapping_becomes_its_dataclass_as_the_model_section():
    run = RunConfig(trainer={"max_steps": np.int64(5)}, data={"recall": {"gap": np.int32(3)}})
    assert isinstance(run.trainer, TrainerConfig) and run.trainer.max_steps == 5
    assert isinstance(run.data.recall, RecallConfig) and run.data.recall.gap == 3
    with pytest.raises(
        ValueError, match=r"unknown config key 'trainer\.max_step' in the run config.*max_steps"
    ):
        RunConfig(trainer={"max_step": 5})
    with pytest.raises(TypeError, match=r"^optim is a section, not a value: give an instance of OptimConfig"):
        RunConfig(optim=5)


# -- the command line's integer options: an integer past float's range is compared as it is ---------------

HUGE = 10**400


@pytest.mark.parametrize(
    ("argv", "option", "expected"),
    [
        (["generate", "ckpt", "--tokens", str(HUGE)], "tokens", HUGE),
        (["generate", "ckpt", "--top-k", str(HUGE)], "top_k", HUGE),
        (["params", "--budget", str(HUGE)], "budget", HUGE),
        (["compare", "run", "--resamples", str(HUGE)], "resamples", HUGE),  # compare's range check names it
    ],
    ids=["tokens", "top_k", "budget", "resamples"],
)
def test_a_huge_integer_option_parses_instead_of_a_bare_overflow_error(argv, option, expected):
    """``innerloop generate --tokens <400 digits>`` raised ``OverflowError: int too large to convert to
    float`` from the option's type (``math.isfinite`` of the int); an int is now compared as it is, and
    an option without an upper bound takes it (generation is a stream, top-k keeps every token)."""
    from innerloop.cli import _parser

    assert getattr(_parser().parse_args(argv), option) == expected


def test_a_huge_integer_past_an_options_range_is_a_usage_error_naming_the_range():
    from innerloop.cli import UsageError, _parser

    with pytest.raises(
        UsageError, match=r"argument --seq-len: must be an integer in \[1, 1073741824\], got '1000"
    ):
        _parser().parse_args(["eval", "run", "--seq-len", str(HUGE)])
    with pytest.raises(
        UsageError, match=r"argument --temperature: must be a finite number >= 0, got '1e400'"
    ):
        _parser().parse_args(["generate", "ckpt", "--temperature", "1e400"])


# -- a bound on every int key whose huge value crashed deep inside ---------------------------------------


def test_a_huge_validation_interval_is_refused_naming_the_key_and_its_range(recall_run):
    """``trainer.val_every=10**400`` passed validation and crashed in Lightning's trainer set-up
    (``OverflowError: int too large to convert to float``, it reads ``val_check_interval`` as a float);
    2**70 ran (it validated only at the end), so the bound is the int64 step counter's, not lower."""
    run = RunConfig(model=recall_run.model, data=recall_run.data, trainer=TrainerConfig(val_every=HUGE))
    with pytest.raises(ConfigError, match=r"^trainer\.val_every=1000+ must be in \[1, 9223372036854775807\]"):
        validate_run_config(run)
    validate_run_config(
        RunConfig(model=recall_run.model, data=recall_run.data, trainer=TrainerConfig(val_every=2**63 - 1))
    )


# -- the config file: each error names the file (or override) and the key ---------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "key", "message"),
    [
        (
            "trainer:\n  max_steps: ${trainer.nope}\n",
            "trainer.max_steps",
            "Interpolation key 'trainer.nope' not found",
        ),
        (
            "trainer:\n  max_steps: ${oc.env:INNERLOOP_S51C_UNSET}\n",
            "trainer.max_steps",
            "INNERLOOP_S51C_UNSET",
        ),
        ("data:\n  paths: ['${nope}']\n", r"data.paths\[0\]", "Interpolation key 'nope' not found"),
        ("logger: ${nope}\n", "logger", "Interpolation key 'nope' not found"),
    ],
    ids=["typed", "env", "list-entry", "untyped"],
)
def test_an_interpolation_that_does_not_resolve_names_the_file_and_the_key(tmp_path, yaml_text, key, message):
    """The run config's conversion named the key alone (``config key 'trainer.max_steps': Interpolation
    key 'trainer.nope' not found``): which of the file and the overrides held it was left to guess."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=rf"^config key '{key}' in file '{path}': .*{message}"):
        load_config(str(path), ["data.name=recall"])


def test_an_interpolation_from_an_override_names_the_override(tmp_path):
    from innerloop.config.load import read_out_dir

    with pytest.raises(
        ConfigError, match=r"^config key 'logger' in override 'logger=\$\{nope\}': Interpolation"
    ):
        load_config("tiny", ["data.name=recall", "logger=${nope}"])
    with pytest.raises(
        ConfigError, match=r"^config key 'out_dir' in override 'out_dir=\$\{nope\}': Interpolation"
    ):
        read_out_dir("tiny", ["out_dir=${nope}"])


def test_a_directory_given_as_the_config_is_named_a_directory(tmp_path):
    """A directory was "neither a file nor a preset" (true, but a run folder given for its config.yaml
    was left a puzzle); it is now named a directory, with the run config inside it when there is one."""
    with pytest.raises(
        ConfigError, match=r"^preset_or_file='.*' is a directory, not a YAML file or a preset$"
    ):
        load_config(str(tmp_path))
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(
        ConfigError,
        match=r"is a directory, not a YAML file or a preset; the run config in it is '.*config\.yaml'",
    ):
        load_config(str(tmp_path))


# -- a float argument given an integer past float's range: a ValueError naming it, not an OverflowError ---


def _tiny_model_config():
    from innerloop.models import ModelConfig

    return ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, vocab_size=32)


def test_checked_number_refuses_a_huge_int_for_a_float_naming_it():
    """``models.config.checked_number`` (the range check of LanguageModelModule's and others' numbers)
    called ``math.isfinite`` on the value: 10**400 raised a bare ``OverflowError``."""
    from innerloop.models.config import AT_LEAST_0, checked_number

    with pytest.raises(ValueError, match=r"^lr=1000+ \(int\) must be a finite number >= 0$"):
        checked_number("lr", HUGE, float, AT_LEAST_0)


@pytest.mark.parametrize(
    "argument",
    [{"lr": HUGE}, {"weight_decay": HUGE}, {"betas": (HUGE, 0.9)}],
    ids=["lr", "weight_decay", "betas"],
)
def test_the_training_module_refuses_a_huge_int_for_a_float_naming_it(argument):
    from innerloop.train.module import LanguageModelModule

    name = next(iter(argument)) if "betas" not in argument else r"betas\[0\]"
    with pytest.raises(ValueError, match=rf"^{name}=1000+ \(int\) must be a finite number"):
        LanguageModelModule(_tiny_model_config(), **argument)


def test_generate_refuses_a_huge_int_temperature_naming_it():
    from innerloop.models import build_model
    from innerloop.models.generate import generate

    model = build_model(_tiny_model_config())
    with pytest.raises(ValueError, match=r"^temperature=1000+ must be a finite real number >= 0"):
        generate(model, torch.tensor([[1, 2]]), 2, temperature=HUGE)


def test_a_reference_config_with_a_huge_int_for_a_float_is_refused_naming_the_key():
    from innerloop.interop import ttt_lm_pytorch

    model = {"hidden_size": 16, "num_attention_heads": 2, "mini_batch_size": 4, "conv_kernel": 2}
    model |= {"vocab_size": 32, "intermediate_size": 32, "num_hidden_layers": 1}
    with pytest.raises(ValueError, match=r"initializer_range.*must be a finite number >= 0"):
        ttt_lm_pytorch.check_config({**model, "initializer_range": HUGE})
    with pytest.raises(ValueError, match=r"rope_theta.*must be a finite number"):
        ttt_lm_pytorch.check_config({**model, "rope_theta": HUGE})


def test_an_official_e2e_config_with_a_huge_int_inner_lr_is_refused_naming_the_key():
    import copy
    import json
    from pathlib import Path

    from innerloop.interop import ttt_e2e

    config = json.loads((Path(__file__).resolve().parent / "data" / "e2e" / "config.json").read_text())
    config = copy.deepcopy(config)
    config["training"]["optimizer_inner"]["lr"] = HUGE
    with pytest.raises(ValueError, match=r"training\.optimizer_inner\.lr=1000+ must be a finite number >= 0"):
        ttt_e2e.model_config(config)


def test_a_key_given_twice_in_a_file_is_named_with_its_line_not_the_parsers_stream(tmp_path):
    """The YAML error named the stream the parser read, ``in "<unicode string>", line 3``, after the
    file; the places now read ``at line 3, column 3`` of the file the message names."""
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  hidden_size: 64\n  hidden_size: 32\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    message = str(caught.value)
    assert message.startswith(f"file '{path}' is not valid YAML: ") and "unicode string" not in message
    assert "found duplicate key hidden_size at line 3, column 3" in message


@pytest.mark.parametrize("init_std", [1e-320, 1e-40], ids=repr)
def test_an_init_std_below_float32s_smallest_normal_is_refused_not_built_as_zeros(init_std):
    """``model.init_std`` was only ``> 0``: 1e-320 rounds to 0 in float32 and built a model whose every
    weight matrix was zero (a silent dead start); 1e-40 drew subnormals. Its low end is now float32's
    smallest normal number, as ``model.norm_eps``'s is."""
    from innerloop.models import build_model

    config = _tiny_model_config()
    config.init_std = init_std
    with pytest.raises(
        ValueError, match=rf"^model\.init_std={init_std} must be >= 1\.17549.*smallest normal"
    ):
        build_model(config)
    config.init_std = 1.2e-38  # the smallest legal std builds
    build_model(config)
