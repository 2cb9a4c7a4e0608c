"""Review s57k: adversarial review of session 57's merged changes (see the report)."""

from __future__ import annotations

import pytest
from test_review_s57_s57c import IgnoresBias

from innerloop.registry import PluginError


def test_an_unread_weight_is_refused_for_its_true_reason():
    """s57c's refusal of a model that never reads a declared weight said 'the inner loop differentiates
    w.r.t. every declared weight', which is false: every update rule runs such a model (the layer trained,
    measured). What it costs is a layer parameter (the weight's initial value) that never gets a gradient,
    which DDP refuses at its second step (measured, gloo). Seen failing with the old message."""
    from innerloop.registry.kinds import smoke_test

    with pytest.raises(
        PluginError, match=r"\['b'\].*a layer trains each declared weight's initial value.*DDP"
    ):
        smoke_test("inner_model", IgnoresBias())
