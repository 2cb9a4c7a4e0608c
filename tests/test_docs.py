"""Every code block of the newcomer docs (README.md, CONTRIBUTING.md, docs/*.md) runs as written.

Blocks are found by parsing the markdown's fences, so a new block is covered without touching this
file:

- ```python: run in a process of its own (a block's plugin registrations stay out of other tests),
  forked from one interpreter that imported torch and innerloop once (tests/block_server.py, the
  ``block_server`` fixture), from the repository root; any ``test_*`` function it defines is called too.
- ```bash: every command, in order, in one temporary folder per document (so ``innerloop eval
  runs/tiny/...`` reads what the ``innerloop train`` above it wrote):
  - ``innerloop ...`` runs (in-process, through ``innerloop.cli.main`` as the console script does); ``innerloop train`` gets
    :data:`SHORTEN_TRAINING` appended so that a doc's minute-long run takes seconds (the rest of its
    config, preset and overrides, is used as written), except the runs in :data:`NOT_RUN_HERE` (GPUs,
    several devices), whose config is loaded and validated instead.
  - ``pip install`` is checked, not run: each requirement parses, each extra exists in
    pyproject.toml, and a pinned version satisfies the project's own requirement.
  - ``python -m pytest`` is checked, not run (it is this suite): its paths exist, a hypothesis
    profile it names is registered.
  - ``ruff check`` runs; ``ruff format`` runs with ``--check`` (a test never rewrites files).
  - ``python benchmarks/<script>.py`` with ``--quick`` runs; without it (minutes to an hour) it is
    parsed by the script's own argument parser, not run.
  - ``innerloop -p ./my_loss.py ...`` (and ``INNERLOOP_PLUGIN_MODULES=my_loss``) runs in a process of
    its own (a plugin module stays out of this one's registry), forked from the block server as a
    python block is, with the ``MyLoss`` of CONTRIBUTING.md's python block, registered, as the
    ``my_loss.py`` beside it.
  - any other command fails the test: decide how it is covered here.
- ```toml: parses.
- ```text: not a program (a diagram, a formula, a program's output or error lines); no line of it may
  be a command (:data:`COMMAND_LINE`), so a command cannot hide there unrun. A fence with no language
  fails: it was silently run by nothing.

Pages outside :data:`DOCUMENTS` with code blocks are in :data:`COVERED_ELSEWHERE`, with the test that
covers them.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from block_server import REPO, RUN_BLOCK, BlockServer
from block_server import environment as _environment

SHARED = REPO.parent / "shared"
DOCUMENTS = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

#: Appended to every ``innerloop train`` a doc shows (not to ``--resume``, which continues the run in
#: the config it finds): 2 steps of 2 windows, one validation batch, no progress bar.
SHORTEN_TRAINING = [
    "trainer.max_steps=2",
    "trainer.val_every=2",
    "trainer.checkpoint_every=2",
    "data.batch_size=2",
    "data.val_batches=1",
    "trainer.progress_bar=false",
]
#: Commands (as written, without their comment) that cannot run on a CI machine, with the reason.
#: Their config is loaded and validated (preset, keys, types), without the hardware overrides.
NOT_RUN_HERE = {
    "innerloop train --config e2e-125m": "the paper's 125M shape, for a GPU",
    "innerloop train --config ttt-linear-125m trainer.devices=8 trainer.strategy=ddp": "8 GPUs",
    "innerloop train --config ttt-linear-1.3b trainer.devices=8 trainer.strategy=fsdp": "8 GPUs (FSDP)",
    "innerloop train trainer.devices=2 trainer.strategy=ddp_spawn out_dir=runs/tiny-ddp": (
        "two processes for ~30 s; tests/train/test_train.py::test_two_process_ddp_on_cpu_trains runs DDP on CPU"
    ),
}
HARDWARE_KEYS = ("trainer.devices=", "trainer.strategy=", "trainer.accelerator=")
SCIENCE_RUNS = " ".join(
    f"runs/science/runs/{name}"
    for name in (
        "linear",
        "mlp",
        "swa-64",
        "linear-mamba-backbone",
        "mlp-mamba-backbone",
        "swa-64-mamba-backbone",
        "full-attention",
        "full-attention-mamba-backbone",
        "ttt-e2e-window-64",
    )
)
#: Other commands that are not run, with the reason and the test that covers what they do; an
#: ``innerloop`` one is parsed by the CLI's argument parser.
NOT_RUN_HERE |= {
    f"innerloop compare {SCIENCE_RUNS} --baseline swa-64 --seq-len 512 1024 --out runs/science/compare": (
        "reads the nine runs of science.py's sweep and comparison (about an hour of training); "
        "tests/benchmarks/test_science.py runs a quick study"
    ),
    "innerloop convert ttt-e2e CHECKPOINT CONFIG OUT --tokenizer TOKENIZER": (
        "a usage line (placeholders for the official checkpoint); "
        "tests/interop/test_ttt_e2e.py::test_cli_converts_to_an_innerloop_checkpoint converts a tiny one"
    ),
    "python benchmarks/science.py sweep --quick --out /tmp/science-quick": (
        "every point of the sweep, a training process each (over 10 minutes on 2 busy cores); "
        "tests/benchmarks/test_science.py::test_a_quick_study_trains_each_point_once_and_reads_it_back runs one"
    ),
    "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args "
    "pretrained=exported/tiny,trust_remote_code=True --tasks lambada_openai --device cpu --batch_size 1": (
        "lm-eval-harness and the LAMBADA download; tests/hf/test_lm_eval.py runs lm_eval on an export"
    ),
}
#: Languages a fence may carry (a fence with none is run by nothing: a defect).
LANGUAGES = ("bash", "python", "toml", "text")
#: A line of a ```text block that is a command (not ``innerloop train: error: ...``, the output, nor
#: the layer list's ``innerloop   the package's __init__``).
COMMAND_LINE = re.compile(
    r"^\s*(?:[A-Z_]+=\S+\s+)*(?:innerloop\s+(?:-p\s|(?:train|eval|generate|compare|convert|export|"
    r"plugins|tokenizer|params)\b(?!:))|python\s+(?:-m\s|\S+\.py\b)|pip\s+install|lm_eval\s|ruff\s)",
    re.M,
)
#: Pages, other than :data:`DOCUMENTS`, with code blocks, and what covers those blocks.
COVERED_ELSEWHERE = {
    "benchmarks/RESULTS.md": "tests/benchmarks/test_review_s22_bench.py parses every command (minutes each)",
    "examples/innerloop-huber/README.md": (
        "tests/train/test_examples.py installs the package in a temporary folder, runs its tests, trains its config"
    ),
    "innerloop/kernels/triton/ttt_linear/README.md": (
        "a Public API block of signatures, not a program: tests/test_review_s52_s52j.py holds them to the module's"
    ),
    "innerloop/kernels/triton/ttt_mlp/README.md": (
        "a Public API block of signatures, not a program: tests/test_review_s52_s52j.py holds them to the module's"
    ),
    "tests/data/e2e_meta_gradient/README.md": "the command that made the folder's files (JAX and the official code)",
}


@dataclass(frozen=True)
class Block:
    document: Path
    line: int
    language: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.document.relative_to(REPO)}:{self.line}"


def code_blocks(document: Path) -> list[Block]:
    text = document.read_text()
    return [
        Block(document, text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2))
        for match in FENCE.finditer(text)
    ]


def blocks_of(language: str) -> list[Block]:
    return [block for document in DOCUMENTS for block in code_blocks(document) if block.language == language]


def test_the_markdown_parser_finds_the_blocks() -> None:
    readme = code_blocks(REPO / "README.md")
    assert [b.language for b in readme][:2] == ["bash", "python"]
    assert "innerloop.TTTLayer(hidden_size=768" in readme[1].text


def _markdown_pages() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    return [REPO / name for name in listed.stdout.split()]


def test_every_block_says_its_language_and_every_page_with_blocks_is_covered() -> None:
    """A fence with no language (or ``py``, ``sh``) was run by nothing: CONTRIBUTING.md's ``innerloop -p
    ./my_loss.py`` block and docs/science.md's commands were untagged. A page outside DOCUMENTS with
    blocks (a new README) names what covers them in COVERED_ELSEWHERE."""
    untagged = [
        f"{block.id}: {block.language!r}"
        for page in _markdown_pages()
        for block in code_blocks(page)
        if block.language not in LANGUAGES
    ]
    assert not untagged, f"blocks whose language is not one of {LANGUAGES}: {untagged}"
    pages = {page.relative_to(REPO).as_posix() for page in _markdown_pages() if code_blocks(page)}
    documents = {document.relative_to(REPO).as_posix() for document in DOCUMENTS}
    assert pages - documents == set(COVERED_ELSEWHERE), (
        "say what covers the blocks of a page in COVERED_ELSEWHERE"
    )


def test_no_text_block_holds_a_command() -> None:
    hidden = [
        f"{block.id}: {match.group(0)!r}"
        for document in DOCUMENTS
        for block in code_blocks(document)
        if block.language == "text"
        for match in COMMAND_LINE.finditer(block.text)
    ]
    assert not hidden, f"commands in ```text blocks (run by nothing; make them ```bash): {hidden}"
    from innerloop.cli import _HANDLERS

    assert all(COMMAND_LINE.search(f"innerloop {command} x") for command in _HANDLERS), sorted(_HANDLERS)
    assert COMMAND_LINE.search("HF_HUB_OFFLINE=1 lm_eval --model hf") and COMMAND_LINE.search("python a.py")
    assert not COMMAND_LINE.search("innerloop train: error: unknown config key")
    assert not COMMAND_LINE.search("innerloop   the package's __init__")


# --------------------------------------------------------------------------------------------- python


@pytest.mark.slow  # each block runs in a process of its own (forked from a warm one): ~1-6 s each
@pytest.mark.parametrize("block", blocks_of("python"), ids=lambda b: b.id)
def test_python_block_runs(block: Block, tmp_path, block_server) -> None:
    if "../shared" in block.text and not SHARED.is_dir():
        pytest.skip(f"the block reads ../shared, which is not at {SHARED}")
    script = tmp_path / "block.py"
    script.write_text(block.text)
    if block_server.forks:
        status, output = block_server.run(script, tmp_path / "block.log")
    else:
        result = subprocess.run(
            [sys.executable, "-c", RUN_BLOCK, str(script)],
            cwd=REPO,
            env=_environment(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        status, output = result.returncode, result.stdout + result.stderr
    assert status == 0, f"{block.id} failed:\n{block.text}\n{output[-3000:]}"


@pytest.mark.slow  # starts the warm interpreter (~6 s), which the python blocks share
def test_a_block_that_fails_or_forgets_an_import_fails_in_the_server(tmp_path, block_server) -> None:
    # the warm interpreter has torch imported; a block that uses it without importing it still fails
    cases = {
        "forgot.py": "torch.zeros(1)\n",
        "raises.py": "raise ValueError('bad block')\n",
        "ok.py": "x = 1\n",
    }
    statuses = {}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        statuses[name] = block_server.run(tmp_path / name, tmp_path / f"{name}.log")
    if not block_server.forks:
        pytest.skip(
            "this machine's server did not fork (not a single thread, or no os.fork): blocks get fresh interpreters"
        )
    assert (
        statuses["forgot.py"][0] == 1 and "NameError: name 'torch' is not defined" in statuses["forgot.py"][1]
    )
    assert statuses["raises.py"][0] == 1 and "ValueError: bad block" in statuses["raises.py"][1]
    assert statuses["ok.py"] == (0, "")


@pytest.mark.slow  # starts the warm interpreter (~9-13 s here) where no earlier test of the run has
def test_a_job_left_running_is_killed_with_its_group_before_the_next_starts(tmp_path, block_server) -> None:
    # a stop test that failed with its launch still alive left the server waiting on that job (up to its
    # 900-s limit): the next test's job waited behind it. The job and what it started (its process group,
    # as ddp_spawn's ranks) are killed at the next start, which then runs at once
    if not block_server.forks:
        pytest.skip("this machine's server does not fork: every job is a fresh interpreter")
    (tmp_path / "hangs.py").write_text(
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen(['sleep', '600'])\nopen({str(tmp_path / 'child')!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    (tmp_path / "ok.py").write_text("x = 1\n")
    left = block_server.start(tmp_path / "hangs.py", tmp_path / "hangs.log")
    deadline = time.monotonic() + 60
    while not (tmp_path / "child").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    child = int((tmp_path / "child").read_text())
    started = time.monotonic()
    assert block_server.run(tmp_path / "ok.py", tmp_path / "ok.log") == (0, "")
    assert time.monotonic() - started < 60
    assert left.status == -signal.SIGKILL
    deadline = time.monotonic() + 10  # the job's child, killed with its group (a zombie until init reaps it)
    while _running(child):
        assert time.monotonic() < deadline, "the job's child still runs"
        time.sleep(0.02)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


# ----------------------------------------------------------------------------------------------- bash


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(command as written without its comment, argv) for each command of a bash block."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while argv:
            end = argv.index("&&") if "&&" in argv else len(argv)
            found.append((shlex.join(argv[:end]), argv[:end]))
            argv = argv[end + 1 :]
    return found


def _split_environment(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    environment = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        key, _, value = argv[0].partition("=")
        environment[key] = value
        argv = argv[1:]
    return environment, argv


def _tomllib():
    return pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def check_pip_install(argv: list[str]) -> None:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = _tomllib().loads((REPO / "pyproject.toml").read_text())["project"]
    required = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    extras = set(project["optional-dependencies"])
    arguments = [a for a in argv[2:] if a != "-e"]
    assert arguments, f"pip install of nothing: {argv}"
    for argument in arguments:
        if argument.startswith((".", "/")):  # this project, with extras
            path, _, bracket = argument.partition("[")
            assert (REPO / path / "pyproject.toml").is_file(), argument
            asked = {e.strip() for e in bracket.rstrip("]").split(",") if e.strip()}
            assert asked <= extras, f"{argument}: extras {sorted(asked - extras)} not in {sorted(extras)}"
            continue
        requirement = Requirement(argument)
        pinned = [s.version for s in requirement.specifier if s.operator == "=="]
        for version in pinned:
            assert version in required.get(requirement.name, SpecifierSet()), (
                f"{argument} does not satisfy the project's {requirement.name}{required[requirement.name]}"
            )


# pytest options whose value is the next argument (not a path)
PYTEST_OPTIONS_WITH_VALUE = frozenset("-m -k -p -n -o -c -W --durations --maxfail --rootdir".split())


def check_pytest(environment: dict[str, str], argv: list[str]) -> None:
    arguments = iter(argv[3:])
    for argument in arguments:
        if argument == "-m":  # a marker expression: every marker in it is registered
            expression = next(arguments)
            block = re.search(r"^markers = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(), re.M | re.S)
            markers = set(re.findall(r'^\s*"(\w+):', block.group(1), re.M))  # tomllib needs Python 3.11
            used = set(re.findall(r"\w+", expression)) - {"and", "or", "not"}
            assert used <= markers, f"-m {expression!r}: markers {sorted(used - markers)} are not registered"
        elif argument in PYTEST_OPTIONS_WITH_VALUE:
            next(arguments)
        elif not argument.startswith("-"):
            assert (REPO / argument.split("::")[0]).exists(), f"pytest path {argument} does not exist"
    if "HYPOTHESIS_PROFILE" in environment:
        from hypothesis import settings

        settings.get_profile(environment["HYPOTHESIS_PROFILE"])  # raises for an unregistered profile


def run(argv: list[str], cwd: Path, environment: dict[str, str] | None = None) -> None:
    result = subprocess.run(
        argv,
        cwd=cwd,
        env={**_environment(), **(environment or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"{shlex.join(argv)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def check_not_run(argv: list[str]) -> None:
    """A command of :data:`NOT_RUN_HERE`: a training's config loads and validates (without the hardware
    overrides); another ``innerloop`` command's arguments, or a benchmark's, parse."""
    if argv[:2] == ["innerloop", "train"]:
        from innerloop.config import load_config

        rest = argv[2:]
        preset = rest[rest.index("--config") + 1] if "--config" in rest else "tiny"
        overrides = [a for a in rest if "=" in a and not a.startswith(HARDWARE_KEYS)]
        load_config(preset, overrides)
    elif argv[:1] == ["innerloop"]:
        from innerloop.cli import _parse_intermixed, _parser

        parser = _parser()
        _parse_intermixed(parser, argv[1:])
    elif argv[:1] == ["python"] and argv[1].startswith("benchmarks/"):
        from benchmark_testing import parse_benchmark_args  # tests/ is on sys.path

        parse_benchmark_args(Path(argv[1]).stem, argv[2:])


#: The ``my_loss.py`` that the ``innerloop -p ./my_loss.py`` blocks load: CONTRIBUTING.md's ``MyLoss``.
def my_loss_module() -> str:
    contributing = next(b for b in code_blocks(REPO / "CONTRIBUTING.md") if "class MyLoss(" in b.text)
    return f"{contributing.text}\n\nimport innerloop\n\ninnerloop.register_inner_loss(MyLoss())\n"


def _command(arguments: list[str]) -> str | None:
    """The command of ``innerloop``'s arguments: the first word that is not ``-p MODULE``."""
    words = iter(arguments)
    for word in words:
        if word == "-p":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _loads_a_plugin_module(argv: list[str], environment: dict[str, str]) -> bool:
    return "-p" in argv or "INNERLOOP_PLUGIN_MODULES" in environment


