"""The package's import layering, as written in docs/architecture.md ("Layers"), checked on the source.

Every module of ``innerloop/`` is parsed (no import is run) and each ``import`` of an innerloop module
(and each ``importlib.import_module`` / ``__import__`` of one named by a string literal; one of a name
computed at run time is declared in :data:`DYNAMIC_IMPORTS` with the package its names lie under, and
an undeclared one is reported) is checked against three rules:

1. Layers: a unit (a subpackage such as ``core``, or a top-level module such as ``cli``) imports only
   units below it in :data:`LAYERS`; ``core``, at the bottom, imports no other innerloop unit.
2. Cycles: no cycle between units at module level, and none between the modules of one unit (imports
   at module and function level both count).
3. Lazy imports: an import inside a function is allowed only where :data:`LAZY_IMPORTS` lists it,
   with its reason. docs/architecture.md shows the same table.

A failure names the module, the line and the rule. The whole check parses ~80 files: well under 1 s.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
from source_testing import parse_file

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "innerloop"

LAYERS: tuple[str, ...] = (
    "core",
    "kernels",
    "testing",
    "registry",
    "plugins",
    "models",
    "interop",
    "data",
    "config",
    "checkpoints",  # innerloop.checkpoints: the checkpoint format and load_model, without Lightning
    "train",
    "hf",
    "ops",  # innerloop.ops: the public scan op, re-exported from core.ops
    "innerloop",  # the package's __init__: the public API, re-exported from the layers below
    "cli",
    "__main__",
)
"""The units of the package, bottom to top; a unit imports only units before it in this tuple."""

LAZY_IMPORTS: dict[tuple[str, str], str] = {
    ("innerloop.cli", "innerloop"): (
        "cli imports the training stack lazily so that `innerloop --help` stays fast: `import innerloop.cli` "
        "loads the config layer (and with it models, data, core and the registry: 2.3 s, mostly torch), and each "
        "command imports what it runs beyond that (Lightning and the train package, checkpoints, the Hugging "
        "Face model and export: 7.4 s with train)"
    ),
    ("innerloop.hf.hook", "innerloop.hf.configuration"): (
        "`import innerloop` installs the hook without importing transformers (seconds); the config class "
        "is imported, and registered with AutoConfig, only once transformers has loaded its Auto classes"
    ),
    ("innerloop.hf.hook", "innerloop.hf.modeling"): (
        "the model class (which imports transformers' PreTrainedModel, seconds) is imported, and registered "
        "with AutoModelForCausalLM and AutoModel, only once transformers has loaded AutoModelForCausalLM and an "
        "InnerloopConfig has been built (libraries such as torchmetrics load the Auto classes at import, "
        "without using innerloop's model)"
    ),
    ("innerloop.hf", "innerloop.hf.configuration"): (
        "`from innerloop.hf import InnerloopConfig` loads transformers on first access, so that "
        "importing the package (as `import innerloop` does, for the hook) does not"
    ),
    ("innerloop.hf", "innerloop.hf.modeling"): (
        "`from innerloop.hf import InnerloopForCausalLM` loads transformers on first access, so that "
        "importing the package (as `import innerloop` does, for the hook) does not"
    ),
    ("innerloop.core.layer", "innerloop.registry"): (
        "TTTLayer accepts plugin names and resolves them through the registry when it is built; an instance "
        "passed instead is held to the registrar's checks by registry.check_instance (the registered object "
        "itself, or one already checked, passes at once), which builds the process registry, entry points "
        "included, on first use"
    ),
    ("innerloop.core.identity", "innerloop.registry"): (
        "whether a plugin object is the one registered under its name (so that a kernel registered "
        "for that name may run on it) is asked of the registry at call time"
    ),
    ("innerloop.kernels.dispatch", "innerloop.registry"): (
        "dispatch asks the registry which kernels are registered for a (model, loss, rule), at call time"
    ),
    ("innerloop.kernels.first_use", "innerloop.registry.settings"): (
        "a first-use verdict is kept with the plugins' settings (what a checkpoint records), read when it is kept and looked up: a setting changed in place is probed again"
    ),
    ("innerloop.registry.manager", "innerloop.plugins"): (
        "the registry loads the built-in plugins on first use, exactly as it loads entry-point plugins"
    ),
    ("innerloop.registry.kinds", "innerloop.plugins"): (
        "an external update rule is checked against the naive loop (values and gradients) on a tiny problem "
        "with every built-in model it accepts and the built-in reconstruction and next-token losses when "
        "it is registered"
    ),
    ("innerloop.kernels.triton.common", "innerloop.kernels.triton"): (
        "the Triton kernels (`_kernels.py`, which import triton) are imported on the first launch, by the name "
        "their host module gives HostChecks: triton is an optional extra, and it decides when a kernel is "
        "decorated whether it runs compiled or under its CPU interpreter (`TRITON_INTERPRET=1`)"
    ),
    ("innerloop.testing.checks", "innerloop.registry"): (
        "check_inner_model / check_inner_loss / check_update_rule default to the registered built-ins "
        "and run every registered rule; the registry itself uses this module's checks, so testing "
        "sits below it"
    ),
    ("innerloop.testing.kernel_checks", "innerloop.registry"): (
        "check_kernel takes a registered kernel's name; the registry uses innerloop.testing's "
        "checks, so testing sits below it"
    ),
}
"""Function-level imports that are deliberate: (importing module, imported module or package) -> why."""

DYNAMIC_IMPORTS: dict[str, tuple[tuple[str, ...], str]] = {
    "innerloop.kernels.triton.common": (
        ("innerloop.kernels.triton.ttt_linear._kernels", "innerloop.kernels.triton.ttt_mlp._kernels"),
        "HostChecks.kernels() imports a Triton kernel's ``_kernels`` module, named by its host module",
    ),
    "innerloop.registry.manager": (
        ("innerloop.plugins",),
        "the built-in plugin modules, named in innerloop.plugins.DEFAULT_PLUGINS",
    ),
    "innerloop.registry.modules": ((), "a plugin module named by `innerloop -p` or INNERLOOP_PLUGIN_MODULES"),
}
"""Modules that call ``importlib.import_module`` / ``__import__`` on a computed name: importing module ->
(the innerloop modules or packages its computed names can be, none for modules outside innerloop; why).
Such an import is checked as an import of each of them; one in a module not listed here is reported,
since the checker cannot see what it imports."""

COMPUTED = "<computed>"
"""The target of a dynamic import of a computed name in a module :data:`DYNAMIC_IMPORTS` does not list."""


@dataclass(frozen=True)
class Import:
    """One ``import`` statement's innerloop target, as found in the source."""

    module: str  # the importing module, e.g. innerloop.models.lm
    target: str  # the imported module, e.g. innerloop.models.blocks
    path: str  # relative to the repository root
    line: int
    lazy: bool  # inside a function body

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def unit_of(module: str) -> str:
    """``innerloop.models.lm`` -> ``models``; ``innerloop.cli`` -> ``cli``; ``innerloop`` -> ``innerloop``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the package under ``root``, by dotted name."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _dynamic_import(node: ast.AST) -> bool:
    """Whether ``node`` is a call of ``importlib.import_module``, ``import_module`` or ``__import__``
    (an import the ``import`` statements do not show), of a string literal or of a computed name."""
    if not isinstance(node, ast.Call) or not node.args:
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("import_module", "__import__")


def _literal_name(call: ast.Call) -> str | None:
    """The module a dynamic import names by a string literal, or None where the name is computed."""
    first = call.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def _statements(tree: ast.Module) -> Iterator[tuple[ast.stmt | ast.Call, bool]]:
    """Every import statement (and literal dynamic import, :func:`_dynamic_import`) with whether it sits
    inside a function (module level otherwise)."""

    def walk(node: ast.AST, lazy: bool) -> Iterator[tuple[ast.stmt | ast.Call, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) or _dynamic_import(child):
                yield child, lazy
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from walk(child, inner)

    yield from walk(tree, False)


def _targets(node: ast.stmt | ast.Call, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The innerloop modules an import statement loads (``from pkg import submodule`` names the submodule)."""
    if isinstance(node, ast.Call):  # a dynamic import: the module it names, or what DYNAMIC_IMPORTS declares
        literal = _literal_name(node)
        if literal is not None:
            return [literal]
        declared = DYNAMIC_IMPORTS.get(module)
        if declared is None:
            return [COMPUTED]
        return list(declared[0])
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([node.module] if node.module else [])])
    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    return list(dict.fromkeys(targets))  # `from x import a, b` of one module: one import


