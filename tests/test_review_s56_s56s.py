"""Review s56s: the later merges of session 56 (s56a, s56c, s56k, s56l) against runs and checkpoints
written before them."""

from __future__ import annotations

import pytest

from innerloop.checkpoints import saved_model_config
from innerloop.models import ModelConfig


def _matrix_model(kernel: str, mini_batch_size: int) -> dict:
    model = ModelConfig().to_dict()
    model["ttt"] = {
        **model["ttt"],
        "inner_model": "matrix",
        "kernel": kernel,
        "mini_batch_size": mini_batch_size,
    }
    return model


@pytest.mark.slow  # 1.2 s here: the registry is built and its kernels listed
def test_a_checkpoint_naming_delta_chunk_at_a_mini_batch_size_it_does_not_run_loads_on_auto() -> None:
    """delta_chunk at mini_batch_size != 1 was accepted at construction before s56c (refused at its first
    call, so a layer fell back with a warning when loaded): a checkpoint or HF config.json naming it must
    load as before, with kernel='auto' and a warning, not be refused as a model 'this innerloop cannot
    rebuild' (eval refused a b96a2698 checkpoint so)."""
    with pytest.warns(UserWarning, match=r"kernel='delta_chunk'.*mini_batch_size=2.*kernel='auto'"):
        model = saved_model_config("old.safetensors", _matrix_model("delta_chunk", 2))
    assert model["ttt"]["kernel"] == "auto"
    kept = saved_model_config("old.safetensors", _matrix_model("delta_chunk", 1))
    assert kept["ttt"]["kernel"] == "delta_chunk"
