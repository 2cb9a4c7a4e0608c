"""A Ctrl-C while the ``innerloop`` command is still importing ``innerloop.cli`` (before
``innerloop.cli.main`` handles it) ends the command in one line with status 130, as main() does, through
both entry points: the console script and ``python -m innerloop`` (review s11, resume L3).

The Ctrl-C is made by an import hook (a ``sitecustomize`` on PYTHONPATH) that raises
``KeyboardInterrupt`` when the module named by ``INTERRUPT_AT_IMPORT`` is imported, as Python raises it
wherever the program is when the signal arrives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

HOOK = """\
import os, sys

class _InterruptAtImport:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ.get("INTERRUPT_AT_IMPORT"):
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, _InterruptAtImport())
"""

CONSOLE_SCRIPT = (
    "import sys; from importlib.metadata import entry_points; "
    "(script,) = entry_points(group='console_scripts', name='innerloop'); sys.exit(script.load()())"
)
"""What the installed ``innerloop`` script does, with the entry point the installed package names."""

ENTRY_POINTS = {
    "console script": [sys.executable, "-c", CONSOLE_SCRIPT],
    "python -m innerloop": [sys.executable, "-m", "innerloop"],
}


@pytest.mark.slow  # reason: a fresh interpreter imports torch (about 2 s)
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_a_ctrl_c_while_the_cli_is_imported_ends_in_one_line_with_status_130(entry, tmp_path) -> None:
    (tmp_path / "sitecustomize.py").write_text(HOOK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    env["INTERRUPT_AT_IMPORT"] = "innerloop.cli"
    done = subprocess.run(
        [*ENTRY_POINTS[entry], "train", "trainer.max_steps=1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == ["innerloop train: interrupted (Ctrl-C)"], done.stderr
    assert not (tmp_path / "runs").exists()  # no run started
