"""Review s33c (TTT-E2E): ``E2ELM.stream`` and ``stream_losses`` name the piece that is wrong.

Their parameter is ``pieces``; an id outside the vocabulary (or a tensor that is not ``[batch, length]``
of integer ids) in the third piece was reported as ``input_ids`` (the forward's name), which the caller
never passed, and without saying which piece.
"""

from __future__ import annotations

import pytest
import torch

from innerloop.models import E2EConfig, ModelConfig, build_model


def _model():
    torch.manual_seed(0)
    config = ModelConfig(
        mixer="e2e", window=5, num_layers=2, hidden_size=16, num_heads=2, intermediate_size=24,
        e2e=E2EConfig(chunk_size=4, suffix_fraction=0.5),
    )  # fmt: skip
    return build_model(config).eval()


@pytest.mark.parametrize("api", ["stream", "stream_losses"])
@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (torch.full((2, 3), 256), ValueError, r"pieces\[2\] holds token id 256.*0\.\.255"),
        (torch.full((2, 3), -1), ValueError, r"pieces\[2\] holds token id -1"),
        (torch.ones(2, 3), TypeError, r"pieces\[2\] must hold integer token ids"),
        (torch.ones(3, dtype=torch.int64), ValueError, r"pieces\[2\] must be \[batch, length\]"),
    ],
)
def test_a_bad_piece_is_named_by_its_index(api, bad, error, message) -> None:
    model = _model()
    ids = torch.randint(0, 256, (2, 6))
    pieces = [ids[:, :4], ids[:, 4:], bad]
    with pytest.raises(error, match=message):
        list(getattr(model, api)(pieces))
