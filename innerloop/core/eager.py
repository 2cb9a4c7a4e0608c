"""``run_eagerly``: keep a function out of ``torch.compile``'s graphs without importing dynamo early.

``torch.compiler.disable`` imports ``torch._dynamo`` when it is applied, which costs about 2 s: applied
at module level, it made ``import innerloop`` take twice as long as ``import torch``. The wrapper here
does what that decorator does, in two parts:

- the wrapper carries the attribute dynamo reads to refuse inlining a disabled function, so a compiled
  caller breaks its graph at the call, and the wrapper's own frame is marked for dynamo to skip
  (through the C module dynamo is built on, which loads with torch);
- the wrapper calls ``fn`` through ``torch.compiler.disable(fn)``, made at the first call once dynamo
  is loaded (before that nothing can be compiling), so ``fn``'s own frames run eagerly too.

On a torch without that C module's frame-skipping API, ``run_eagerly`` is ``torch.compiler.disable``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from types import CodeType
from typing import Any, TypeVar

import torch

Function = TypeVar("Function", bound=Callable[..., Any])


def _eager_wrapper(fn: Function, reason: str) -> Function:
    disabled: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if disabled is None:
            if "torch._dynamo" not in sys.modules:  # dynamo not loaded: nothing is compiling
                return fn(*args, **kwargs)
            disabled = torch.compiler.disable(fn, reason=reason)
        return disabled(*args, **kwargs)

    # What torch.compiler.disable's own wrapper carries: dynamo does not inline such a function.
    call._torchdynamo_disable = True  # type: ignore[attr-defined]
    call._torchdynamo_disable_msg = reason  # type: ignore[attr-defined]
    return call  # type: ignore[return-value]


def _skip_frames_of(code: CodeType) -> bool:
    """Tell dynamo never to trace frames of ``code`` (what ``torch._dynamo.skip`` does); False where
    this torch lacks the private API for it."""
    try:
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy
    except ImportError:
        return False
    set_code_exec_strategy(code, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.DEFAULT))
    return True


# Every wrapper shares one code object: marking it once covers them all.
DEFERS_DYNAMO_IMPORT = _skip_frames_of(_eager_wrapper(lambda: None, "").__code__)


def run_eagerly(reason: str) -> Callable[[Function], Function]:
    """Decorator: ``fn`` runs outside ``torch.compile`` graphs, as under ``torch.compiler.disable``
    (``reason`` is the graph break's message), without importing ``torch._dynamo`` at decoration."""

    def decorate(fn: Function) -> Function:
        if not DEFERS_DYNAMO_IMPORT:
            return torch.compiler.disable(fn, reason=reason)
        return _eager_wrapper(fn, reason)

    return decorate


__all__ = ["DEFERS_DYNAMO_IMPORT", "run_eagerly"]
