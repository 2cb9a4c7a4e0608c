"""Review s52q: the CLI's leftovers. ``innerloop params`` checks every value ``innerloop train`` checks
but those about this machine and its files; the benchmark scripts read their numbers by the override's
one rule of a number's text."""

from __future__ import annotations

import pytest

from innerloop.cli import main

# -- innerloop params: the values train refuses ---------------------------------------------------------


def _params_refuses(capsys, override: str, named: str) -> None:
    """``innerloop params --config tiny-mlp OVERRIDE`` exits 2 with one line that contains ``named``."""
    assert main(["params", "--config", "tiny-mlp", override]) == 2
    error = capsys.readouterr().err
    assert named in error and error.count("\n") == 1, error


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.lr=-1", "optim.lr=-1.0 must be > 0"),
        ("trainer.max_steps=0", "trainer.max_steps=0 must be in [1, "),
        ("logger=bogus", "logger"),
        ("optim.schedule=bogus", "optim.schedule='bogus' is not a schedule"),
        ("data.seq_len=0", "data.seq_len=0 must be"),
        ("trainer.precision=bogus", "trainer.precision='bogus' is not valid"),
        ("data.name=bogus", "data.name='bogus' is not a dataset"),
        ("trainer.lightning.num_nodes=0", "trainer.num_nodes=0 must be"),
    ],
)
def test_params_refuses_a_value_that_train_refuses(capsys, override, named) -> None:
    # regression review s52q: params loaded the model section only, so it printed a count for a config
    # that `innerloop train` (the next command) refuses
    _params_refuses(capsys, override, named)


def test_params_still_leaves_the_files_and_the_machine_to_train(capsys) -> None:
    # a parameter count does not read the data or write a run (tests/train/test_cli_inputs.py too)
    overrides = ["data.paths=[/nonexistent/nomatch*]", "out_dir=/dev/null/x", "trainer.accelerator=cuda"]
    assert main(["params", "--config", "tiny-mlp", *overrides]) == 0
    assert "parameters" in capsys.readouterr().out


# -- trainer.lightning.X: a text value Lightning reads only when its Trainer is built -------------------


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.lightning.profiler=bogus", "trainer.profiler='bogus' is not valid; valid: ['simple',"),
        ("trainer.lightning.gradient_clip_algorithm=bogus", "trainer.gradient_clip_algorithm='bogus' is not"),
        ("trainer.lightning.max_time=bogus", "trainer.max_time='bogus' is not a time limit"),
        ("trainer.lightning.max_time='1:2:3'", "trainer.max_time='1:2:3' is not a time limit"),
        (
            "trainer.lightning.max_time={hourz: 1}",
            "trainer.max_time={'hourz': 1}: 'hourz' is not a unit of time",
        ),
        # past timedelta's range: Lightning's timedelta(**value) raised a bare OverflowError (a traceback)
        (
            "trainer.lightning.max_time={days: 1000000000}",
            "{'days': 1000000000} is longer than a timedelta holds",
        ),
    ],
)
def test_a_lightning_text_value_is_checked_with_the_config(capsys, override, named) -> None:
    # regression review s52q: these reached lightning.Trainer raw; train refused them only when it built
    # the Trainer, and params (which builds none) counted the config
    _params_refuses(capsys, override, named)


@pytest.mark.parametrize(
    "override",
    [
        "trainer.lightning.profiler=simple",
        "trainer.lightning.profiler=null",
        "trainer.lightning.gradient_clip_algorithm=value",
        "trainer.lightning.gradient_clip_algorithm=NORM",  # Lightning lower-cases it
        "trainer.lightning.max_time=00:12:00:00",
        "trainer.lightning.max_time={hours: 1}",
    ],
)
def test_the_lightning_text_values_lightning_takes_are_taken(override) -> None:
    from innerloop.config.load import load_config

    load_config("tiny-mlp", [override], model_only=True)