def run_in_a_process_of_its_own(
    arguments: list[str], cwd: Path, environment: dict[str, str], server: BlockServer | None
) -> None:
    """``innerloop ARGUMENTS`` in a process of its own: a child of the warm ``server`` (forked, with
    ``cwd`` and ``environment``, as a python block is: torch, innerloop and Lightning imported once, not
    per command), or ``python -m innerloop`` where there is none or it does not fork."""
    if server is None or not server.forks:
        run([sys.executable, "-m", "innerloop", *arguments], cwd, environment)
        return
    scratch = Path(tempfile.mkdtemp(prefix="command-", dir=cwd.parent))
    script = scratch / "command.py"
    script.write_text(f"import sys\nfrom innerloop.cli import main\n\nsys.exit(main({arguments!r}))\n")
    status, output = server.run(script, scratch / "command.log", cwd, environment)
    assert status == 0, f"innerloop {shlex.join(arguments)} failed:\n{output[-5000:]}"
    assert "Traceback" not in output, output[-3000:]


def run_innerloop(
    written: str,
    argv: list[str],
    cwd: Path,
    environment: dict[str, str],
    server: Callable[[], BlockServer] | None = None,
) -> None:
    """Run an ``innerloop`` command in-process (``innerloop.cli.main``, as the console script does), or
    in a process of its own where it loads a plugin module (which would stay in this one's registry):
    forked from ``server()`` where one is given."""
    from innerloop.cli import main

    arguments = argv[1:]
    if _command(arguments) == "train" and "--resume" not in arguments:
        arguments = [*arguments, *SHORTEN_TRAINING]
    if _loads_a_plugin_module(argv, environment):
        run_in_a_process_of_its_own(arguments, cwd, environment, server() if server else None)
        return
    assert not environment, f"{written}: an innerloop command run in-process cannot set {sorted(environment)}"
    before = Path.cwd()
    os.chdir(cwd)
    try:
        assert main(arguments) == 0, f"{written} failed"
    finally:
        os.chdir(before)


