"""Review s44a: the grader of issues 4 (Triton kernels through the registry) and 5 (TTT-E2E), with
shapes, configs and hostile inputs the issues do not name (report: the session's closing message).

Each test pins a defect the review found (the commit that fixes it names it):

- ``E2ELM.stream`` / ``stream_losses`` given a piece with another number of sequences than the pieces
  before named ``input_ids`` and ``state``, which their caller never passed (s33c named the other
  malformed pieces by their index; this case was left out).
"""

from __future__ import annotations

import pytest
import torch

from innerloop.models import E2EConfig, ModelConfig, build_model


def _tiny_e2e(vocab_size: int = 64):
    torch.manual_seed(0)
    config = ModelConfig(
        mixer="e2e", vocab_size=vocab_size, hidden_size=16, num_heads=2, intermediate_size=16,
        num_layers=1, window=4, e2e=E2EConfig(chunk_size=8),
    )  # fmt: skip
    return build_model(config).eval()


@pytest.mark.parametrize("api", ["stream", "stream_losses"])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_piece_of_another_batch_size_is_named_by_its_index(api, rows) -> None:
    model = _tiny_e2e()
    ids = torch.randint(0, 64, (2, 5))
    pieces = [ids[:, :3], ids[:, 3:], torch.randint(0, 64, (rows, 2))]
    with pytest.raises(ValueError) as caught:
        list(getattr(model, api)(pieces))
    message = str(caught.value)
    assert f"pieces[2] has {rows} sequences" in message and "state 2" in message, message
    assert "input_ids" not in message


def test_stream_given_a_state_of_another_batch_names_the_first_piece() -> None:
    model = _tiny_e2e()
    with torch.no_grad():
        _, state = model(torch.randint(0, 64, (2, 3)))
    with pytest.raises(ValueError, match=r"pieces\[0\] has 1 sequences \(rows\), the stream's state 2"):
        next(model.stream([torch.randint(0, 64, (1, 2))], state))