def collect_imports(root: Path) -> list[Import]:
    """Every import of an innerloop module by a module under ``root/innerloop``."""
    modules = module_files(root)
    found = []
    for module, path in modules.items():
        tree = parse_file(path)
        relative = path.relative_to(root).as_posix()
        for node, lazy in _statements(tree):
            for target in _targets(node, module, path.name == "__init__.py", modules):
                if target in (PACKAGE, COMPUTED) or target.startswith(PACKAGE + "."):
                    found.append(Import(module, target, relative, node.lineno, lazy))
    return found


def _listed(item: Import) -> bool:
    return any(
        item.module == importer and (item.target == target or item.target.startswith(target + "."))
        for importer, target in LAZY_IMPORTS
    )


def layer_violations(imports: list[Import]) -> list[str]:
    """Rule 1 (layers) and rule 3 (lazy imports only where listed)."""
    problems = []
    for item in imports:
        if item.target == COMPUTED:
            problems.append(
                f"{item.where()}: {item.module} imports a module named by a computed string, which this "
                "check cannot see: name it by a literal, or declare the package its names lie under in "
                "DYNAMIC_IMPORTS (and the import in LAZY_IMPORTS and docs/architecture.md where it is lazy)"
            )
            continue
        importer, target = unit_of(item.module), unit_of(item.target)
        for unit in (importer, target):
            if unit not in LAYERS:
                problems.append(f"{item.where()}: {item.module}: unit {unit!r} is not in LAYERS")
        if item.lazy:
            if not _listed(item):
                problems.append(
                    f"{item.where()}: {item.module} imports {item.target} inside a function: not a "
                    "listed lazy import (move it to module level, or add it to LAZY_IMPORTS with the "
                    "reason and to docs/architecture.md)"
                )
            continue
        if importer in LAYERS and target in LAYERS and importer != target:
            if LAYERS.index(target) > LAYERS.index(importer):
                rule = (
                    "core imports no other innerloop unit"
                    if importer == "core"
                    else f"{importer!r} may import only units below it: {list(LAYERS[: LAYERS.index(importer)])}"
                )
                problems.append(f"{item.where()}: {item.module} imports {item.target}: {rule}")
    return problems


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def cycle_violations(imports: list[Import]) -> list[str]:
    """Rule 2: no cycle between units at module level, none between the modules of one unit."""
    problems = []
    units: dict[str, set[str]] = {}
    for item in imports:
        if not item.lazy and unit_of(item.module) != unit_of(item.target):
            units.setdefault(unit_of(item.module), set()).add(unit_of(item.target))
    if cycle := _cycle(units):
        problems.append(f"cycle between units at module level: {' -> '.join(cycle)}")
    for unit in sorted({unit_of(i.module) for i in imports}):
        inside: dict[str, set[str]] = {}
        lines: dict[tuple[str, str], Import] = {}
        for item in imports:
            if unit_of(item.module) == unit == unit_of(item.target) and item.module != item.target:
                inside.setdefault(item.module, set()).add(item.target)
                lines.setdefault((item.module, item.target), item)
        if cycle := _cycle(inside):
            steps = [lines[a, b].where() for a, b in pairwise(cycle)]
            problems.append(
                f"cycle between modules of {unit!r}: {' -> '.join(cycle)} (imports at {', '.join(steps)})"
            )
    return problems