def run_bash_block(block: Block, cwd: Path, server: Callable[[], BlockServer] | None = None) -> None:
    for written, argv in commands(block.text):
        environment, argv = _split_environment(argv)
        if written in NOT_RUN_HERE:
            check_not_run(argv)
        elif argv[:2] == ["pip", "install"]:
            check_pip_install(argv)
        elif argv[:3] == ["python", "-m", "pytest"]:
            check_pytest(environment, argv)
        elif argv[:2] == ["ruff", "check"]:
            run(argv, REPO, environment)
        elif argv[:2] == ["ruff", "format"]:
            run([*argv[:2], "--check", *argv[2:]], REPO, environment)
        elif argv[0] == "innerloop":
            run_innerloop(written, argv, cwd, environment, server)
        elif argv[:2] == ["python", argv[1]] and argv[1].startswith("benchmarks/") and "--quick" in argv:
            run(argv, REPO, environment)  # a benchmark at its tiny CI sizes, with the block's environment
        elif argv[:2] == ["python", argv[1]] and argv[1].startswith("benchmarks/"):
            from benchmark_testing import parse_benchmark_args  # tests/ is on sys.path

            parse_benchmark_args(Path(argv[1]).stem, argv[2:])  # minutes to an hour: parsed, not run
        else:
            pytest.fail(f"{block.id}: tests/test_docs.py does not know how to check {written!r}")


