"""Review s53b: leftovers of training, evaluation and resume.

- ``trainer.max_time``: Lightning's Timer reads a mapping as ``timedelta(**mapping)``, so
  ``{hours: 1.5}`` is 90 minutes, though its annotation says ``dict[str, int]``, by which innerloop
  refused it; one rule now for every form (the parts' sum positive and one ``timedelta`` holds; a part
  no finite number or no unit refused by name).
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from innerloop.config import ConfigError
from innerloop.config.load import load_config
from innerloop.config.trainer_args import check_lightning_arguments


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ({"hours": 1.5}, 5400),
        ({"minutes": 0.5, "seconds": 15}, 45),
        ({"days": -1, "hours": 25}, 3600),
        ({"weeks": 1}, 604800),
        ("00:25:00:00", 90000),
        ({"milliseconds": 1500.0}, 1.5),
    ],
)
def test_a_time_limit_of_fractional_parts_is_kept_as_lightning_reads_it(value, seconds) -> None:
    from lightning.pytorch.callbacks import Timer

    arguments = {"max_time": value}
    check_lightning_arguments(arguments, ConfigError)
    assert arguments == {"max_time": value}  # passed to lightning.Trainer as given
    assert Timer(duration=value)._duration == pytest.approx(seconds)  # the installed Lightning's reading


def test_a_fractional_time_limit_loads_from_an_override(tmp_path) -> None:
    run, _ = load_config("tiny", ["trainer.max_time={hours: 1.5}", f"out_dir={tmp_path / 'run'}"])
    assert run.trainer.lightning["max_time"] == {"hours": 1.5}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"hours": float("nan")}, r"hours=nan is not a finite number"),
        ({"hours": float("inf")}, r"hours=inf is not a finite number"),
        ({"hours": True}, r"hours=True is not a finite number"),
        ({"hours": "1"}, r"hours='1' is not a finite number"),
        ({"hour": 1}, r"'hour' is not a unit of time; .*keys \['weeks', 'days', 'hours'"),
        ({"hours": -1.5}, r"is -5400 s: a time limit must be positive"),
        ({"minutes": 1, "seconds": -60}, r"is 0 s: a time limit must be positive"),
        ({"weeks": 1e10}, r"longer than a timedelta holds"),
        ("1.5:00:00:00", r"is not a time limit: give DD:HH:MM:SS"),
        ("-1:00:00:00", r"is not a time limit: give DD:HH:MM:SS"),
        (3600, r"3600 \(int\) is not a time limit"),
    ],
)
def test_a_time_limit_that_is_no_time_limit_is_refused_naming_the_part(value, message) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.max_time=.*" + message):
        check_lightning_arguments({"max_time": value}, ConfigError)


def test_a_timedelta_time_limit_is_kept_and_one_of_no_time_refused() -> None:
    check_lightning_arguments({"max_time": timedelta(minutes=3)}, ConfigError)
    with pytest.raises(ConfigError, match=r"is 0 s: a time limit must be positive"):
        check_lightning_arguments({"max_time": timedelta(0)}, ConfigError)
