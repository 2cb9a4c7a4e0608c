"""The examples run: the third-party plugin package (installed, its tests, a training run that names
it), training from Python, and the property test of an update rule."""

from __future__ import annotations

import importlib.util
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PLUGIN = EXAMPLES / "innerloop-huber"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """Environment in which the example plugin package is installed (into a temporary folder)."""
    root = tmp_path_factory.mktemp("plugin")
    source, target = root / "src", root / "site"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
    if importlib.util.find_spec("setuptools") is not None:
        command.append("--no-build-isolation")  # build with the setuptools at hand, offline
    subprocess.run([*command, str(source)], check=True, capture_output=True, text=True)
    paths = [str(target), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


#: What the plugin test's one process runs, where the package is installed: the package's own suite
#: (``pytest``, first: as in a fresh interpreter, nothing but its entry point has registered ``huber``),
#: then ``innerloop plugins``, then ``innerloop train``, each followed by a line with its exit status (one
#: interpreter start, not one per command; each command's output is read on its own).
SUITE_PLUGINS_THEN_TRAIN = """
import sys
import pytest
from innerloop.cli import main

tests, *train = sys.argv[1:]
print(f"--- pytest exited {int(pytest.main(['-q', '-n', '0', '-p', 'no:cacheprovider', tests]))} ---", flush=True)
print(f"--- innerloop plugins exited {main(['plugins'])} ---", flush=True)
print(f"--- innerloop train exited {main(train)} ---", flush=True)
"""


def _run_where_installed(server, arguments: list[str], env: dict[str, str], cwd: Path) -> str:
    """:data:`SUITE_PLUGINS_THEN_TRAIN` with ``arguments`` in a process of its own where the plugin package
    is installed (``env``'s PYTHONPATH first on its path), in ``cwd``; its output (stdout and stderr). The
    process is forked from the warm interpreter ``server`` (tests/block_server.py: torch, innerloop and
    Lightning imported, no registry built, no plugin imported: the ~10 s of CPU of a fresh interpreter's
    imports saved), or, where that server does not fork, a fresh interpreter."""
    if not server.forks:
        return _run([sys.executable, "-c", SUITE_PLUGINS_THEN_TRAIN, *arguments], env, cwd).stdout
    script = cwd / "suite_plugins_then_train.py"
    paths = [p for p in env["PYTHONPATH"].split(os.pathsep) if p]
    script.write_text(
        f"import sys\nsys.argv = {['-c', *arguments]!r}\nsys.path[:0] = {paths!r}\n"
        + SUITE_PLUGINS_THEN_TRAIN
    )
    status, output = server.run(script, cwd / "output.txt", cwd, {"PYTHONPATH": env["PYTHONPATH"]}, 600)
    assert status == 0, output[-6000:]
    return output


@pytest.mark.slow  # ~25 s: pip-installs the example package, then runs its suite and a training run in a subprocess
def test_the_plugin_package_passes_its_own_tests_and_a_config_that_names_it_trains(
    plugin_env, tmp_path, block_server
) -> None:
    """One process where the package is installed (its suite, then ``innerloop plugins`` and a training
    run of its config), not one per command: each pays ~3-7 s of start-up (torch, innerloop, pytest's
    plugins, Lightning, the registry) before its own work."""
    config = PLUGIN / "src" / "innerloop_huber" / "tiny-huber.yaml"
    overrides = ["trainer.max_steps=2", "trainer.val_every=2", "data.seq_len=32", "data.batch_size=2",
                 "data.val_batches=1", "trainer.progress_bar=false", f"out_dir={tmp_path / 'run'}"]  # fmt: skip
    arguments = [str(PLUGIN / "tests"), "train", "--config", str(config), *overrides]
    output = _run_where_installed(block_server, arguments, plugin_env, tmp_path)
    suite, _, rest = output.partition("--- pytest exited 0 ---")
    assert rest, f"the package's own tests failed:\n{suite[-3000:]}"
    assert " passed" in suite and "failed" not in suite
    listing, _, training = rest.partition("--- innerloop plugins exited 0 ---")
    assert "huber" in listing
    assert training.rstrip().endswith("--- innerloop train exited 0 ---"), training[-3000:]
    assert "validation perplexity:" in training
    assert "inner_loss: huber" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_config_that_names_the_plugin_fails_clearly_without_it(tmp_path) -> None:
    from innerloop.config import ConfigError, load_config

    if "huber" in __import__("innerloop").available("inner_loss"):
        pytest.skip("the example plugin is installed in this environment, so its name is valid here")
    with pytest.raises(ConfigError, match=r"inner_loss='huber' is not a registered inner_loss"):
        load_config(str(PLUGIN / "src" / "innerloop_huber" / "tiny-huber.yaml"))


@pytest.mark.slow  # ~2 s: a 2-step training run (in this process: the script's own process is not its subject)
def test_training_from_python(tmp_path, monkeypatch, capsys) -> None:
    script = EXAMPLES / "train_from_python.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--steps", "2", "--out", str(tmp_path)])
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # the script's seed_everything sets it: unset again after
    runpy.run_path(str(script), run_name="__main__")  # fresh globals: a missing import still fails
    assert "validation perplexity:" in capsys.readouterr().out
    from innerloop.train import load_model

    assert load_model(tmp_path / "model.safetensors").config.mixer == "ttt"


def _property_example():
    """examples/test_update_rule_property.py, imported as a module (it is not under tests/)."""
    spec = importlib.util.spec_from_file_location(
        "update_rule_property", EXAMPLES / "test_update_rule_property.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~2-6 s: the example's 15 hypothesis examples, each a float64 layer and its gradients
def test_the_update_rule_property_example() -> None:
    _property_example().test_dual_form_equals_the_primal_form_on_any_chunking()  # hypothesis runs its examples


@pytest.mark.slow  # reason: ~12 s: 15 drawn shapes, each checked on every inner model the rule accepts
def test_the_update_rule_property_example_at_any_shape() -> None:
    """The example's second property test: the rule against the naive token loop at 15 drawn shapes
    (11.6 s in CI at be978642, 18 s of CPU alone: check_update_rule's chunkings, large rates and naive
    loop at each shape; the 15 are the example's own promise, not reduced here)."""
    _property_example().test_the_rule_equals_the_naive_token_loop_at_any_shape()
