"""Review s20: defects of code paths that only a GPU run exercises, shown on the CPU.

On a CUDA device every read of a tensor's value on the host (``bool(t)``, ``float(t)``, ``t.item()``,
``t.tolist()``) blocks the CPU until the GPU has finished all queued work (a host-device sync): in a
per-token or per-chunk loop it keeps the GPU idle between launches. Such reads cost nothing visible on
the CPU, so no test saw them; these tests count them by wrapping ``torch.Tensor``'s conversion methods.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

HOST_READS = ("__bool__", "__float__", "__int__", "item", "tolist")


@contextlib.contextmanager
def counting_host_reads():
    """Count every read of a tensor's value on the host (each one a device sync on CUDA)."""
    counts = {"reads": 0}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrapped(original):
        def read(self, *args, **kwargs):
            counts["reads"] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrapped(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _ttt_layer_and_state():
    from innerloop import TTTLayer

    torch.manual_seed(0)
    layer = TTTLayer(hidden_size=32, num_heads=2, mini_batch_size=4, kernel="torch").eval()
    with torch.no_grad():
        _, state = layer(torch.randn(2, 5, 32))
    return layer, state


def test_state_is_finite_reads_the_device_once():
    _, state = _ttt_layer_and_state()
    assert len(state.tensors()) > 1
    with counting_host_reads() as counts:
        assert state.is_finite()
    assert counts["reads"] == 1, f"{counts['reads']} host syncs for {len(state.tensors())} tensors"


def test_decoding_a_token_syncs_at_most_twice_per_layer(monkeypatch):
    """review s20 (MED on a GPU): a decoded token read the device about 6 times per TTT layer; now the
    input check and one read for the output and the whole state (the state here is inside a mini-batch:
    at a boundary one more read checks its pending sums)."""
    import innerloop.core.functional

    # as on a GPU: no branch on a value where reads are free on the CPU only (the norms' overflow check)
    monkeypatch.setattr(innerloop.core.functional, "host_reads_are_free", lambda x: False)
    layer, state = _ttt_layer_and_state()
    assert state.offset != 0
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        layer(x, state)  # warm: first-use work done
        with counting_host_reads() as counts:
            layer(x, state)
    assert counts["reads"] <= 2, f"{counts['reads']} host syncs for one decoded token of one layer"


def test_e2e_chunk_loss_reads_no_value():
    from innerloop.plugins.e2e import NextTokenChunkLoss

    logits = torch.randn(2, 4, 11)
    ids = torch.randint(0, 11, (2, 5))
    with counting_host_reads() as counts:
        NextTokenChunkLoss().chunk_loss(logits, ids)
    assert counts["reads"] == 0


def test_e2e_forward_reads_outer_progress_at_most_once():
    from innerloop.models import build_model
    from innerloop.models.config import E2EConfig, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(
        mixer="e2e", window=8, hidden_size=32, num_heads=2, intermediate_size=64, num_layers=2,
        e2e=E2EConfig(chunk_size=4),
    )  # fmt: skip
    model = build_model(config).train()
    model.set_outer_progress(0.05)  # inside the inner-lr warm-up
    ids = torch.randint(0, config.vocab_size, (1, 32))  # 8 chunks
    float_reads = {"n": 0}
    original = torch.Tensor.__float__

    def counted(self):
        if self is model.outer_progress:
            float_reads["n"] += 1
        return original(self)

    torch.Tensor.__float__ = counted
    try:
        model(ids)
    finally:
        torch.Tensor.__float__ = original
    assert float_reads["n"] <= 1, f"outer_progress read {float_reads['n']} times in one forward"


def test_auto_precision_avoids_bf16_on_a_gpu_without_it(monkeypatch):
    from innerloop.config.load import concrete_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert concrete_precision("auto", "auto") != "bf16-mixed"


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_precision_on_a_gpu_is_said_with_its_reason(monkeypatch, capsys, native, expected):
    from innerloop.train.run import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    assert resolve_precision("auto", "auto") == expected
    where = "a CUDA GPU" if native else "a CUDA GPU without native bfloat16"
    assert capsys.readouterr().out == f"trainer.precision=auto: {expected} ({where} for accelerator=auto)\n"
