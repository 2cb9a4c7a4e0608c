"""Run the Triton kernels on CPU through Triton's interpreter, without leaking that mode elsewhere.

``TRITON_INTERPRET`` must be set before a Triton kernel is *defined* (Triton picks compiled vs
interpreted at decoration time), so it is set here, at the top, before Triton or the kernel modules are
imported; the kernel modules are then imported right away so their kernels are built interpreted.

If this file set the variable (it was not in the environment before), it is removed again once
collection ends and put back only around the tests of this directory, so that the kernels' ``verify``
keeps refusing CPU inputs in the rest of the suite (tests elsewhere see the environment they expect).
"""

import os

_SET_HERE = "TRITON_INTERPRET" not in os.environ
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402, F401

import innerloop.kernels.triton.ttt_linear._kernels  # noqa: E402, F401
import innerloop.kernels.triton.ttt_mlp._kernels  # noqa: E402, F401


def pytest_collection_finish(session):
    if _SET_HERE and os.environ.get("TRITON_INTERPRET") == "1":
        del os.environ["TRITON_INTERPRET"]


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    """Each test here runs with ``TRITON_INTERPRET=1`` (the kernels' ``verify`` reads it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
