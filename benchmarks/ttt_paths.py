"""What the CPU benchmarks share: the TTT layers of each dispatch path, the table they print, and the lines
that say which path each TTT column's calls took.

Paths: ``auto`` (what a user gets; on CPU inference the compiled kernel), ``cpu_ttt`` and
``fused_torch`` (those kernels forced), ``torch`` (the reference path).
"""

from __future__ import annotations

from cli_args import machine_line  # beside this module, on the path of the script that imports it
from torch import nn

import innerloop

PATHS = ("auto", "cpu_ttt", "fused_torch", "torch")


def ttt_layers(hidden: int, heads: int, mini_batch: int, paths: list[str]) -> dict[str, nn.Module]:
    """TTT-Linear and TTT-MLP layers (eval mode) for each path, by table label."""
    layers: dict[str, nn.Module] = {}
    for model in ("linear", "mlp"):
        for path in paths:
            kernel = path if path in ("auto", "torch") else f"{path}_{model}"
            label = f"TTT-{'Linear' if model == 'linear' else 'MLP'}" + (
                "" if path == "auto" else f" ({path})"
            )
            layers[label] = innerloop.TTTLayer(
                hidden, heads, inner_model=model, mini_batch_size=mini_batch, kernel=kernel
            ).eval()
    return layers


def record_paths(layer: nn.Module) -> set[str]:
    """The set, filled as ``layer`` runs, of every path its calls took (a TTT layer's ``dispatches``:
    the kernel for whole mini-batches and torch for a remainder can both be there); stays empty for a
    layer without dispatches (attention)."""
    seen: set[str] = set()
    layer.register_forward_hook(
        lambda module, args, out: seen.update(p for p, _ in getattr(module, "dispatches", []))
    )
    return seen


def paths_taken(seen: set[str], default: str) -> str:
    """``"cpu_ttt_linear + torch"`` for :func:`record_paths`' set (``default`` when it is empty)."""
    return " + ".join(sorted(seen)) if seen else default


def model_paths(model: nn.Module) -> set[str] | None:
    """Every path the last call of each TTT layer inside ``model`` (a language model, or a
    ``torch.compile`` of one) took, for :func:`paths_taken`; None for a model without TTT layers
    (attention, TTT-E2E: one path only)."""
    layers = [module for module in model.modules() if isinstance(getattr(module, "dispatches", None), list)]
    if not layers:
        return None
    return {path for layer in layers for path, _ in layer.dispatches}


def path_lines(paths: dict[str, dict[str, str]]) -> list[str]:
    """``# TTT-Linear ran cpu_ttt_linear: inference fp32, ...``: the settings each path ran, per column
    (``paths[column][setting]``, as :func:`paths_taken` says it)."""
    lines = []
    for name, by_row in paths.items():
        for path in dict.fromkeys(by_row.values()):
            lines.append(f"# {name} ran {path}: {', '.join(row for row in by_row if by_row[row] == path)}")
    return lines


def print_table(
    title: str, columns: dict, results: dict[str, dict], fmt: str, setting: str, threads: int
) -> None:
    """The machine line, then a markdown table of ``results[layer][key]``, ``columns`` {key: header}."""
    print(f"\n{machine_line(threads)}; {setting}\n")
    print(f"| {title} | " + " | ".join(columns.values()) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(format(row[key], fmt) for key in columns) + " |")
