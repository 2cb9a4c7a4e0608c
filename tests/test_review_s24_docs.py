"""Review s24 of the docs against the code (/work/notes/review_s24_docs.md): the claims a test can pin
cheaply, by reading files only (no torch import). The xfail tests are the defects the review found;
each turns into a failure (strict) once its doc is corrected, and is then to be kept as a plain test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(path.stem for path in (REPO / "innerloop/config/presets").glob("*.yaml"))


def _read(relative: str) -> str:
    return (REPO / relative).read_text()


def _prose(text: str) -> str:
    """``text`` with every run of whitespace one space: a rewrap of a paragraph changes nothing."""
    return " ".join(text.split())


def _builtin_names(kind_folder: str) -> list[str]:
    folder = REPO / "innerloop/plugins" / kind_folder
    return sorted(path.stem for path in folder.glob("*.py") if path.stem != "__init__")


def _mixer_names() -> list[str]:
    source = _read("innerloop/models/config.py")
    table = source[source.index("MIXER_TABLE: dict[str, Mixer] = {") :]
    table = table[: table.index("\n}\n")]
    return re.findall(r'^    "(\w+)": Mixer\(', table, re.MULTILINE)


def test_readme_lists_every_preset():
    readme = _read("README.md")
    section = readme[readme.index("(presets:") : readme.index("the tiny ones matched in parameters")]
    named = set(re.findall(r"`([\w.-]+)`", section))
    sizes = re.search(r"`ttt-linear-\{([^}]*)\}`", section).group(1).split(",")
    named |= {f"ttt-linear-{size}" for size in sizes}
    assert set(PRESETS) <= named, sorted(set(PRESETS) - named)


def test_every_env_variable_the_docs_name_is_read_by_the_code():
    docs = ["README.md", "CONTRIBUTING.md", *(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]
    docs += [str(p.relative_to(REPO)) for p in (REPO / "innerloop/kernels").rglob("README.md")]
    named = {v for doc in docs for v in re.findall(r"INNERLOOP_[A-Z_]+[A-Z]", _read(doc))}
    sources = "".join(
        p.read_text() for p in [*(REPO / "innerloop").rglob("*.py"), REPO / "tests/conftest.py"]
    )
    # and the variables a test reads itself (CONTRIBUTING names the one the reference-code tests read)
    read_by_tests = r"(?:environ\.get\(|environ\[|getenv\()\s*[\"'](INNERLOOP_\w+)"
    tests = "".join(p.read_text() for p in (REPO / "tests").rglob("*.py"))
    sources += " ".join(re.findall(read_by_tests, tests))
    assert named and all(v in sources for v in named), sorted(v for v in named if v not in sources)


def test_training_md_config_sentence_lists_every_preset():
    text = _prose(_read("docs/training.md"))
    sentence = text[text.index("`--config` takes a packaged preset") :]
    sentence = sentence[: sentence.index("or a YAML file")]
    named = set(re.findall(r"`([\w.-]+)`", sentence)) | {
        "ttt-linear-350m",
        "ttt-linear-760m",
        "ttt-linear-1.3b",
    }  # "... `-1.3b`"
    assert set(PRESETS) <= named, sorted(set(PRESETS) - named)


def test_readme_layer_options_name_every_builtin_plugin():
    readme = _read("README.md")
    options = readme[readme.index("- `inner_model`:") : readme.index("- `kernel`:")]
    for folder in ("models", "losses", "optimizers"):
        for name in _builtin_names(folder):
            assert f'"{name}"' in options, f"README's TTTLayer options do not name the built-in {name!r}"


def test_architecture_md_names_every_mixer():
    text = _prose(_read("docs/architecture.md"))
    section = text[text.index("## Models, training, configs") : text.index("## Habits we copy")]
    mixers = _mixer_names()
    assert len(mixers) == 7, mixers
    prose = {
        "ttt": "TTT layer",
        "attention": "causal attention",
        "swa": "sliding-window attention",
        "linear_attention": "linear attention",
        "deltanet": "DeltaNet",
        "gated_deltanet": "Gated DeltaNet",
        "titans": "Titans",
    }
    missing = [m for m in mixers if prose.get(m, m) not in section and f"`{m}`" not in section]
    assert not missing, missing


def test_architecture_layout_names_every_core_module():
    text = _read("docs/architecture.md")
    layout = text[text.index("innerloop/\n  core/") : text.index("  registry/")]
    modules = sorted(p.name for p in (REPO / "innerloop/core").glob("*.py") if p.name != "__init__.py")
    missing = [m for m in modules if m not in layout]
    assert not missing, missing


def test_contributing_describes_the_triton_child_per_directory():
    conftest = _read("tests/kernels/conftest.py")
    assert "by_directory" in conftest and "item.getparent(pytest.Module).parent" in conftest
    assert "per directory" in _prose(_read("CONTRIBUTING.md"))


@pytest.mark.slow  # a subprocess that imports innerloop and builds the registry: ~2 s
def test_plugins_command_names_an_unclear_switch_in_one_line():
    import os
    import subprocess
    import sys

    environment = {**os.environ, "INNERLOOP_DISABLE_EXTERNAL_PLUGINS": "maybe", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "innerloop", "plugins"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-500:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "INNERLOOP_DISABLE_EXTERNAL_PLUGINS='maybe'" in lines[0], lines
