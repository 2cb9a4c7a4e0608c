"""Review s56h: docs truth -- what the pages name exists and every code block is covered.

tests/test_docs.py runs the blocks (and now refuses a fence without a language and a command hidden in a
``text`` block); these tests hold the rest of what the pages name to the code: the config overrides the
prose writes (``trainer.accumulate_grad_batches=2``) and the commits benchmarks/RESULTS.md says its
tables ran at.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [
    REPO / "README.md",
    REPO / "CONTRIBUTING.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "innerloop").rglob("README.md")),
    REPO / "benchmarks" / "RESULTS.md",
    *sorted((REPO / "examples").rglob("README.md")),
]
#: ``section.key=value`` as a page writes an override (not inside a longer path or name).
OVERRIDE = re.compile(r"(?<![\w./<-])((?:model|data|optim|trainer)(?:\.[a-z_][a-z0-9_]*)+=[^\s`'\"|,;)]*)")
#: A line quoting an error the code prints: its unknown keys are the point (``model.hiden_size=3``).
QUOTED_ERROR = re.compile(r"error: |unknown config key")


def _overrides() -> list[tuple[str, str]]:
    """(page:line, override) for every override the pages write outside quoted error lines."""
    found = {}
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if QUOTED_ERROR.search(line):
                continue
            for override in OVERRIDE.findall(line):
                found.setdefault(override.rstrip(".:"), f"{page.relative_to(REPO).as_posix()}:{number}")
    return sorted((where, override) for override, where in found.items())


def _unknown_key_error(override: str) -> str | None:
    """The loader's "unknown config key" message for ``override`` (checked as ``load_config`` checks an
    override, without building a run), or None: any other error, a placeholder value say, is not this
    test's (the key exists)."""
    from innerloop.config import ConfigError
    from innerloop.config.load import _checked_override

    try:
        _checked_override(override)
    except ConfigError as error:
        return str(error) if "unknown config key" in str(error) else None
    return None


@pytest.mark.slow  # the first Lightning argument imports Lightning for the Trainer's signature: ~3 s
def test_every_override_the_pages_write_names_a_config_key() -> None:
    """A page that names a key the schema does not have (renamed, or never there) sends a reader to an
    error; the bash blocks' overrides were run, the prose's were not. Measured: 69 distinct overrides,
    every key a run-config key or a Lightning Trainer argument (``trainer.max_time.minutes``
    included)."""
    overrides = _overrides()
    assert len(overrides) > 50, f"the pattern found only {len(overrides)} overrides"
    unknown = [
        f"{where}: {override}: {message}"
        for where, override in overrides
        if (message := _unknown_key_error(override)) is not None
    ]
    assert not unknown, "\n".join(unknown)


def test_the_override_check_refuses_a_renamed_key() -> None:
    """The check can fail: a misspelt key is reported, a bad value of a real key is not."""
    assert OVERRIDE.findall("`model.ttt.innerloss=x` and `runs/model.x=1`") == ["model.ttt.innerloss=x"]
    assert "unknown config key" in _unknown_key_error("model.ttt.innerloss=x")
    assert _unknown_key_error("optim.lr=<lower>") is None


# -- benchmarks/RESULTS.md: the commits its tables ran at -----------------------------------------------

#: A short or full commit hash as RESULTS.md writes one: hex with a letter and a digit (not 2048).
COMMIT = re.compile(r"(?<![\w/.-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w-])")


def _git(*arguments: str, given: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *arguments], input=given, capture_output=True, text=True)


def test_every_commit_results_md_names_is_in_the_history() -> None:
    """Each table says the commit it ran at; a hash mistyped, or of a branch never merged, cannot be
    checked out to rerun it. Measured: every hash of RESULTS.md (26 distinct) is a commit here."""
    if _git("rev-parse", "--is-shallow-repository").stdout.strip() != "false":
        pytest.skip("not a full git checkout: old commits are not here to look up")
    text = (REPO / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    named = sorted(set(COMMIT.findall(text)))
    assert len(named) > 20, f"only {len(named)} commits found: the pattern no longer reads the page"
    answers = _git("cat-file", "--batch-check", given="".join(f"{c}^{{commit}}\n" for c in named)).stdout
    missing = [
        commit
        for commit, answer in zip(named, answers.splitlines(), strict=True)
        if answer.endswith("missing")
    ]
    assert not missing, f"benchmarks/RESULTS.md names commits that are not in the history: {missing}"


def test_every_results_table_section_gives_its_command_and_commit() -> None:
    """Each section of RESULTS.md with a table has a ```bash block (the command) and a commit."""
    text = (REPO / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    parts = re.split(r"^(#{2,3} .*)$", text, flags=re.M)
    lacking = [
        heading
        for heading, body in zip(parts[1::2], parts[2::2], strict=True)
        if re.search(r"^\|[-| ]+\|$", body, re.M)
        and not (re.search(r"^```bash$", body, re.M) and COMMIT.search(body))
    ]
    assert not lacking, f"sections with a table but no command block or commit: {lacking}"


@pytest.mark.slow  # loads the main job's config (imports the config layer: torch, models): ~3 s alone
def test_every_command_of_results_md_is_a_benchmark_or_a_training_whose_config_loads() -> None:
    """tests/benchmarks/test_review_s22_bench.py parses RESULTS.md's ``python benchmarks/...`` lines and
    passed over any other line: the main job's ``innerloop train trainer.progress_bar=false`` was
    checked by nothing. Each command is now one of the two, an ``innerloop train`` one loaded as
    tests/test_docs.py loads a command it does not run."""
    from test_docs import check_not_run, code_blocks, commands  # tests/ is on sys.path

    others = []
    for block in code_blocks(REPO / "benchmarks" / "RESULTS.md"):
        for written, argv in commands(block.text):
            if argv[:2] == ["innerloop", "train"]:
                check_not_run(argv)
            elif not (argv[:1] == ["python"] and argv[1].startswith("benchmarks/")):
                others.append(written)
    assert not others, f"RESULTS.md commands that no test checks: {others}"
