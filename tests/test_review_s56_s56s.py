"""Review s56s: the later merges of session 56 (s56a, s56c, s56k, s56l) against runs and checkpoints
written before them."""

from __future__ import annotations

import pytest

from innerloop.checkpoints import saved_model_config
from innerloop.models import ModelConfig


def _matrix_model(kernel: str, mini_batch_size: int, wrapped: bool = False) -> dict:
    model = ModelConfig().to_dict()
    model["ttt"] = {
        **model["ttt"],
        "inner_model": "matrix",
        "kernel": kernel,
        "mini_batch_size": mini_batch_size,
        "inner_norm": wrapped,
        "inner_residual": wrapped,
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


@pytest.mark.slow  # 1.2 s here: the registry is built and its kernels listed
def test_a_checkpoint_naming_delta_chunk_on_a_wrapped_layer_loads_on_auto() -> None:
    """s56r's sibling of the above: delta_chunk on a layer with the inner LayerNorm or residual on is
    refused at construction since s56r (KernelSpec.check_wrapping; at its first call before), so a
    checkpoint naming it (the default wrapping is on) must load on kernel='auto' with a warning, asked
    through the layer's own check (core.layer.check_kernel_takes_layer), not be refused."""
    with pytest.warns(UserWarning, match=r"kernel='delta_chunk'.*inner_norm=True.*kernel='auto'"):
        model = saved_model_config("old.safetensors", _matrix_model("delta_chunk", 1, wrapped=True))
    assert model["ttt"]["kernel"] == "auto"
