"""The layer's inference path (no autograd): chunked calls and in-place work that no caller can see."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []  # (op, elements of its first argument)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args else None
        tensors = first if isinstance(first, (list, tuple)) else [first]
        size = sum(t.numel() for t in tensors if isinstance(t, torch.Tensor))
        self.calls.append((func.__name__.split(".")[0], size))
        return func(*args, **(kwargs or {}))


def test_a_whole_block_output_reaches_the_post_norm_without_a_copy():
    # The dual form returns one aligned block's output as its path wrote it: copying it (a one-tensor
    # torch.cat) cost a pass over the outputs, and another (a clone in the reshape to [B, T, D]) to
    # undo the layout the CPU kernel and the fused path write, [B, T, H, f].
    layer = TTTLayer(16, 2, mini_batch_size=4)
    x = torch.randn(1, 32, 16)  # 512 numbers; the state's copies (the new state) are 128 and 16
    with torch.no_grad(), _RecordOps() as record:
        layer(x)
    copies = [(op, size) for op, size in record.calls if op in ("cat", "clone") and size >= x.numel()]
    assert not copies, copies
