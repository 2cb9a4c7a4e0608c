"""Review s33c (official TTT-E2E loader): ``load_model``'s own arguments are named when wrong.

``test_time_training="false"`` was reported as ``model.e2e.test_time_training``, a config key the caller
never wrote; ``checkpoint_dir=""`` was read as the current directory and reported as ``'.'``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from innerloop.interop.ttt_e2e import model_config, weights_folder

CONFIG = json.loads((Path(__file__).resolve().parents[1] / "data" / "e2e" / "config.json").read_text())


@pytest.mark.parametrize("value", ["false", 0, 1])
def test_a_test_time_training_that_is_not_a_bool_is_named_as_the_argument(value) -> None:
    with pytest.raises(TypeError, match=rf"^test_time_training={value!r} \({type(value).__name__}\) must be"):
        model_config(CONFIG, test_time_training=value)
    assert model_config(CONFIG, test_time_training=False).e2e.test_time_training is False


def test_an_empty_checkpoint_dir_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # load_model and convert find the folder through weights_folder
    with pytest.raises(ValueError, match="^checkpoint_dir '' is empty"):
        weights_folder("")
