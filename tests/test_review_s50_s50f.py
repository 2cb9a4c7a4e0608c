"""Review s50f: the one rule of input kinds, reached to the run config, the training entry points, the
testing kit and the CLI.

The model section of a config refuses a value of another kind than its field's, naming the key, the value,
its type and what is valid (:func:`innerloop.models.config.check_field_types`: a numpy number set after
building is told to be converted, a bool is no integer, ``4.0`` is no integer, a Fraction or a Decimal
no Python float). :func:`innerloop.config.validate_run_config` checked only the ranges of the other
sections' numbers: a run built in Python took ``trainer.max_steps=True`` (one step), ``4.0``, a
Fraction, a 0-d tensor, crashed deep on a Decimal learning rate and raised Python's bare ``'<' not
supported`` on a string.
"""

from __future__ import annotations

import copy
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from innerloop.config.load import ConfigError, validate_run_config


def _with(run, key: str, value):
    changed = copy.deepcopy(run)
    *sections, name = key.split(".")
    holder = changed
    for section in sections:
        holder = getattr(holder, section)
    setattr(holder, name, value)
    return changed


WRONG_KINDS = [
    ("trainer.max_steps", True, "must be an integer"),
    ("trainer.max_steps", np.True_, "must be an integer"),
    ("trainer.max_steps", 4.0, "must be an integer"),
    ("trainer.max_steps", Fraction(4), "must be an integer"),
    ("trainer.max_steps", Decimal(4), "must be an integer"),
    ("trainer.max_steps", torch.tensor(4), "must be an integer"),
    ("trainer.max_steps", np.int64(4), r"must be a Python int \(convert it with int"),
    ("trainer.val_every", "4", "must be an integer"),
    ("data.batch_size", np.True_, "must be an integer"),
    ("data.recall.gap", 8.0, "must be an integer"),
    ("seed", True, "must be an integer"),
    ("optim.lr", Decimal("0.001"), "must be a finite number"),
    ("optim.lr", Fraction(1, 1000), r"must be a Python float \(convert it with float"),
    ("optim.lr", np.float32(1e-3), r"must be a Python float \(convert it with float"),
    ("optim.lr", "0.001", "must be a finite number"),
    ("optim.warmup_fraction", True, "must be a finite number"),
    ("trainer.progress_bar", "false", "must be true or false"),
    ("trainer.progress_bar", 0, "must be true or false"),
    ("out_dir", Path("runs/x"), r"must be a string \(convert it with str"),
    ("data.tokenizer", Path("bytes"), r"must be a string \(convert it with str"),
    ("model.hidden_size", "64", "must be an integer"),
]


@pytest.mark.parametrize(("key", "value", "message"), WRONG_KINDS, ids=lambda x: repr(x)[:30])
def test_validate_run_config_refuses_a_value_of_another_kind_naming_the_key(recall_run, key, value, message):
    with pytest.raises(ConfigError, match=rf"^{key}=.*\({type(value).__name__}\) {message}"):
        validate_run_config(_with(recall_run, key, value))


@pytest.mark.parametrize(("key", "value"), [("optim.lr", 4), ("optim.lr", 2**70), ("optim.grad_clip", -0.0)])
def test_an_int_for_a_float_key_is_a_number_as_in_the_model_section(recall_run, key, value):
    """``int`` is a number for a float field (YAML's ``lr: 1`` is an int), as ``model.rope_theta`` takes
    one; the range check then decides (``lr=4`` is refused for its weight decay, not its kind)."""
    changed = _with(recall_run, key, value)
    try:
        validate_run_config(changed)
    except ConfigError as err:
        assert "must be a finite number" not in str(err) and "Python float" not in str(err)


def test_a_string_for_data_paths_is_refused_not_read_character_by_character(recall_run):
    run = _with(recall_run, "data.name", "text")
    with pytest.raises(ConfigError, match=r"^data\.paths='corpus\.txt' \(str\) must be a list"):
        validate_run_config(_with(run, "data.paths", "corpus.txt"))


def test_a_path_entry_of_data_paths_is_told_to_be_a_string(recall_run):
    run = _with(recall_run, "data.name", "text")
    with pytest.raises(
        ConfigError, match=r"data\.paths entry PosixPath\('a\.txt'\) is a path object.*str\(\.\.\.\)"
    ):
        validate_run_config(_with(run, "data.paths", [Path("a.txt")]))


