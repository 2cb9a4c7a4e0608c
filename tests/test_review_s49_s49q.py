"""Review s49q: a flag argument takes a numpy bool wherever it takes a Python bool.

The shared rule is :func:`innerloop.core.functional.is_flag` (a bool, Python's or numpy's: what numpy's
comparisons give). ``use_cache`` / ``return_dict`` of the HF wrapper took ``np.True_``, and so did the
core layers' flags, while ``output_hidden_states``, ``export_model(overwrite=...)`` and the TTT-E2E
converter's ``test_time_training`` refused it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from innerloop.hf.arguments import hidden_states_wanted

E2E_DATA = Path(__file__).resolve().parent / "data" / "e2e"


@pytest.mark.parametrize("flag", [np.True_, np.False_])
def test_output_hidden_states_takes_a_numpy_bool(flag: np.bool_) -> None:
    wanted = hidden_states_wanted(flag, default=False, is_e2e=False)
    assert wanted is bool(flag)


def test_output_hidden_states_still_refuses_an_index() -> None:
    with pytest.raises(ValueError, match="output_hidden_states must be True or False"):
        hidden_states_wanted(1, default=False, is_e2e=False)


def test_export_overwrite_takes_a_numpy_bool(tmp_path) -> None:
    from innerloop.hf.export import check_target

    assert check_target(tmp_path / "new", np.False_) == (tmp_path / "new").resolve()
    with pytest.raises(TypeError, match="overwrite"):
        check_target(tmp_path / "new", "no")


def test_e2e_converter_test_time_training_takes_a_numpy_bool() -> None:
    from innerloop.interop.ttt_e2e import model_config

    config = json.loads((E2E_DATA / "config.json").read_text(encoding="utf-8"))
    assert model_config(config, test_time_training=np.True_).e2e.test_time_training is True
    assert model_config(config, test_time_training=np.False_).e2e.test_time_training is False
    with pytest.raises(TypeError, match="test_time_training"):
        model_config(config, test_time_training="yes")


def test_the_hf_wrapper_refuses_an_empty_piece_saying_why() -> None:
    """T = 0: the core models take it (output of length 0, state unchanged), the HF wrapper refuses it as
    transformers' own models do (Llama, GPT-2 and Mamba of transformers 5.25 fail on ``[2, 0]`` ids, deep
    inside). The refusal names the shape and states that reason and the way round it."""
    import torch

    from innerloop.hf.modeling import check_token_ids_shape

    with pytest.raises(ValueError, match=r"shape \(2, 0\).*transformers' own models.*CausalLM"):
        check_token_ids_shape(torch.zeros(2, 0, dtype=torch.long))


def test_checkpoint_paths_expand_the_home_folder_as_export_and_train_do(tmp_path, monkeypatch) -> None:
    """``~`` in a path means the home folder for ``export_model``, the run's ``out_dir`` and the data
    paths; ``save_checkpoint`` wrote ``./~/run.ckpt`` and ``load_checkpoint('~/...')`` found nothing."""
    import torch

    from innerloop.checkpoints import load_checkpoint, save_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    written = save_checkpoint({"state_dict": {"w": torch.ones(2)}}, "~/run.ckpt")
    assert written == tmp_path / "home" / "run.ckpt" and not (tmp_path / "~").exists()
    assert torch.equal(load_checkpoint("~/run.ckpt")["state_dict"]["w"], torch.ones(2))
