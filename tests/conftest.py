"""Shared test setup: hypothesis profiles and paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CONFORMANCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "conformance"


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    if not CONFORMANCE_DIR.is_dir():
        pytest.skip(
            f"conformance vectors not found at {CONFORMANCE_DIR} (they live in ../shared beside the repo)"
        )
    return CONFORMANCE_DIR


@pytest.fixture(scope="session")
def cpu_kernels() -> None:
    """The compiled CPU kernels, built once. A machine without a C++ compiler skips the tests that need
    them; CI sets INNERLOOP_REQUIRE_CPU_KERNELS=1 so that a broken build fails instead of skipping."""
    from innerloop.kernels.cpu import build

    try:
        build.load_library()
    except build.CPUKernelUnavailable as error:
        if os.environ.get("INNERLOOP_REQUIRE_CPU_KERNELS"):
            raise
        pytest.skip(f"the CPU kernels cannot be built here: {error}")
