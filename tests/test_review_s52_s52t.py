"""Review s52t: the names innerloop copied from Lightning to check trainer.lightning's text values with
the config stay Lightning's (a Lightning upgrade that adds or drops a profiler fails here, not in a
user's run), and the time limits Lightning takes are taken."""

from __future__ import annotations

import ast
import re
import types

import pytest

from innerloop.cli import main
from innerloop.config.trainer_args import check_lightning_arguments, lightning_text_choices

# Lightning.pytorch is imported by the tests marked slow (about 13 s once on the loaded 2-core host)


@pytest.mark.slow
def test_the_profiler_names_are_the_installed_lightnings() -> None:
    # Lightning keeps its profiler names local to _init_profiler: read them from its refusal
    from lightning.pytorch.trainer.setup import _init_profiler
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException) as refused:
        _init_profiler(types.SimpleNamespace(), "not-a-profiler")
    listed = re.search(r"one of (\[.*\])", str(refused.value))
    assert listed is not None, refused.value
    assert tuple(ast.literal_eval(listed.group(1))) == lightning_text_choices()["profiler"]


@pytest.mark.parametrize(
    "value",
    [
        "00:12:00:00",
        " 1:00:00:00 ",
        "100:00:00:30",
        {"weeks": 1},
        {"milliseconds": 5000},
        {"minutes": 1, "seconds": -1},
    ],
)
@pytest.mark.slow
def test_every_time_limit_lightnings_timer_reads_is_taken(value) -> None:
    from lightning.pytorch.callbacks import Timer

    Timer(duration=value)  # Lightning reads it
    check_lightning_arguments({"max_time": value}, ValueError)


@pytest.mark.parametrize("value", ["1:2:3:4", "00:12:00", "00:12:00:00:00", "-1:00:00:00"])
@pytest.mark.slow
def test_a_time_limit_lightnings_timer_refuses_is_refused_with_the_config(value) -> None:
    from lightning.pytorch.callbacks import Timer
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException):
        Timer(duration=value)
    with pytest.raises(ValueError, match=r"trainer\.max_time="):
        check_lightning_arguments({"max_time": value}, ValueError)


# -- innerloop params: data.name=hf's values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.val_fraction=0", "data.val_fraction=0 holds out no validation documents"),
        ("data.split=''", "data.split='' must name a split"),
        ("data.text_field=''", "data.text_field='' must name a column"),
    ],
)
def test_params_refuses_the_hf_values_train_refuses(capsys, override, named) -> None:
    # regression review s52t: _check_hf (train's) judged these values with the dataset's files, so
    # 'innerloop params' (s52q: every value train checks) still printed a count for them
    assert main(["params", "--config", "tiny-mlp", "data.name=hf", override]) == 2
    error = capsys.readouterr().err
    assert named in error and error.count("\n") == 1, error


def test_params_leaves_the_hf_source_to_train(capsys) -> None:
    # the dataset's files are train's to read (data.paths: tests/test_review_s52_s52q.py)
    assert main(["params", "--config", "tiny-mlp", "data.name=hf", "data.paths=[/nonexistent/x]"]) == 0
