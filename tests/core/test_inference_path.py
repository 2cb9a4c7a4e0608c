"""The layer's inference path (no autograd): chunked calls and in-place work that no caller can see."""

from __future__ import annotations

import torch

from innerloop import TTTLayer


def test_chunked_inference_keeps_the_output_dtype_under_autocast():
    layer = TTTLayer(16, 2, mini_batch_size=4, inference_chunk_size=8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        short, _ = layer(torch.randn(1, 8, 16))
        long, _ = layer(torch.randn(1, 20, 16))
    assert short.dtype == long.dtype == torch.bfloat16


def test_in_place_rope_never_touches_a_tensor_a_hook_has_seen():
    layer = TTTLayer(16, 2, mini_batch_size=4)
    seen = []
    handle = layer.q_proj.register_forward_hook(lambda module, args, output: seen.append(output))
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        hooked, _ = layer(x)
        handle.remove()
        plain, _ = layer(x)
    assert torch.equal(seen[0], torch.nn.functional.linear(x, layer.q_proj.weight))
    assert torch.equal(hooked, plain)
