"""Review s61 (helper e2e) of TTT-E2E: the defects it found, each pinned by a test seen failing without its fix.

- ``E2ELM.stream_losses`` passed over an empty piece without a yield, so its yields did not pair up with
  the pieces (``stream`` yields one per piece): zipping the pieces with the losses attributed every later
  piece's losses to the piece before it. An empty piece now yields ``[B, 0]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from innerloop.models import E2EConfig, ModelConfig, build_model


def small_model(seed: int = 0, **e2e):
    torch.manual_seed(seed)
    config = ModelConfig(
        mixer="e2e",
        vocab_size=11,
        hidden_size=16,
        num_heads=2,
        num_layers=2,
        intermediate_size=24,
        window=5,
        e2e=E2EConfig(chunk_size=4, **e2e),
    )
    return build_model(config).double().eval()


def test_stream_losses_yields_once_per_piece_an_empty_piece_included() -> None:
    model = small_model()
    ids = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(1))
    cuts = [0, 0, 3, 3, 9, 9]  # empty pieces first, between and last
    pieces = [ids[:, a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    yields = list(model.stream_losses(pieces))
    assert [tuple(y.shape) for y in yields] == [(2, 0), (2, 2), (2, 0), (2, 6), (2, 0)]
    assert all(y.dtype == torch.float64 for y in yields)  # the logits' dtype, empty ones too
    with torch.no_grad():
        whole, _ = model(ids)
    expected = F.cross_entropy(whole[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    torch.testing.assert_close(torch.cat(yields, dim=1), expected, rtol=1e-12, atol=1e-12)
