"""Buffers of the training scans' starting weights, kept from one step for the next.

The compiled training scans (``linear_scan.py``, ``stack_scan.py``) save the inner weights at the start
of every mini-batch for their backward: hundreds of MB for TTT-MLP at D = 768, T = 2048. A buffer that
large is a fresh mapping from the operating system at every step, and touching its pages for the first
time (a page fault and a zeroed page per 4 KiB) cost as long as the forward scan's arithmetic on this
machine. So the last buffers are kept, and the next step's forward writes into one of them when nothing
else holds it any more.

A buffer is reused only when this pool is its sole owner: while an autograd graph still holds it (a
backward not yet run, ``retain_graph=True``, a graph kept alive by the caller) the next forward gets a
new one. :func:`release_buffers` frees the kept buffers (e.g. after training, before inference in the
same process); ``INNERLOOP_KEEP_SCAN_BUFFERS=0`` (or ``false``, ``no``, ``off``) turns the keeping off.
"""

from __future__ import annotations

import os
import threading

import torch

from innerloop.core.environment import environment_flag

KEPT_BUFFERS = 2
"""How many buffers are kept at most (two: a step that runs two forwards before one backward, as
gradient accumulation over a summed loss does, still reuses both)."""

_kept: list[torch.Tensor] = []  # flat [numel] buffers, largest first
_lock = threading.Lock()


def _keeping() -> bool:
    """``INNERLOOP_KEEP_SCAN_BUFFERS``: on unless set to 0, false, no or off (another value raises,
    naming it)."""
    return environment_flag("INNERLOOP_KEEP_SCAN_BUFFERS", default=True)


def _new_lock_in_child() -> None:
    """A forked child starts with a free lock: one held by another thread of the parent at the fork
    would never be released there (its owner was not copied)."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def _only_ours(buffer: torch.Tensor) -> bool:
    """Whether nothing but the pool holds ``buffer``: no other tensor object, no view of it (a view holds
    its base) and no other reference to its storage (the temporary storage object below is one). Both
    counts are private torch functions: where one is missing, no buffer is ever reused."""
    tensor_uses = getattr(buffer, "_use_count", None)
    storage_uses = getattr(torch._C, "_storage_Use_Count", None)
    if tensor_uses is None or storage_uses is None:
        return False
    return tensor_uses() == 1 and storage_uses(buffer.untyped_storage()._cdata) <= 2


def scan_buffer(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat ``[numel]`` view of a buffer of ``like``'s dtype and device, uninitialised: of a kept buffer
    that nothing else holds, else of a new one (kept if it is among the :data:`KEPT_BUFFERS` largest)."""
    if like.device.type != "cpu" or not _keeping():
        return like.new_empty(numel)
    with _lock:
        for buffer in _kept:
            if buffer.dtype == like.dtype and buffer.numel() >= numel and _only_ours(buffer):
                return buffer[:numel]
        with torch.inference_mode(False):  # a buffer saved for backward must not be an inference tensor
            buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
        _kept.append(buffer)
        _kept.sort(key=torch.Tensor.numel, reverse=True)
        del _kept[KEPT_BUFFERS:]
        return buffer[:numel]


def release_buffers() -> None:
    """Free the kept buffers (those an autograd graph still holds are freed with it)."""
    with _lock:
        _kept.clear()


__all__ = ["KEPT_BUFFERS", "release_buffers", "scan_buffer"]
