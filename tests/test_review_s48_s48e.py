"""Review s48e: TTT-E2E and the official checkpoints (issues 5 and 15)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from innerloop.models import E2EConfig, ModelConfig, build_model


def _tiny_e2e(**e2e: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        mixer="e2e",
        vocab_size=64,
        window=8,
        hidden_size=16,
        num_heads=2,
        intermediate_size=24,
        num_layers=2,
        e2e=E2EConfig(chunk_size=4, **e2e),
    )
    return build_model(config)


class _CountedDeviceReads(TorchFunctionMode):
    """Counts ``Tensor.cpu`` calls (the non-finite check's read of the device) under it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += getattr(func, "__name__", "") == "cpu"
        return func(*args, **(kwargs or {}))


# reason: four forwards of a TTT-E2E model under a TorchFunctionMode (1.5 s on 2 cores at load 13)
@pytest.mark.slow
def test_the_non_finite_check_reads_the_device_once_per_call_not_per_inner_step():
    """docs/e2e.md: ``non_finite: raise`` reads the sums of all a call's inner steps at once (one sync on a
    GPU per training step, and per ``chunk_size`` decoded tokens), and ``ignore`` reads nothing."""
    for non_finite, per_call in (("raise", 1), ("ignore", 0)):
        lm = _tiny_e2e(non_finite=non_finite)
        ids = torch.randint(0, 64, (2, 9))
        with torch.no_grad():
            with _CountedDeviceReads() as counted:
                _, state = lm(ids[:, :7])  # trains the first chunk of 4 (its next token is read)
            assert counted.reads == per_call, (non_finite, counted.reads)
            reads = []
            for index in (7, 8):  # token 7 completes the second chunk, token 8 trains it
                with _CountedDeviceReads() as counted:
                    _, state = lm(ids[:, index : index + 1], state)
                reads.append(counted.reads)
        assert reads == [0, per_call], (non_finite, reads)


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "e2e" / "ttt_e2e_tiny"


# reason: reads the shared vectors, builds the 4-block model and reads 2 x 128 tokens (1.2 s at load 13)
@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/e2e is not beside this checkout (CI has the copy)")
@pytest.mark.parametrize("mode", ["on", "off"])
def test_the_official_per_token_and_per_chunk_losses_and_the_training_loss(mode):
    """The shared vectors' ``token_nll_ttt_*`` and ``chunk_loss_ttt_*`` (which tests/interop did not
    compare: only the logits and fast weights) are the converted model's next-token losses of
    ``target_tokens``, and the mean of the chunk losses is its training loss (``outer_loss: chunk_mean``).
    Measured: 9.5e-7 for each."""
    from safetensors.numpy import load_file

    from innerloop.interop.ttt_e2e import model_from_arrays

    official = load_file(SHARED / "outputs.safetensors")
    config = json.loads((SHARED / "fixture.json").read_text(encoding="utf-8"))["resolved_config_meta"]
    model = model_from_arrays(
        load_file(SHARED / "params_init.safetensors"), config, test_time_training=mode == "on"
    )
    ids = torch.from_numpy(np.load(SHARED / "input_ids.npy").astype(np.int64))
    targets = torch.from_numpy(np.load(SHARED / "target_tokens.npy").astype(np.int64))
    assert np.load(SHARED / "loss_masks.npy").all()  # every target scored: the plain mean is the official
    with torch.no_grad():
        logits, _ = model(ids)
        token_nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, T]
        loss = model.training_loss(logits, targets, ignore_index=-100)
    chunk = config["model"]["mini_batch_size"]
    chunk_loss = token_nll.view(token_nll.shape[0], -1, chunk).mean(-1)
    assert (token_nll - torch.from_numpy(official[f"token_nll_ttt_{mode}"])).abs().max() < 1e-5
    # the official per-token losses recomputed from its logits (read by no test before review s49l)
    from_logits = torch.from_numpy(official[f"token_nll_from_logits_run_ttt_{mode}"])
    assert (token_nll - from_logits).abs().max() < 1e-5
    assert (chunk_loss - torch.from_numpy(official[f"chunk_loss_ttt_{mode}"])).abs().max() < 1e-5
    assert abs(float(loss) - float(official[f"chunk_loss_ttt_{mode}"].mean())) < 1e-5
