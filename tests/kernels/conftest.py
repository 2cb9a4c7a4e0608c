"""Run the Triton tests on CPU through Triton's interpreter, in a process of their own.

Triton fixes compiled vs interpreted when a kernel is *defined*, from ``TRITON_INTERPRET`` in the
environment, and the kernels' ``verify`` reads the same variable. Setting it inside the test process
would put every other test in interpreter mode (and a CUDA machine's tests could no longer use the
compiled kernels), so it is never set here. Instead, the tests marked ``triton_interpreter`` are taken
out of this process and run by one child ``python -m pytest`` per directory (one start-up of torch and
Triton for all of them), with ``TRITON_INTERPRET=1`` set from the child's start; the child runs exactly
the marked tests this session selected (after ``-m``/``-k``), and a failing child fails the item named
``<directory>::[triton interpreter]`` with the child's report, which names each failing test. Where ``TRITON_INTERPRET=1`` is already set (the child, or a user who asks for it:
``TRITON_INTERPRET=1 python -m pytest tests/kernels/test_triton_kernels.py::test_x``), the marked tests
run in place.
"""

from __future__ import annotations

import functools
import inspect
import os
import subprocess
import sys

import pytest

MARKER = "triton_interpreter"


def interpreter_is_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pytest_configure(config) -> None:
    if interpreter_is_on():
        patch_the_language_once_per_launch()


def patch_the_language_once_per_launch() -> bool:
    """Make Triton's interpreter patch ``triton.language`` once per kernel launch, not again at every call
    of a ``@triton.jit`` helper inside it; True where installed (False: an interpreter without the
    internals this wraps, which then runs as it is).

    The interpreter (triton 3.9) swaps the language's builtins for interpreted ones when a launch starts
    (``GridExecutor.__call__``: ``_patch_lang``, restored when it ends), and again at every device-function
    call (``InterpretedFunction.__call__``), though they are swapped already: some 800 calls in one TTT-MLP
    forward and backward at 2 batch rows, 2 heads and 3 mini-batches, each walking the language's modules
    with ``inspect.getmembers``: skipping them took a forward, backward and decode of both kernels from 4.9 s
    to 1.7 s of CPU, and this child from 146 s to 106 s. The repeat changes nothing
    (a builtin swapped already is no longer a builtin, so it is not swapped again; the rest sets the same
    interpreted functions), so it is skipped for a helper whose language modules (``tl``, ``tl.core``) this
    launch patched already; a helper that sees another one (``tl.standard``'s see ``tl.core``) patches it
    once, as before, and one that sees none goes to the interpreter, which refuses it as before. Outputs
    and gradients of both kernels were bitwise the same with and without it."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    names = ("_patch_lang", "_LangPatchScope", "GridExecutor", "tl")
    if not all(hasattr(interpreter, name) for name in names):
        return False
    patch, scope, executor = interpreter._patch_lang, interpreter._LangPatchScope, interpreter.GridExecutor
    if getattr(executor.__call__, "patches_once", False):
        return True
    languages = (interpreter.tl, interpreter.tl.core)
    launches: list[set[int] | None] = []  # per running launch: the language modules it patched

    @functools.cache
    def languages_of(fn) -> frozenset[int]:
        modules = (v for v in fn.__globals__.values() if inspect.ismodule(v))
        return frozenset(id(m) for m in modules if any(m is language for language in languages))

    def patch_once(fn):
        seen = languages_of(fn)
        if launches and launches[-1] is None:  # the launch's own patch
            launches[-1] = set(seen)
        elif launches and seen and seen <= launches[-1]:
            return scope()  # swapped already, until the launch restores them
        elif launches:
            launches[-1] |= seen
        return patch(fn)

    launch = executor.__call__

    def launch_patching_once(self, *args, **kwargs):
        launches.append(None)
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    launch_patching_once.patches_once = True
    interpreter._patch_lang = patch_once
    executor.__call__ = launch_patching_once
    return True


class InterpreterRun(pytest.Item):
    """The marked tests of one directory, run by a child pytest under ``TRITON_INTERPRET=1``."""

    def __init__(self, *, nodeids: list[str], **kwargs):
        super().__init__(**kwargs)
        self.nodeids = nodeids
        self.add_marker("slow")  # its tests are; the suite runs its slow tests first (tests/conftest.py)

    def runtest(self) -> None:
        # -n 0: one process (the parent suite's workers already use the cores)
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            "0",
            "-p",
            "no:cacheprovider",
            "-rfEs",
            *self.nodeids,
        ]
        result = subprocess.run(
            command,
            cwd=self.config.rootpath,
            env={**os.environ, "TRITON_INTERPRET": "1"},
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.fail(
                f"{len(self.nodeids)} test(s) run under TRITON_INTERPRET=1 in a child process "
                f"(exit code {result.returncode}):\n{result.stdout}{result.stderr}",
                pytrace=False,
            )

    def reportinfo(self):
        return self.path, None, f"{self.name}: {len(self.nodeids)} test(s) under TRITON_INTERPRET=1"


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected: the child runs what is left
def pytest_collection_modifyitems(config, items):
    if interpreter_is_on():
        return
    by_directory: dict = {}
    for item in items:
        if item.get_closest_marker(MARKER) is not None:
            by_directory.setdefault(item.getparent(pytest.Module).parent, []).append(item)
    if not by_directory:
        return
    replaced = {item for group in by_directory.values() for item in group}
    runs = {
        directory: InterpreterRun.from_parent(
            directory, name="[triton interpreter]", nodeids=[item.nodeid for item in group]
        )
        for directory, group in by_directory.items()
    }
    kept = []
    for item in items:
        if item in replaced:
            directory = item.getparent(pytest.Module).parent
            if directory in runs:  # the directory's one child run, where its first marked test was
                kept.append(runs.pop(directory))
        else:
            kept.append(item)
    items[:] = kept
