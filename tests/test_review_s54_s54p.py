"""Review s54p: TTT-E2E against the official reference (``../shared/e2e``), constant memory, hostile inputs.

- With test-time training off (the SWA baseline, the official ``train_mode=pretrain``, which a converted
  official checkpoint runs unless its config says ``meta``) the state a call returned held, as its empty
  ``pending`` and ``pending_ids``, zero-length views of the call's final hidden states ``[B, T, D]`` and
  of its ``input_ids``: a state kept after a prefill of ``T`` tokens held ``B * T * D`` floats alive (and,
  with gradients on, the call's whole graph), which ``E2EState.nbytes`` did not show (0 bytes) and
  ``torch.save`` would write. The test-time-training path already kept its own copies (``owning``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import pytest
import torch

from innerloop.models import E2EConfig, ModelConfig, build_model
from innerloop.models.e2e import E2ELM, E2EState


def _tiny(test_time_training: bool, rope_positions: str = "relative") -> E2ELM:
    torch.manual_seed(0)
    e2e = E2EConfig(chunk_size=4, test_time_training=test_time_training, rope_positions=rope_positions)
    config = ModelConfig(
        mixer="e2e",
        vocab_size=17,
        hidden_size=8,
        num_heads=2,
        num_layers=2,
        intermediate_size=12,
        window=6,
        e2e=e2e,
    )
    model = build_model(config)
    assert isinstance(model, E2ELM)
    return model.eval()


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor a state holds (dataclasses, tuples, dicts), walked without the state's own code."""
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _tensors(getattr(value, f.name))]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _held_bytes(state: E2EState) -> int:
    """Bytes of the storages the state keeps alive (each storage once), not only of its tensors' elements."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors(state)}
    return sum(storages.values())


@pytest.mark.parametrize("rope_positions", ["relative", "absolute"])
@pytest.mark.parametrize(
    "test_time_training", [False, pytest.param(True, marks=pytest.mark.slow)]
)  # True: 1.3 s
def test_a_state_holds_the_same_bytes_after_a_short_and_a_long_prefill(
    test_time_training, rope_positions
) -> None:
    """``nbytes`` is flat in the length read, and the storages the state keeps alive are at most twice it
    (``owning``'s bound: a window kept as a view of a buffer up to twice its size), not the call's inputs."""
    model = _tiny(test_time_training, rope_positions)
    sizes = []
    for length in (12, 60):
        ids = torch.randint(0, 17, (2, length))
        with torch.no_grad():
            _, state = model(ids)
        sizes.append(state.nbytes())
        # before the fix (TTT off) at 60 tokens: 6080 bytes held, nbytes 1280
        assert _held_bytes(state) <= 2 * state.nbytes(), (length, _held_bytes(state), state.nbytes())
    assert sizes[0] == sizes[1]


def test_a_state_without_test_time_training_keeps_no_graph_of_the_call() -> None:
    model = _tiny(test_time_training=False).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, state = model(torch.randint(0, 17, (1, 12)))
    assert state.pending.grad_fn is None  # before the fix: a SliceBackward0 of the last block's output


# ---- a model built on the meta device ---------------------------------------------------------------


@pytest.mark.slow  # 2 s the first time a process builds on the meta device, 0.03 s after
def test_a_model_built_on_the_meta_device_runs_at_the_full_inner_lr_after_to_empty() -> None:
    """``to_empty`` leaves every buffer uninitialised; ``outer_progress`` (the inner lr's warm-up) is
    made again as built (1: the full ``inner_lr``), as a TTT layer remakes its derived buffers. Before,
    it held whatever the memory held: 4.7e-310 seen, read as progress 0 (inner lr 0.1 of 1.0, silently),
    or a value outside [0, 1] refused at the first forward."""
    with torch.device("meta"):
        model = _tiny(test_time_training=True)
    model = model.to_empty(device="cpu")
    assert model.outer_progress.dtype == torch.float64
    assert model.outer_progress.item() == 1.0
    assert model.inner_lr() == model.config.e2e.inner_lr
