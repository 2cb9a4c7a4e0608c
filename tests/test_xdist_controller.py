"""The xdist controller runs no test and imports neither torch nor innerloop (tests/conftest.py): each
worker imports them anyway, and an import in the controller comes first, before any worker starts
(naming a warning class of innerloop in pyproject's ``filterwarnings`` made it import innerloop.train,
with torch and Lightning: ~10 s more a run)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # reason: a pytest run in a subprocess, with one worker (~5 s)
def test_the_controller_imports_no_torch_and_no_innerloop() -> None:
    command = [sys.executable, "-X", "importtime", "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider"]
    # a module that imports torch and innerloop (a controller that collected it would import them), and
    # not transformers or Lightning, which only the worker would pay for
    command += ["-n", "1", "tests/models/test_generate.py"]
    # a run of its own: not a worker of this run (tests/conftest.py reads PYTEST_XDIST_* to tell)
    environment = {
        k: v for k, v in os.environ.items() if k != "PYTHONPROFILEIMPORTTIME" and not k.startswith("PYTEST_")
    }
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # -X importtime reaches the controller only (xdist starts its workers without it)
    imported = set(re.findall(r"^import time:.*\|\s*([\w.]+)$", result.stderr, flags=re.MULTILINE))
    assert imported, "no import was reported: -X importtime did not reach the controller"
    assert not {name for name in imported if name.split(".")[0] in ("torch", "innerloop", "lightning")}
