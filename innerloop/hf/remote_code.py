"""Two tiny modules written into every saved folder, so that tools that never ``import innerloop``
(``lm_eval``, a plain ``AutoModelForCausalLM.from_pretrained``) load it with ``trust_remote_code=True``.

``config.json`` gets an ``auto_map`` naming them; each one only imports innerloop's own class, so the
code that runs is the installed innerloop's (innerloop must be installed where the folder is loaded).
"""

from __future__ import annotations

import os
from pathlib import Path

AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_innerloop.InnerloopConfig",
    "AutoModelForCausalLM": "modeling_innerloop.InnerloopForCausalLM",
    "AutoModel": "modeling_innerloop.InnerloopModel",
}
"""config.json's ``auto_map``: Auto class -> ``module.Class`` in the folder."""

_SHIM = '''"""Loads innerloop's {names} for `trust_remote_code=True`;
innerloop must be installed (pip install innerloop). Written by innerloop's save_pretrained /
`innerloop export`."""

from innerloop.hf.{module} import {imported}

__all__ = [{listed}]
'''


def _shim(module: str, *names: str) -> str:
    """The source of a module that imports ``names`` from ``innerloop.hf.<module>``."""
    listed = ", ".join(f'"{name}"' for name in names)
    return _SHIM.format(names=" and ".join(names), module=module, imported=", ".join(names), listed=listed)


SHIMS: dict[str, str] = {
    "configuration_innerloop.py": _shim("configuration", "InnerloopConfig"),
    "modeling_innerloop.py": _shim("modeling", "InnerloopForCausalLM", "InnerloopModel"),
}
"""File name -> source of the modules ``AUTO_MAP`` names."""


def write_shims(folder: str | os.PathLike[str]) -> None:
    """Write the modules of :data:`SHIMS` into ``folder``."""
    for name, source in SHIMS.items():
        (Path(folder) / name).write_text(source, encoding="utf-8")
