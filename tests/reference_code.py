"""Where the tests find the reference implementation's own code: ``ttt.py`` of
test-time-training/ttt-lm-pytorch (not committed here; CI has no network).

One place for every test that runs it (tests/test_review_s53_s53h.py, tests/test_review_s51_s51d.py,
tests/benchmarks/test_review_s22_bench.py): the file named by ``INNERLOOP_TTT_LM_PYTORCH`` (a path to its
``ttt.py``; a path that does not exist is an error, not a skip), else commit ``cd831db`` of a fetched
mirror beside the checkout (``../.mirror/test-time-training+ttt-lm-pytorch/repo``). Without either, the
tests skip with :data:`MISSING`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT_VARIABLE = "INNERLOOP_TTT_LM_PYTORCH"
MIRROR = REPO.parent / ".mirror" / "test-time-training+ttt-lm-pytorch" / "repo"
REFERENCE_COMMIT = "cd831db"
MISSING = (
    f"the reference ttt-lm-pytorch code is not here (CI has no network): set {ENVIRONMENT_VARIABLE} to its "
    f"ttt.py, or fetch test-time-training/ttt-lm-pytorch into {MIRROR}"
)


def reference_source() -> str | None:
    """The reference's ``ttt.py`` text, or None where neither the variable nor the mirror gives it."""
    given = os.environ.get("INNERLOOP_TTT_LM_PYTORCH")  # ENVIRONMENT_VARIABLE, by name (s24_docs reads it)
    if given:
        return Path(given).read_text(encoding="utf-8")
    if not MIRROR.is_dir():
        return None
    shown = subprocess.run(
        ["git", "--git-dir", str(MIRROR), "show", f"{REFERENCE_COMMIT}:ttt.py"],
        capture_output=True,
        text=True,
    )
    return shown.stdout if shown.returncode == 0 else None


def reference_checkout(directory: Path) -> Path | None:
    """``directory``, holding the reference's ``ttt.py`` as a checkout would, or None without the code."""
    source = reference_source()
    if source is None:
        return None
    (directory / "ttt.py").write_text(source, encoding="utf-8")
    return directory
