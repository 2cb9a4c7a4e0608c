"""s51p: ``layer_configs(gates=True)`` draws :class:`GatedTTTLayer`'s decay and momentum gates (both on in
the simplest example), so a layer-level property test sees the momentum rule's ``S`` carried between calls.

Before, ``layer_configs`` built plain ``TTTLayer``s, which have no forgetting gates: the momentum rule ran
with ``momentum=None`` and a layer that dropped ``state.momentum`` between calls passed every layer-level
property test (tests/test_review_s42c.py's momentum members: 0 of 9 failed under that mutation; with the
gates 9 of 9 fail, and all pass clean).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from hypothesis import Phase, find, settings

from innerloop.testing import run_layer_in_chunks
from innerloop.testing.checks import FLOAT64_TOLERANCE, assert_close
from innerloop.testing.strategies import GatedTTTLayer, layer_configs

FIRST_EXAMPLE = settings(max_examples=1, phases=(Phase.generate,), database=None, derandomize=True)
MOMENTUM_CONFIGS = layer_configs(inner_models=("linear",), update_rules=("momentum",), gates=True)


def test_the_simplest_gated_config_has_both_gates_on_and_carries_momentum():
    config = find(MOMENTUM_CONFIGS, lambda _: True, settings=FIRST_EXAMPLE)
    assert config["decay_gate"] and config["momentum_gate"]
    assert "decay_gate" not in find(layer_configs(), lambda _: True, settings=FIRST_EXAMPLE)
    torch.manual_seed(0)
    layer = GatedTTTLayer(**config, kernel="torch").double()
    x = torch.randn(2, 5, config["hidden_size"], dtype=torch.float64)
    with torch.no_grad():
        whole, state = layer(x)
        split, _ = run_layer_in_chunks(layer, x, [2])
    assert sorted(state.momentum) == sorted(state.params) and set(state.decay) == {"product"}
    assert_close(split, whole, "gated momentum layer cut at 2 vs whole", FLOAT64_TOLERANCE)


def test_a_dropped_momentum_carry_changes_the_gated_layers_output(monkeypatch):
    """The mutation the gates exist for: the second call reads ``S = 0``; the output moves."""
    config = find(MOMENTUM_CONFIGS, lambda _: True, settings=FIRST_EXAMPLE)
    torch.manual_seed(0)
    layer = GatedTTTLayer(**config, kernel="torch").double()
    x = torch.randn(2, 5, config["hidden_size"], dtype=torch.float64)
    with torch.no_grad():
        whole, _ = layer(x)
        _, state = layer(x[:, :2])
        dropped = replace(state, momentum={k: torch.zeros_like(v) for k, v in state.momentum.items()})
        rest, _ = layer(x[:, 2:], dropped)
    assert (rest - whole[:, 2:]).abs().max() > 1e-6
