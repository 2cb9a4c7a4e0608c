"""FLA 0.6.0's naive reference ops, run in float64: the oracles of tests/family/test_fla.py.

FLA's naive functions compute in float32 (``.float()``, ``.to(torch.float32)``); compared with ours
in float64 they would show float32 rounding, not a difference of semantics. So, as ../shared/ZOO.md
describes, we take the installed source of each naive module, replace float32 by float64 (each
replacement asserted to have happened: a changed FLA source fails loudly instead of running in
float32), restore the parenthesis missing from FLA's Titans LayerNorm backward, and execute it.

The source is read from the installed ``fla`` package's files without importing ``fla`` (importing
``fla.ops`` imports every Triton kernel: ~25 s on this machine's CPU). No FLA code is copied into
this repository.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import cache
from pathlib import Path

FLA_VERSION = "0.6.0"
FLOAT32_TO_64 = [("torch.float32", "torch.float64")]
FLOAT_CALLS = [(".float()", ".double()")]

# titans/naive.py computes `D * grad - grad.sum(...) / (rstd * D)`: the commented line above it and
# ttt's formula have the parenthesis, `(D * grad - grad.sum(...)) / (rstd * D)` (ZOO.md).
TITANS_PARENTHESIS = [
    (
        "v_new = D * grad - grad.sum(-1, keepdim=True) / (rstd * D)",
        "v_new = (D * grad - grad.sum(-1, keepdim=True)) / (rstd * D)",
    )
]
# titans/naive.py imports combine_params_log from log_impl.py, which is executed into the same namespace.
TITANS_LOG_IMPORT = [("from fla.ops.titans.log_impl import combine_params_log\n", "")]


def fla_ops_directory() -> Path:
    """The installed ``fla/ops`` folder (fla-core must be the version ZOO.md was checked against)."""
    installed = importlib.metadata.version("fla-core")
    assert installed == FLA_VERSION, (
        f"the family's oracles are fla-core {FLA_VERSION}; installed: {installed}"
    )
    spec = importlib.util.find_spec("fla")  # a top-level spec: fla/__init__.py is not executed
    assert spec is not None and spec.submodule_search_locations, "fla-core is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "ops"


def substituted(relative_path: str, substitutions: list[tuple[str, str]]) -> str:
    """The source of ``fla/ops/<relative_path>`` with every ``(old, new)`` replaced; each ``old``
    must occur."""
    source = (fla_ops_directory() / relative_path).read_text(encoding="utf-8")
    for old, new in substitutions:
        assert old in source, (
            f"fla/ops/{relative_path}: {old!r} not found; FLA's source differs from {FLA_VERSION}"
        )
        source = source.replace(old, new)
    return source


@cache
def float64_module(relative_path: str, substitutions: tuple[tuple[str, str], ...], prelude: str = "") -> dict:
    """Execute the substituted source (after the optional substituted ``prelude`` module) and return
    its namespace: the float64 copies of its functions by name."""
    namespace: dict = {"__name__": f"fla_float64.{relative_path}"}
    if prelude:
        exec(compile(substituted(prelude, []), f"fla/ops/{prelude} (float64)", "exec"), namespace)
    exec(
        compile(
            substituted(relative_path, list(substitutions)), f"fla/ops/{relative_path} (float64)", "exec"
        ),
        namespace,
    )
    return namespace


def reference(name: str, as_shipped: bool = False):
    """The float64 copy of FLA's naive function ``name`` (one of those ZOO.md maps); ``as_shipped``
    keeps FLA's Titans LayerNorm backward without its parenthesis (to show the comparison sees it)."""
    modules = {
        "naive_recurrent_linear_attn": ("linear_attn/naive.py", FLOAT32_TO_64, ""),
        "naive_recurrent_simple_gla": ("simple_gla/naive.py", FLOAT32_TO_64 + FLOAT_CALLS, ""),
        "delta_rule_recurrence": ("delta_rule/naive.py", FLOAT_CALLS, ""),
        "naive_recurrent_gated_delta_rule": ("gated_delta_rule/naive.py", FLOAT32_TO_64 + FLOAT_CALLS, ""),
        "chunk_ttt_linear_ref": ("ttt/naive.py", FLOAT32_TO_64, ""),
        "recurrent_momentum_delta_rule_ref": (
            "momentum_delta_rule/naive.py",
            FLOAT32_TO_64 + FLOAT_CALLS,
            "",
        ),
        "chunk_titans_linear_ref": (
            "titans/naive.py",
            FLOAT32_TO_64 + TITANS_PARENTHESIS + TITANS_LOG_IMPORT,
            "titans/log_impl.py",
        ),
    }
    path, substitutions, prelude = modules[name]
    if as_shipped:
        substitutions = [pair for pair in substitutions if pair not in TITANS_PARENTHESIS]
    return float64_module(path, tuple(substitutions), prelude)[name]
