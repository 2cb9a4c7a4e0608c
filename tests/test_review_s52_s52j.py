"""Review s52j: what the docs say the code does, checked against the code.

tests/test_docs.py runs the code blocks of README.md, CONTRIBUTING.md and docs/*.md; these tests check
what no block runs: the tables of config keys and their defaults (docs/training.md "The keys",
docs/family.md's ``model.family`` table, docs/e2e.md's ``model.e2e`` table), the error lines
docs/training.md quotes, and the "Public API" blocks of the Triton kernel READMEs (signatures, not
runnable Python).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _section(page: str, start: str, end: str) -> str:
    text = (REPO / page).read_text(encoding="utf-8")
    return text[text.index(start) : text.index(end, text.index(start))]


def _table_rows(text: str) -> list[tuple[str, str]]:
    """(first cell's code span, second cell) of each row of the tables in ``text``."""
    return [
        (key, default.strip()) for key, default in re.findall(r"^\| `([\w.]+)` \| ([^|]+?) \|", text, re.M)
    ]


def _documented_value(cell: str) -> object:
    """A table's default cell as the value it names: `name` a string, null None, true/false, numbers."""
    cell = cell.strip()
    if cell.startswith("`") and cell.endswith("`"):
        inner = cell.strip("`")
        return [] if inner == "[]" else {} if inner == "{}" else inner
    words = {"null": None, "true": True, "false": False}
    return words[cell] if cell in words else _number(cell)


def _number(cell: str) -> float | int:
    return int(cell) if re.fullmatch(r"-?\d+", cell) else float(cell)


def _value(obj: object, dotted: str) -> object:
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def _leaf_keys(obj: object, prefix: str = "") -> set[str]:
    keys = set()
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            keys |= _leaf_keys(value, f"{prefix}{field.name}.")
        else:
            keys.add(prefix + field.name)
    return keys


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def test_the_keys_table_of_training_md_gives_every_keys_default() -> None:
    """Every row of docs/training.md's "The keys" and docs/family.md's ``model.family`` table gives the
    default ``RunConfig()`` has, and every key of a run config but ``model.family.*`` and ``model.e2e.*``
    (their own pages' tables) has a row. Measured: 67 + 6 rows, all equal."""
    from innerloop.config import RunConfig

    run = RunConfig()
    rows = _table_rows(_section("docs/training.md", "### The keys", "## Comparing models fairly"))
    rows += _table_rows(_section("docs/family.md", "| `model.family.memory`", "\n\n"))
    differing = [
        (key, cell, _value(run, key))
        for key, cell in rows
        if _documented_value(cell) != _plain(_value(run, key))
    ]
    assert not differing, f"documented default != RunConfig()'s: {differing}"
    undocumented = sorted(
        k for k in _leaf_keys(run) - {key for key, _ in rows} if not k.startswith("model.e2e.")
    )
    assert not undocumented, (
        f"keys of RunConfig with no row in docs/training.md or docs/family.md: {undocumented}"
    )


def test_the_e2e_options_table_gives_every_options_default() -> None:
    """docs/e2e.md's ``model.e2e`` table: a row may name several keys (``inner_lr``, ``inner_lr_start``,
    ...) with their defaults in order; ``chunk_size``'s "16 (tiny), 1024 (125m)" is the tiny default."""
    from innerloop.config import RunConfig

    e2e = RunConfig().model.e2e
    text = _section("docs/e2e.md", "| `chunk_size`", "\n\n")
    documented = {}
    for keys, defaults in re.findall(r"^\| ((?:`\w+`(?:, )?)+) \| ([^|]+?) \|", text, re.M):
        names = re.findall(r"`(\w+)`", keys)
        cells = [c.strip() for c in re.sub(r" \(\w+\)", "", defaults).split(",")]
        documented.update(zip(names, cells[: len(names)], strict=True))
    documented["chunk_size"] = documented["chunk_size"].split()[0]
    assert set(documented) == {field.name for field in dataclasses.fields(e2e)}
    differing = [
        (k, c, getattr(e2e, k)) for k, c in documented.items() if _documented_value(c) != getattr(e2e, k)
    ]
    assert not differing, differing


def _quoted_error_lines() -> list[str]:
    block = _section("docs/training.md", "```text\ninnerloop train: error: model.ttt.update_rule", "\n```\n")
    return block.split("\n", 1)[1].splitlines()


def _error_line_cases() -> list:
    """The adam line builds the registry (entry points, every plugin's checks): ~2 s where it is the
    process's first, hence slow; the others fail in the config's own checks (~0.02 s)."""
    return [
        pytest.param(line, marks=[pytest.mark.slow] if "update_rule='adam'" in line else [])
        for line in _quoted_error_lines()
    ]


@pytest.mark.parametrize("line", _error_line_cases(), ids=lambda line: re.search(r"'([^']+)'", line).group(1))
def test_the_error_lines_training_md_quotes_are_the_commands(
    line: str, tmp_path, monkeypatch, capsys
) -> None:
    """The four error lines of docs/training.md's config errors are what ``innerloop train <override>``
    prints ("[...]" and a trailing "..." stand for what the page leaves out)."""
    from innerloop.cli import main

    override = re.search(r"in override '([^']*)'", line)
    override = override.group(1) if override else "model.ttt.update_rule=adam"
    monkeypatch.chdir(tmp_path)
    assert main(["train", override]) == 2
    printed = capsys.readouterr().err.strip().splitlines()[-1]
    pattern = re.escape(line).replace(re.escape("[...]"), r"\[.*\]")
    if line.endswith(" ..."):
        pattern = pattern[: -len(re.escape(" ..."))] + " .*"
    assert re.fullmatch(pattern, printed), f"docs/training.md: {line}\nprinted:           {printed}"


TRITON_READMES = ["ttt_linear", "ttt_mlp"]


def _public_api_block(package: str) -> str:
    text = (REPO / "innerloop" / "kernels" / "triton" / package / "README.md").read_text(encoding="utf-8")
    return re.search(r"## Public API\n\n```python\n(.*?)```", text, re.S).group(1)


def _documented_signature(block: str, function: str) -> list[tuple[str, object]]:
    """(name, default or inspect.Parameter.empty) of ``function(...)`` as the block writes it."""
    call = re.search(rf"^{function}\((.*?)\)", block, re.M | re.S).group(1)
    node = ast.parse(f"f({call})", mode="eval").body
    names = [(arg.id, inspect.Parameter.empty) for arg in node.args]
    return names + [(keyword.arg, ast.literal_eval(keyword.value)) for keyword in node.keywords]


@pytest.mark.parametrize("package", TRITON_READMES)
def test_the_triton_readmes_public_api_is_the_modules(package: str) -> None:
    """The signatures of ``forward`` and ``decode`` and the ``KERNEL`` fields in the README's "Public API"
    block are the package's (imported without Triton: the functions import it when they run)."""
    import importlib

    module = importlib.import_module(f"innerloop.kernels.triton.{package}")
    block = _public_api_block(package)
    for function in ("forward", "decode"):
        actual = [
            (p.name, p.default) for p in inspect.signature(getattr(module, function)).parameters.values()
        ]
        assert _documented_signature(block, function) == actual, f"{package}/README.md: {function}"
    assert [p.name for p in inspect.signature(module.verify).parameters.values()] == ["inputs"]
    spec = re.search(r"KernelSpec\((.*?)\)\n", block, re.S).group(1)
    fields = re.findall(r"(\w+)=(\"[^\"]*\"|\w+)", spec)
    assert fields, f"{package}/README.md: no KernelSpec field read"
    for name, written in fields:
        expected = ast.literal_eval(written) if not written.isidentifier() else getattr(module, written)
        assert getattr(module.KERNEL, name) == expected, f"{package}/README.md: KERNEL.{name}"


PAGES_WITH_BENCHMARK_COMMANDS = [
    REPO / "README.md",
    REPO / "CONTRIBUTING.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "innerloop").rglob("README.md")),
]  # benchmarks/RESULTS.md's are parsed by tests/benchmarks/test_review_s22_bench.py
BENCHMARK_COMMAND = re.compile(r"python benchmarks/(\w+)\.py([^`|#\n]*)")


def _benchmark_commands() -> list:
    """Every ``python benchmarks/<script>.py ...`` a page gives, in a block or a code span, with the
    placeholders of a usage line (``RUN BASELINE_RUN [--seq-len N]``) given values."""
    found = {}
    for page in PAGES_WITH_BENCHMARK_COMMANDS:
        for match in BENCHMARK_COMMAND.finditer(page.read_text(encoding="utf-8")):
            words = re.sub(r"\[(--[\w-]+) N\]", r"\1 8", match.group(2)).split()
            words = ["runs/x" if word.isupper() else word for word in words]
            found.setdefault((match.group(1), tuple(words)), page.relative_to(REPO).as_posix())
    return [
        pytest.param(name, list(words), id=f"{page}:{name} {' '.join(words)}")
        for (name, words), page in found.items()
    ]


@pytest.mark.slow  # the scripts import innerloop (and science.py Lightning) before they parse: ~1-4 s the first
@pytest.mark.parametrize(("name", "argv"), _benchmark_commands())
def test_every_benchmark_command_the_docs_give_parses(
    name: str, argv: list[str], monkeypatch, tmp_path
) -> None:
    """The benchmark commands of README.md, CONTRIBUTING.md, docs/ and the kernel READMEs parse with the
    scripts' current argument parsers (not run: minutes each)."""
    from benchmark_testing import (
        parse_benchmark_args,
    )  # tests/ is on sys.path (pytest's rootdir-relative import)

    monkeypatch.chdir(tmp_path)
    if name == "science" and argv[:1] == ["reference"]:  # the path of a reference checkout: a stand-in
        (tmp_path / "ttt.py").write_text("")
        argv = ["reference", str(tmp_path / "ttt.py"), *argv[2:]]
    parse_benchmark_args(name, argv)


def _without_plugin_modules(argv: list[str]) -> list[str]:
    """``argv`` less its ``-p MODULE`` pairs (``innerloop -p ./my_loss.py train ...``)."""
    kept, skip = [], False
    for word in argv:
        if not skip and word != "-p":
            kept.append(word)
        skip = word == "-p" and not skip
    return kept


def _run_folder_made(argv: list[str]) -> str | None:
    """The ``runs/<name>`` an ``innerloop train`` command writes (``out_dir=``, else its preset's)."""
    argv = _without_plugin_modules(argv)
    if argv[:2] != ["innerloop", "train"] or "--resume" in argv:
        return None
    for word in argv:
        if word.startswith("out_dir="):
            return word.split("=", 1)[1].rstrip("/")
    preset = argv[argv.index("--config") + 1] if "--config" in argv else "tiny"
    return None if "/" in preset else f"runs/{preset}"


def _run_folders_read(argv: list[str]) -> set[str]:
    argv = _without_plugin_modules(argv)
    if argv[:1] != ["innerloop"] or argv[1:2] == ["train"]:
        return set()
    written = {argv[i + 1] for i, word in enumerate(argv[:-1]) if word == "--out"}
    return {
        "/".join(word.split("/")[:2]) for word in argv if word.startswith("runs/") and word not in written
    }


def _says_where(block_text: str, prose_before: str, folder: str) -> bool:
    """Whether a comment of the block, or the page's 20 lines before it, names ``folder``."""
    comments = [line.split("#", 1)[1] for line in block_text.splitlines() if "#" in line]
    return any(folder in text for text in [*comments, prose_before])


def test_a_bash_block_that_reads_a_run_says_where_it_comes_from() -> None:
    """A block that reads a run an earlier block of its page trained (``innerloop eval runs/tiny/...``)
    works only after that block: it trains the run itself, or a comment of it or the text just above it
    names the run. docs/training.md's compare block read runs/tiny, trained 550 lines above, unnamed."""
    from test_docs import DOCUMENTS, code_blocks, commands

    unexplained = []
    for document in DOCUMENTS:
        lines = document.read_text(encoding="utf-8").splitlines()
        for block in (b for b in code_blocks(document) if b.language == "bash"):
            prose_before = "\n".join(lines[max(0, block.line - 21) : block.line - 1])
            made = set()
            for _, argv in commands(block.text):
                for folder in sorted(_run_folders_read(argv) - made):
                    if not _says_where(block.text, prose_before, folder):
                        unexplained.append(
                            f"{document.relative_to(REPO)}:{block.line}: {' '.join(argv)} reads {folder}"
                        )
                made |= {_run_folder_made(argv)} - {None}
    assert not unexplained, "\n".join(unexplained)


@pytest.mark.slow  # builds the registry and a problem: ~2 s where it is the process's first
def test_auto_picks_the_compiled_step_where_fused_torch_failed_its_first_use_check(monkeypatch) -> None:
    """kernels/README.md, fused_torch/README.md, architecture.md and compiled.py said ``kernel="auto"``
    never picks ``compiled_torch_*`` (priority 0, "by name only"). Its ``verify`` refuses all that
    ``fused_torch_*``'s (priority 1) does, so auto reaches it only where fused_torch is refused for its
    numbers: measured, a fused_torch made 1% wrong was refused and the next training call compiled for
    31 s and ran on compiled_torch_linear. The docs now say so; this pins the choice (no compile: only
    dispatch's selection runs)."""
    import torch

    from innerloop.kernels import dispatch, first_use
    from innerloop.kernels.spec import KernelInputs
    from innerloop.registry import get_registry
    from innerloop.testing import make_problem

    monkeypatch.setenv("INNERLOOP_DISABLE_CPU_KERNELS", "1")  # the CPU kernel (priority 5) aside
    monkeypatch.setattr(
        first_use,
        "failure",
        lambda kernel, *_: "out differs" if kernel.name == "fused_torch_linear" else None,
    )
    task = dataclasses.replace(
        make_problem("linear", "reconstruction", tokens=8, mini_batch_size=4).task, kernel="auto"
    )
    wrapped = {"norm": True, "residual": True}  # the inner LayerNorm and residual, as a layer's blocks say
    inputs = KernelInputs(torch.device("cpu"), torch.float64, 4, 4, 8, requires_grad=True, extra=wrapped)
    chosen, reason = dispatch.select_kernel(get_registry().update_rule("dual_form"), task, inputs)
    assert chosen is not None and chosen.name == "compiled_torch_linear", reason
    inputs = KernelInputs(torch.device("cpu"), torch.float64, 4, 4, 8, requires_grad=False, extra=wrapped)
    chosen, _ = dispatch.select_kernel(get_registry().update_rule("dual_form"), task, inputs)
    assert chosen is None  # without a graph: training_only, never chosen
    pages = [REPO / "docs/architecture.md", *(REPO / "innerloop/kernels").rglob("README.md")]
    pages.append(REPO / "innerloop/kernels/fused_torch/compiled.py")
    for page in pages:
        text = " ".join(page.read_text(encoding="utf-8").split())
        for claim in ("never picks", "by name only", "so only by name"):
            assert claim not in text, f"{page.relative_to(REPO)} says the compiled step is {claim!r}"
