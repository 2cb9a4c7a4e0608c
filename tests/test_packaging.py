"""Packaging conventions: the version, ``python -m innerloop``, and a CPU install without Triton."""

from __future__ import annotations

import runpy
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

import innerloop
from innerloop.cli import main

tomllib = pytest.importorskip("tomllib", reason="tomllib (to read pyproject.toml) is in Python >= 3.11")

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_version_is_written_once_in_the_package():
    pyproject = _pyproject()
    assert "version" not in pyproject["project"], "the version must be written only in innerloop.__version__"
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "innerloop.__version__"}
    assert all(part.isdigit() for part in innerloop.__version__.split(".")), innerloop.__version__


def test_version_flag_prints_the_running_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"innerloop {innerloop.__version__}\n"


def test_version_flag_is_the_code_that_runs_not_stale_install_metadata(monkeypatch, capsys):
    """An editable install keeps the version of the day it was installed in its metadata (or another
    checkout's, when this one runs with PYTHONPATH); ``--version`` must say the version of the code
    that runs, the one checkpoints record (``innerloop_version``), not that metadata."""
    monkeypatch.setattr(metadata, "version", lambda name: "9.9.9")  # a stale install
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"innerloop {innerloop.__version__}\n"


@pytest.mark.slow  # a fresh interpreter imports torch: ~3 s of CPU, more on a loaded machine
def test_python_dash_m_innerloop_is_the_cli(monkeypatch, capsys):
    done = subprocess.run(
        [sys.executable, "-m", "innerloop", "--version"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"innerloop {innerloop.__version__}\n"
    # the same __main__ without arguments, run as `python -m` runs it but in this process (the fresh
    # interpreter above showed `python -m innerloop` starts it; a second one cost ~4 s of imports): the
    # usage, and main()'s status 2 passed to sys.exit (the process's exit status)
    monkeypatch.setattr(sys, "argv", ["innerloop"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("innerloop", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 2
    assert capsys.readouterr().out.startswith("usage: innerloop")


def _requirement_names(requirements: list[str]) -> list[str]:
    return [req.split(";")[0].split(">")[0].split("=")[0].strip() for req in requirements]


def test_triton_is_an_extra_that_cuda_and_test_pull_in():
    project = _pyproject()["project"]
    assert "triton" not in _requirement_names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert _requirement_names(extras["triton"]) == ["triton"]
    assert "innerloop[triton]" in extras["cuda"]
    assert "innerloop[triton]" in extras["test"], "the interpreter tests of the Triton kernels need it"


# Run in a fresh interpreter where ``import triton`` fails as it does when triton is not installed
# (``importlib.util.find_spec`` returns None, ``import`` raises ModuleNotFoundError).
_WITHOUT_TRITON = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None

    import contextlib, importlib, io, pkgutil
    import torch
    import innerloop
    from innerloop.cli import main
    from innerloop.kernels.dispatch import KernelUnavailableError

    # Every module imports, except the Triton kernel sources themselves (imported on first launch).
    needs_triton = set()
    for module in pkgutil.walk_packages(innerloop.__path__, "innerloop."):
        try:
            importlib.import_module(module.name)
        except ImportError:
            needs_triton.add(module.name)
    assert needs_triton == {
        "innerloop.kernels.triton.common_triton",
        "innerloop.kernels.triton.ttt_linear._kernels",
        "innerloop.kernels.triton.ttt_mlp._kernels",
    }, needs_triton

    # A layer trains on CPU: forward and backward equal the pure-torch reference path.
    for inner_model in ("linear", "mlp"):
        torch.manual_seed(0)
        x = torch.randn(2, 24, 32, requires_grad=True)
        outputs, grads = [], []
        for kernel in ("auto", "torch"):
            torch.manual_seed(1)
            layer = innerloop.TTTLayer(hidden_size=32, num_heads=2, inner_model=inner_model, kernel=kernel)
            y, _ = layer(x)
            (grad,) = torch.autograd.grad(y.square().sum(), x)
            outputs.append(y)
            grads.append(grad)
            assert not any("triton" in path for path, _ in layer.dispatches), layer.dispatches
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)

    # `innerloop plugins` says that the Triton kernels cannot run and how to install triton.
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        assert main(["plugins"]) == 0
    note = table.getvalue().strip().splitlines()[-1]
    assert "triton_* kernels" in note and "triton is not installed" in note, table.getvalue()
    assert "pip install 'innerloop[triton]'" in note, note

    # A layer forced onto a Triton kernel fails saying so.
    for inner_model in ("linear", "mlp"):
        layer = innerloop.TTTLayer(
            hidden_size=32, num_heads=2, inner_model=inner_model, kernel=f"triton_ttt_{inner_model}"
        )
        try:
            layer(torch.randn(1, 16, 32))
        except KernelUnavailableError as error:
            message = str(error)
        else:
            raise AssertionError("a Triton kernel ran without triton")
        assert "triton is not installed" in message and "pip install 'innerloop[triton]'" in message, message
    print("ok")
    """
)


@pytest.mark.slow  # a fresh interpreter imports torch and every innerloop module: ~7 s of CPU
def test_cpu_install_works_without_triton():
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().endswith("ok"), done.stdout