def test_every_import_follows_the_layers_and_no_cycle() -> None:
    imports = collect_imports(REPO)
    assert len(imports) > 100, "the walk found too few imports: is the package where the test looks?"
    problems = layer_violations(imports) + cycle_violations(imports)
    assert not problems, "import layering (docs/architecture.md, Layers):\n" + "\n".join(problems)


def test_every_listed_lazy_import_exists() -> None:
    """A listed exception that no longer happens is removed from the table (and the docs)."""
    lazy = [i for i in collect_imports(REPO) if i.lazy]
    unused = [
        key
        for key in LAZY_IMPORTS
        if not any(
            i.module == key[0] and (i.target == key[1] or i.target.startswith(key[1] + ".")) for i in lazy
        )
    ]
    assert not unused, f"LAZY_IMPORTS lists imports that no longer happen: {unused}"


def test_every_declared_dynamic_import_exists() -> None:
    """A module in DYNAMIC_IMPORTS still imports a computed name (else the declaration is removed)."""
    modules = module_files(REPO)
    calling = {  # the declared modules' files only (the layering test above reads every file)
        module
        for module in DYNAMIC_IMPORTS
        if module in modules
        for node, _ in _statements(parse_file(modules[module]))
        if isinstance(node, ast.Call) and _literal_name(node) is None
    }
    assert not set(DYNAMIC_IMPORTS) - calling, (
        f"stale DYNAMIC_IMPORTS: {sorted(set(DYNAMIC_IMPORTS) - calling)}"
    )
    for targets, _ in DYNAMIC_IMPORTS.values():
        assert all(target in modules for target in targets), targets


