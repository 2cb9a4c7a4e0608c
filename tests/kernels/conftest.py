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

import os
import subprocess
import sys

import pytest

MARKER = "triton_interpreter"


def interpreter_is_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
