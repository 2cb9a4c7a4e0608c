"""Regression tests of review s46e: defects other reviewers found and left open.

- A TTT-E2E model update rule (or model inner loss) returning NaN at a call's batch, which registration
  does not try, gave NaN logits and state without a word, where a TTT layer raises naming its plugins
  (``non_finite="raise"``); the model now does too, and ``model.e2e.non_finite="ignore"`` lets them
  propagate as the layer's option does.
"""

from __future__ import annotations

import pytest
import torch

from innerloop.plugins.e2e import NextTokenChunkLoss, ScoreFirstSGD

_E2E = {"mixer": "e2e", "vocab_size": 11, "hidden_size": 16, "num_layers": 2, "num_heads": 2}


def _e2e_model():
    from innerloop.models import build_model

    torch.manual_seed(0)
    return build_model({**_E2E, "intermediate_size": 24, "window": 8, "e2e": {"chunk_size": 4}})


class _NanAtBatch4Rule(ScoreFirstSGD):
    name = "s46e_nan_rule"

    def step(self, fast, losses, lr, max_grad_norm, create_graph):
        new = super().step(fast, losses, lr, max_grad_norm, create_graph)
        return {k: v * float("nan") for k, v in new.items()} if losses.shape[0] > 3 else new


class _NanAtBatch4Loss(NextTokenChunkLoss):
    name = "s46e_nan_loss"

    def chunk_loss(self, logits, ids):
        losses = super().chunk_loss(logits, ids)
        return losses * float("nan") if logits.shape[0] > 3 else losses


@pytest.mark.slow  # builds the registry when run alone (~0.8 s), then a 2-block E2E model on 13 tokens
@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (
            "update_rule",
            r"model update rule 's46e_nan_rule' \(.*_NanAtBatch4Rule\): step returned non-finite",
        ),
        (
            "inner_loss",
            r"model inner loss 's46e_nan_loss' \(.*_NanAtBatch4Loss\): chunk_loss returned non-finite",
        ),
    ],
)
def test_an_e2e_plugin_returning_nan_is_named_unless_non_finite_is_ignore(plugin, message) -> None:
    model = _e2e_model()
    setattr(model, plugin, _NanAtBatch4Rule() if plugin == "update_rule" else _NanAtBatch4Loss())
    ids = torch.randint(0, 11, (4, 13))
    with torch.no_grad():
        assert torch.isfinite(model(ids[:2])[0]).all()  # the batch of 2 is right
        with pytest.raises(ValueError, match=message + r".*non_finite='ignore'"):
            model(ids)
        model.config.e2e.non_finite = "ignore"  # read at every call, as a TTT layer's option
        logits, state = model(ids)
    assert not torch.isfinite(logits).all()
