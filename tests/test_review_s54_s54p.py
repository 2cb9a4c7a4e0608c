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
    model = _tiny(test_time_training, rope_positions)
    held = []
    for length in (20, 100):
        ids = torch.randint(0, 17, (2, length))
        with torch.no_grad():
            _, state = model(ids)
        held.append((state.nbytes(), _held_bytes(state)))
    assert held[0] == held[1], held  # before the fix (TTT off): 5376 -> 31296 bytes held, nbytes 5376 both


def test_a_state_without_test_time_training_keeps_no_graph_of_the_call() -> None:
    model = _tiny(test_time_training=False).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, state = model(torch.randint(0, 17, (1, 12)))
    assert state.pending.grad_fn is None  # before the fix: a SliceBackward0 of the last block's output
