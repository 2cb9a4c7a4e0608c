"""Session 41: a TTT-E2E call that trains on no chunk runs under torch.func transforms, and is right there;
evaluation metrics that did not sync across processes are refused, never logged."""

from __future__ import annotations

import json
import re

import pytest
import torch
from ddp_testing import unsynced_two_rank_run  # noqa: F401 (a fixture)
from torch.func import functional_call, grad, jvp

from innerloop.models import build_model


def _model(chunk_size: int) -> torch.nn.Module:
    section = {"mixer": "e2e", "vocab_size": 11, "hidden_size": 8, "num_layers": 4, "num_heads": 2}
    section.update(intermediate_size=16, window=4, e2e={"chunk_size": chunk_size})
    torch.manual_seed(0)
    return build_model(section).double()


def _central_difference(loss, weight, tangent, eps=1e-5):
    """The derivative of ``loss`` along ``tangent``: central differences at ``eps`` and ``eps / 2``,
    Richardson-extrapolated (error O(eps^4); the loss's third derivative along the tangent is large)."""

    def difference(h):
        return (loss(weight + h * tangent) - loss(weight - h * tangent)) / (2 * h)

    return (4 * difference(eps / 2) - difference(eps)) / 3


@pytest.mark.parametrize("length", [1, 3, 15, 16])
@pytest.mark.filterwarnings("ignore::innerloop.models.e2e.OneChunkTrainingWarning")  # a sequence of one chunk
def test_e2e_call_that_trains_no_chunk_differentiates_under_torch_func(length):
    # every call was refused under torch.func (2dec02e's TypeError), though only a call that trains a chunk
    # takes the inner gradient those transforms cannot run; a call that only scores is an ordinary function
    model = _model(chunk_size=16)
    ids = torch.randint(0, 11, (2, length), generator=torch.Generator().manual_seed(1))
    weight = model.embed.weight.detach()
    tangent = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def loss(w):
        return functional_call(model, {"embed.weight": w}, (ids,))[0].square().mean()

    expected = _central_difference(loss, weight, tangent)
    _, forward = jvp(loss, (weight,), (tangent,))
    backward = (grad(loss)(weight) * tangent).sum()
    torch.testing.assert_close(forward, expected, rtol=1e-9, atol=0)  # measured: <= 6e-11
    torch.testing.assert_close(backward, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("length", [17, 32])
def test_e2e_call_that_trains_a_chunk_is_still_refused_under_torch_func(length):
    model = _model(chunk_size=16)
    ids = torch.randint(0, 11, (1, length))
    weight = model.embed.weight.detach()
    with pytest.raises(TypeError, match=r"torch.func transforms .*forward_ad"):
        grad(lambda w: functional_call(model, {"embed.weight": w}, (ids,))[0].sum())(weight)


@pytest.mark.slow  # reason: uses a 2-process run (ddp_testing: ddp_spawn on CPU, ~15 s, shared with s42a)
def test_evaluation_metrics_not_combined_across_processes_are_refused_not_logged(
    unsynced_two_rank_run,  # noqa: F811
) -> None:
    # the number logged was one process's shard (max over the processes of their own val_ppl), silently:
    # two processes train 2 steps and validate, the metrics' sync skipped (ddp_testing.MetricsNeverSync)
    raised = json.loads((unsynced_two_rank_run / "raised.json").read_text())
    assert raised is not None, "the run whose metrics never synced ended without an error"
    assert re.search(r"val_\* metrics were not combined across the 2 processes", raised["message"]), raised