def test_bash_commands_are_parsed_as_a_shell_would() -> None:
    block = 'A=1 pip install -e ".[test]" && innerloop train  # comment\ninnerloop eval x \\\n  --batches 1\n'
    assert [argv for _, argv in commands(block)] == [
        ["A=1", "pip", "install", "-e", ".[test]"],
        ["innerloop", "train"],
        ["innerloop", "eval", "x", "--batches", "1"],
    ]
    with pytest.raises(AssertionError, match="extras"):
        check_pip_install(["pip", "install", "-e", ".[tests]"])
    with pytest.raises(AssertionError, match="does not satisfy"):
        check_pip_install(["pip", "install", "torch==2.0.0"])


def test_not_run_commands_are_still_in_the_docs() -> None:
    written = {c for block in blocks_of("bash") for c, _ in commands(block.text)}
    assert set(NOT_RUN_HERE) <= written, sorted(set(NOT_RUN_HERE) - written)


@pytest.mark.slow  # runs each document's innerloop commands in order (shortened): 10-90 s per document
@pytest.mark.parametrize(
    "document",
    [d for d in DOCUMENTS if any(b.language == "bash" for b in code_blocks(d))],
    ids=lambda d: str(d.relative_to(REPO)),
)
def test_bash_blocks_run(document: Path, tmp_path, request) -> None:
    work = tmp_path / "work"  # the document's folder; tmp_path also holds the forked commands' scripts
    work.mkdir()
    (work / "docs").symlink_to(REPO / "docs")  # commands read docs/*.md as a corpus
    (work / "my_loss.py").write_text(my_loss_module())  # what `innerloop -p ./my_loss.py` loads
    server = lambda: request.getfixturevalue("block_server")  # noqa: E731 (started at a plugin command)
    for block in code_blocks(document):
        if block.language == "bash":
            run_bash_block(block, work, server)


@pytest.mark.parametrize("block", blocks_of("toml"), ids=lambda b: b.id)
def test_toml_block_parses(block: Block) -> None:
    assert _tomllib().loads(block.text)
