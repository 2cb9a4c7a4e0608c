"""The benchmark scripts (``benchmarks/*.py``) as modules for tests: :func:`benchmark_script` loads one
by path, once per process, and :func:`parse_benchmark_args` runs its command-line parser."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module, loaded once (registered in ``sys.modules`` first:
    science.py's dataclasses look their module up)."""
    module_name = f"benchmark_script_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
        sys.modules[module_name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module_name])
    return sys.modules[module_name]


def parse_benchmark_args(name: str, argv: list[str]) -> argparse.Namespace:
    """The arguments ``benchmarks/<name>.py`` parses from ``argv`` (science.py's through its parser)."""
    script = benchmark_script(name)
    return script.build_parser().parse_args(argv) if name == "science" else script.parse_args(argv)