# -- innerloop.testing.strategies: the counts and head dims the core's rule takes --------------------------


def _one_draw(strategy):
    from hypothesis import HealthCheck, given, settings

    drawn = []

    @settings(max_examples=2, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(value) -> None:
        drawn.append(value)

    draw()
    return drawn[-1]


STRATEGY_COUNTS = [
    ("layer_configs", {"max_heads": torch.tensor(2)}),
    ("layer_configs", {"max_mini_batch": torch.tensor(3)}),
    ("split_points", {"total": torch.tensor(9)}),
    ("split_points", {"total": 9, "max_cuts": np.int64(3)}),
    ("split_points", {"total": 9, "max_cuts": torch.tensor(3)}),
    ("views", {"max_batch": torch.tensor(2)}),
    ("problems", {"max_tokens": torch.tensor(5)}),
]


@pytest.mark.parametrize(("name", "counts"), STRATEGY_COUNTS, ids=lambda x: repr(x)[:40])
def test_strategies_take_the_integers_their_checks_take(name, counts):
    """A 0-d integer tensor passed ``_check_counts`` (the core's ``as_integer``) and then failed inside
    hypothesis ('max_value=tensor(4) must be a real number'); ``split_points(max_cuts=np.int64(3))``
    failed there too ('Expected int but got max_size=np.int64(3)')."""
    from innerloop.testing import strategies

    _one_draw(getattr(strategies, name)(**counts))


@pytest.mark.parametrize("head_dim", [np.int64(4), torch.tensor(4)], ids=["numpy", "tensor"])
def test_strategies_draw_plain_int_shapes_from_other_integer_head_dims(head_dim):
    """A numpy or tensor head dim was drawn as it is: ``layer_configs`` gave ``hidden_size=tensor(8)``,
    ``problems`` ``head_dim=tensor(4)``; the shapes drawn are plain ints, as every other one is."""
    from innerloop.testing.strategies import layer_configs, problems

    layer = _one_draw(layer_configs(head_dims=(head_dim,)))
    shape = _one_draw(problems(head_dims=(head_dim,)))
    assert type(layer["hidden_size"]) is int and type(shape["head_dim"]) is int


# -- innerloop.testing.checks: seeds and tolerances as make_problem takes them ----------------------------

TINY_SHAPE = {"batch": 2, "heads": 1, "head_dim": 3, "tokens": 4, "mini_batch_size": 2}


@pytest.mark.parametrize("seed", [np.int64(3), torch.tensor(3)], ids=["numpy", "tensor"])
@pytest.mark.parametrize("check", ["check_inner_loss", "check_inner_model"])
def test_the_plugin_checks_take_the_seeds_make_problem_takes(check, seed):
    """``make_problem(seed=np.int64(3))`` runs; ``check_inner_loss`` / ``check_inner_model`` with it
    failed deep inside ('an integer is required', torch's Generator; 'manual_seed expected a long, but
    got Tensor')."""
    import innerloop.testing as kit

    plugin = "reconstruction" if check == "check_inner_loss" else "linear"
    getattr(kit, check)(plugin, seed=seed, **TINY_SHAPE)


def test_a_seed_beyond_torchs_generator_is_named():
    """``seed=2**70`` failed with torch's 'Overflow when unpacking long long', naming no argument."""
    from innerloop.testing import make_problem

    with pytest.raises(
        ValueError, match=r"seed=1180591620717411303424 must be an integer in \[-2\*\*63, 2\*\*64\)"
    ):
        make_problem("linear", "reconstruction", seed=2**70)


@pytest.mark.parametrize("tolerance", [-1.0, -0.0 - 1e-300, float("nan"), "1e-10", True, Decimal("1e-10")])
def test_check_zero_decay_and_momentum_names_a_wrong_tolerance(tolerance):
    """``check_update_rule`` refuses such a tolerance naming it; ``check_zero_decay_and_momentum`` took
    it: a right rule failed ('relative error 1.4e-16 > -1.0e+00', '> nan') or Python's bare "'<='
    not supported" came out."""
    from innerloop.testing import check_zero_decay_and_momentum

    with pytest.raises(ValueError, match="check_zero_decay_and_momentum: tolerance must be a finite number"):
        check_zero_decay_and_momentum(
            "minibatch_gd", "linear", "reconstruction", tolerance=tolerance, **TINY_SHAPE
        )


@pytest.mark.slow  # check_update_rule's first model and loss: about 0.35 s
def test_a_fraction_tolerance_is_a_number_whose_failure_is_reported():
    """A Fraction passes the tolerance check (a real number, as a float argument of the core takes
    it), but the failure message formatted it with ``:.1e``, which Fraction refuses (Python 3.11):
    a rule outside it raised ``TypeError: unsupported format string`` instead of the AssertionError."""
    from innerloop.testing import check_update_rule, check_zero_decay_and_momentum

    with pytest.raises(AssertionError, match="relative error"):
        check_zero_decay_and_momentum(
            "minibatch_gd", "linear", "reconstruction", tolerance=Fraction(0), **TINY_SHAPE
        )
    with pytest.raises(AssertionError, match="relative error"):
        check_update_rule(
            "minibatch_gd",
            model="linear",
            loss="reconstruction",
            tolerance=Fraction(0),
            norm=True,
            residual=True,
            gradients=False,
            without_grad=False,
            **TINY_SHAPE,
        )


# -- trainer.lightning: a numpy value's refusal names its kind and the conversion --------------------------


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("detect_anomaly", np.True_, r"got numpy\.bool_?; convert it with bool\(\.\.\.\)"),
        ("accumulate_grad_batches", np.int64(2), r"got numpy\.int64; convert it with int\(\.\.\.\)"),
        ("accumulate_grad_batches", torch.tensor(2), r"got torch\.Tensor; convert it with int\(\.\.\.\)"),
        ("accumulate_grad_batches", True, r"got bool$"),
    ],
    ids=lambda x: repr(x)[:30],
)
def test_a_lightning_argument_of_another_number_kind_is_told_how_to_convert(name, value, message):
    """``trainer.detect_anomaly=np.True_`` was refused as 'must be bool (...), got bool' (numpy's bool
    is named bool too), which names no difference; the model section says 'a Python bool (convert it
    with bool(...))'."""
    from innerloop.config.trainer_args import check_lightning_arguments

    with pytest.raises(ValueError, match=message):
        check_lightning_arguments({name: value}, ValueError)


