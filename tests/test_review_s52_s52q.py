"""Review s52q: the CLI's leftovers. ``innerloop params`` checks every value ``innerloop train`` checks
but those about this machine and its files; the benchmark scripts read their numbers by the override's
one rule of a number's text."""

from __future__ import annotations

import pytest

from innerloop.cli import main

# -- innerloop params: the values train refuses ---------------------------------------------------------


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
    assert main(["params", "--config", "tiny-mlp", override]) == 2
    error = capsys.readouterr().err
    assert named in error and error.count("\n") == 1, error


def test_params_still_leaves_the_files_and_the_machine_to_train(capsys) -> None:
    # a parameter count does not read the data or write a run (tests/train/test_cli_inputs.py too)
    overrides = ["data.paths=[/nonexistent/nomatch*]", "out_dir=/dev/null/x", "trainer.accelerator=cuda"]
    assert main(["params", "--config", "tiny-mlp", *overrides]) == 0
    assert "parameters" in capsys.readouterr().out