def test_docs_show_the_layers_and_the_exceptions() -> None:
    """docs/architecture.md lists the same layers, in the same order, and every lazy import."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- layers -->\n```text\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```-fenced layer list after '<!-- layers -->'"
    documented = [line.split()[0] for line in block.group(1).splitlines() if line.strip()]
    assert documented[::-1] == list(LAYERS), (
        f"docs/architecture.md lists the layers (top to bottom) {documented}; "
        f"tests/test_layering.py has {list(LAYERS[::-1])}"
    )
    for (importer, target), why in LAZY_IMPORTS.items():
        assert f"| `{importer}` | `{target}` | {why} |" in text, (
            f"docs/architecture.md's table of lazy imports lacks the row `{importer}` | `{target}` | {why}, "
            "or gives another reason (the table and LAZY_IMPORTS say the same)"
        )


@pytest.mark.parametrize(
    ("source", "rule"),
    [
        ("from innerloop.models import lm\n", "core imports no other innerloop unit"),
        ("def f():\n    from innerloop.core import state\n", "not a listed lazy import"),
        (
            "import importlib\nimportlib.import_module('innerloop.models.lm')\n",
            "core imports no other innerloop unit",
        ),
        ("def f():\n    __import__('innerloop.core.state')\n", "not a listed lazy import"),
        ("import importlib\ndef f(name):\n    importlib.import_module(name)\n", "a computed string"),
    ],
)
def test_a_planted_violation_is_reported(tmp_path: Path, source: str, rule: str) -> None:
    """The checker itself can fail: a violation planted in a copy is named with its file, line and rule."""
    for name in ("innerloop/__init__.py", "innerloop/core/__init__.py", "innerloop/core/state.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "innerloop/models").mkdir()
    (tmp_path / "innerloop/models/__init__.py").write_text("")
    (tmp_path / "innerloop/models/lm.py").write_text("from innerloop.core import state\n")
    (tmp_path / "innerloop/core/layer.py").write_text(source)
    problems = layer_violations(collect_imports(tmp_path))
    assert len(problems) == 1 and problems[0].startswith("innerloop/core/layer.py:"), problems
    assert rule in problems[0], problems


def test_a_planted_cycle_is_reported(tmp_path: Path) -> None:
    (tmp_path / "innerloop/models").mkdir(parents=True)
    (tmp_path / "innerloop/__init__.py").write_text("")
    (tmp_path / "innerloop/models/__init__.py").write_text("")
    (tmp_path / "innerloop/models/a.py").write_text("from innerloop.models import b\n")
    (tmp_path / "innerloop/models/b.py").write_text("import innerloop.models.a\n")
    problems = cycle_violations(collect_imports(tmp_path))
    assert problems == [
        "cycle between modules of 'models': innerloop.models.a -> innerloop.models.b -> innerloop.models.a "
        "(imports at innerloop/models/a.py:1, innerloop/models/b.py:1)"
    ]