def test_inner_loss_diagnostics_bound_their_layers_as_the_model_config_does():
    """``InnerLossDiagnostics(2**70)`` failed inside ``torch.zeros`` ('failed to unpack the object');
    a model has at most ``model.num_layers``' 65536 layers."""
    from innerloop.train import InnerLossDiagnostics

    with pytest.raises(ValueError, match=r"num_layers=1180591620717411303424 must be <= 65536"):
        InnerLossDiagnostics(2**70)


def test_check_kernel_names_a_seed_beyond_torchs_generator_before_any_case():
    """``check_kernel(seed=2**70)`` took it (an integer) and torch failed inside the first case ('Overflow
    when unpacking long long'); it is read by the kit's one seed rule (:func:`checked_seed`)."""
    from innerloop.testing import check_kernel

    with pytest.raises(
        ValueError, match=r"seed=1180591620717411303424 must be an integer in \[-2\*\*63, 2\*\*64\)"
    ):
        check_kernel("fused_torch_linear", seed=2**70)


# -- '~' in a checkpoint path: the home folder for every reader, as load_checkpoint reads it --------------


@pytest.fixture
def checkpoint_at_home(tmp_path, monkeypatch):
    """A tiny checkpoint at ``~/m.safetensors`` (HOME is ``tmp_path / 'home'``), with a config.yaml beside
    it, and a text file to evaluate on."""
    from innerloop.checkpoints import save_checkpoint
    from innerloop.models import ModelConfig
    from innerloop.train.module import LanguageModelModule

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    config = ModelConfig(mixer="attention", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    module = LanguageModelModule(config)
    save_checkpoint(
        {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, home / "m.safetensors"
    )
    (home / "config.yaml").write_text("seed: 0\n", encoding="utf-8")
    (tmp_path / "text.txt").write_text("hello world " * 40, encoding="utf-8")
    return home


def test_the_checkpoint_readers_read_a_tilde_as_the_home_folder(checkpoint_at_home):
    """``load_model('~/m.safetensors')`` loads (load_checkpoint expands ``~``), but
    ``checkpoint_tokenizer`` said 'No such file or directory: ~/m.safetensors' and ``run_config_path``
    found no config.yaml beside it (None)."""
    from innerloop.checkpoints import checkpoint_identity, checkpoint_tokenizer, written_by
    from innerloop.config.load import checkpoint_path_problem
    from innerloop.data.tokenizer import ByteTokenizer
    from innerloop.train.run import run_config_path

    assert isinstance(checkpoint_tokenizer("~/m.safetensors"), ByteTokenizer)
    assert run_config_path("~/m.safetensors") == checkpoint_at_home / "config.yaml"
    assert checkpoint_path_problem("~/m.safetensors") is None
    assert written_by("~/m.safetensors") is not None
    assert checkpoint_identity("~/m.safetensors") == checkpoint_identity(checkpoint_at_home / "m.safetensors")


@pytest.mark.slow  # a Lightning validation (about 1 s)
def test_evaluate_reads_a_tilde_checkpoint_as_load_module_does(checkpoint_at_home, tmp_path):
    """``evaluate('~/m.safetensors', ...)`` failed ('is not a readable innerloop checkpoint ... No such file
    or directory: ~/m.safetensors') although ``load_module`` of that path loads it."""
    from innerloop.train import evaluate

    metrics, _, _ = evaluate(
        "~/m.safetensors",
        [str(tmp_path / "text.txt")],
        seq_len=8,
        batch_size=1,
        batches=1,
        progress_bar=False,
    )
    assert metrics["windows"] == 1.0


def test_save_config_and_read_run_config_read_a_tilde_as_the_home_folder(tmp_path, monkeypatch):
    """``save_config(cfg, '~/c.yaml')`` wrote ``./~/c.yaml`` (a folder named ``~`` in the working one),
    and ``read_run_config('~/c.yaml')`` found nothing, while ``load_config('~/c.yaml')`` reads the home
    folder's, as ``save_checkpoint`` / ``load_checkpoint`` do."""
    from innerloop.config.load import read_run_config, save_config
    from innerloop.config.schema import RunConfig

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    written = save_config(RunConfig(seed=7), "~/c.yaml")
    assert written == tmp_path / "home" / "c.yaml" and not (tmp_path / "~").exists()
    assert read_run_config("~/c.yaml").seed == 7


@pytest.mark.parametrize("held_out", ["Test", " val", None, 1])
def test_evaluate_names_a_wrong_held_out_before_reading_the_checkpoint(tmp_path, held_out):
    """``evaluate(held_out='Test')`` loaded the checkpoint first, then refused it under the command
    line's name ('--held-out 'Test' is not one of ...'), which a Python caller did not write; its other
    arguments are checked before anything is read."""
    from innerloop.config.load import ConfigError
    from innerloop.train import evaluate

    # from Python: held_out alone (s51a; the command line's --held-out is named within command_line_options)
    with pytest.raises(ConfigError, match=r"^held_out=.* is not one of \['val', 'test'\]"):
        evaluate(tmp_path / "missing.safetensors", held_out=held_out)


def test_compare_names_a_wrong_held_out_before_loading_a_model(tmp_path):
    """``compare(held_out='Test')`` loaded every model first (evaluate's sibling)."""
    from innerloop.config.load import ConfigError
    from innerloop.train.compare import compare

    with pytest.raises(ConfigError, match=r"^held_out='Test' is not one of"):  # from Python (s51a)
        compare([tmp_path / "missing.safetensors"], held_out="Test")


@pytest.mark.parametrize(
    ("section", "value"), [("model", {"mixer": "ttt"}), ("optim", None), ("data", "recall")]
)
def test_validate_run_config_names_a_section_of_another_kind(recall_run, section, value):
    """A section set to a dict, None or a name raised Python's bare "'dict' object has no attribute
    'mixer'" (AttributeError) from inside the checks."""
    with pytest.raises(ConfigError, match=rf"^{section}=.* must be an? \w+Config \(the {section} section\)"):
        validate_run_config(_with(recall_run, section, value))
