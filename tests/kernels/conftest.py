"""Run the Triton tests on CPU through Triton's interpreter, in a process of their own.

Triton fixes compiled vs interpreted when a kernel is *defined*, from ``TRITON_INTERPRET`` in the
environment, and the kernels' ``verify`` reads the same variable. Setting it inside the test process
would put every other test in interpreter mode (and a CUDA machine's tests could no longer use the
compiled kernels), so it is never set here. Instead, the tests marked ``triton_interpreter`` are taken
out of this process and run by one child ``python -m pytest`` per directory (one start-up of torch and
Triton for all of them), with ``TRITON_INTERPRET=1`` set from the child's start; the child runs exactly
the marked tests this session selected (after ``-m``/``-k``), and a failing child fails the item named
``<directory>::[triton interpreter]`` with the child's report, which names each failing test. The
child starts when the session is collected and runs beside the other tests. Where ``TRITON_INTERPRET=1`` is already set (the child, or a user who asks for it:
``TRITON_INTERPRET=1 python -m pytest tests/kernels/test_triton_kernels.py::test_x``), the marked tests
run in place.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

MARKER = "triton_interpreter"


def interpreter_is_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class InterpreterRun(pytest.Item):
    """The marked tests of one directory, run by a child pytest under ``TRITON_INTERPRET=1``.

    The child is started when the session is collected (:meth:`start`), so its minute of interpreted
    kernels overlaps the other tests; the item waits for it and reports its result."""

    def __init__(self, *, nodeids: list[str], **kwargs):
        super().__init__(**kwargs)
        self.nodeids = nodeids
        self.process: subprocess.Popen | None = None
        self.output = None

    def start(self) -> None:
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *self.nodeids]
        self.output = tempfile.TemporaryFile(mode="w+")  # not a pipe: a full pipe would stall the child
        self.process = subprocess.Popen(
            command,
            cwd=self.config.rootpath,
            # One thread: the interpreter is Python-bound, and the parent's tests keep the other core.
            env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
            stdout=self.output,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def runtest(self) -> None:
        if self.process is None:
            self.start()
        returncode = self.process.wait()
        self.output.seek(0)
        if returncode != 0:
            pytest.fail(
                f"{len(self.nodeids)} test(s) run under TRITON_INTERPRET=1 in a child process "
                f"(exit code {returncode}):\n{self.output.read()}",
                pytrace=False,
            )

    def reportinfo(self):
        return self.path, None, f"{self.name}: {len(self.nodeids)} test(s) under TRITON_INTERPRET=1"


_STARTED: list[InterpreterRun] = []


def pytest_sessionfinish(session, exitstatus):
    """A session stopped early (``-x``, Ctrl-C) leaves no child running."""
    for run in _STARTED:
        run.stop()


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
    if not config.getoption("collectonly"):
        for run in runs.values():
            run.start()
            _STARTED.append(run)
    kept = []
    for item in items:
        if item in replaced:
            directory = item.getparent(pytest.Module).parent
            if directory in runs:  # the directory's one child run, where its first marked test was
                kept.append(runs.pop(directory))
        else:
            kept.append(item)
    items[:] = kept
