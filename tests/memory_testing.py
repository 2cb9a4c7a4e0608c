"""What the decoding-memory tests measure: the bytes of every tensor storage the process can reach."""

from __future__ import annotations

import gc
import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensor


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage the Python process can still reach (parameters, state, leftovers),
    each storage counted once. Tensors without memory of their own are skipped: meta tensors, and the
    fake or functional tensors that torch.compile keeps in its caches (a compile earlier in the
    session leaves them; their storage has no data pointer)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        if tensor.device.type == "meta" or isinstance(tensor, FakeTensor):
            continue
        try:
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # a fake / functional tensor: no memory
            continue
        storages[pointer] = storage.nbytes()
    return sum(storages.values())
