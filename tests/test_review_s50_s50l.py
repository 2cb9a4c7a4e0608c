"""Review s50l: what compare's kept per-window scores are keyed by (a rerun reuses them only where the
numbers would come out the same), and the registry's one loading path as plugin authors use it."""

from __future__ import annotations

import importlib
import itertools
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from plugin_testing import plugin_module_folder
from safetensors.torch import save_file

from innerloop.kernels.cpu.build import DISABLE_VARIABLE
from innerloop.registry import get_registry
from innerloop.registry.modules import load_plugin_module
from innerloop.train.compare import LengthProgress, length_key

PREFIX = "s50l_mod_"
_COUNTER = itertools.count()
PLUGIN = """
import innerloop
from innerloop.core.protocol import InnerLoss, LossPairs


@innerloop.register_inner_loss
class Loss{number}(InnerLoss):
    name = "s50l_loss_{number}"

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={{}})

    def token_loss(self, prediction, target):
        return (prediction - target).pow({power}).sum(dim=-1)
"""


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder on sys.path for this file's plugin modules, in a fresh registry (plugin_module_folder)."""
    with plugin_module_folder(tmp_path, monkeypatch, PREFIX) as path:
        yield path


def _key(folder: Path) -> str:
    """The scores key of one tiny model on three windows (the checkpoint a bare safetensors file)."""
    checkpoint = folder / "m.safetensors"
    if not checkpoint.exists():
        save_file({"w": torch.zeros(2)}, str(checkpoint))
    model = SimpleNamespace(module=torch.nn.Linear(2, 2), checkpoint=checkpoint, no_ttt=False)
    inputs = torch.arange(12).reshape(3, 4)
    return length_key([model], inputs, inputs, 3, 2)


@pytest.mark.slow  # ~0.35 s: the first registry of the process built (the built-in plugins imported)
def test_the_scores_key_changes_with_the_cpu_kernels_switched_off(folder, monkeypatch) -> None:
    monkeypatch.delenv(DISABLE_VARIABLE, raising=False)
    key = _key(folder)
    monkeypatch.setenv(DISABLE_VARIABLE, "1")  # the layers run the torch path: other numbers
    assert _key(folder) != key


def test_the_scores_key_changes_with_a_plugin_loaded_and_with_its_code(folder) -> None:
    key = _key(folder)
    number = next(_COUNTER)
    plugin = folder / f"{PREFIX}{number}.py"
    plugin.write_text(PLUGIN.format(number=number, power=2))
    load_plugin_module(plugin.stem, get_registry())
    loaded = _key(folder)
    assert loaded != key  # a -p module (a loss, a faster kernel) may change what a model computes
    assert _key(folder) == loaded  # nothing changed: the same key
    plugin.write_text(PLUGIN.format(number=number, power=4))  # the author edits the loss, runs again
    assert _key(folder) != loaded


def test_a_damaged_kept_scores_file_is_replaced_and_removed_once_the_comparison_is_written(tmp_path) -> None:
    progress = LengthProgress(tmp_path)
    inputs = torch.zeros(6, 8, dtype=torch.long)
    path = progress.scores_path("k")
    path.write_bytes(b"cut short by a full disk")  # a damaged file from an earlier run
    assert progress.reused("k", 2, inputs, 2) is None  # scored again, with a warning
    scores = SimpleNamespace(loss_sums=torch.ones(2, 6, 2, dtype=torch.float64), counts=torch.ones(6, 2))
    progress.finished(SimpleNamespace(lengths=[scores]), "k", remaining=0)
    replaced = LengthProgress(tmp_path).reused("k", 2, inputs, 2)
    assert replaced is not None and torch.equal(replaced.loss_sums, scores.loss_sums)  # a rerun reuses them
    progress.finish()
    assert not path.exists()  # the whole comparison written: nothing of this run's is left


def test_a_killed_write_s_temporary_scores_file_is_removed_by_the_next_run(tmp_path) -> None:
    progress = LengthProgress(tmp_path)
    path = progress.scores_path("k")
    handle, left = tempfile.mkstemp(dir=tmp_path, prefix=f".{path.name}.", suffix=".tmp")  # as atomic_write
    os.close(handle)  # its writer killed (SIGKILL, power cut) before the rename: nothing else removes it
    scores = SimpleNamespace(loss_sums=torch.ones(2, 6, 2, dtype=torch.float64), counts=torch.ones(6, 2))
    progress.finished(SimpleNamespace(lengths=[scores]), "k", remaining=0)
    assert not Path(left).exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_module_the_user_imported_first_is_listed_and_removed_as_the_p_module_that_loads_it(folder) -> None:
    number = next(_COUNTER)
    module, loss = f"{PREFIX}{number}", f"s50l_loss_{number}"
    (folder / f"{module}.py").write_text(PLUGIN.format(number=number, power=2))
    importlib.import_module(module)  # the user's script imports it before innerloop loads it with -p
    registry = get_registry()
    assert load_plugin_module(module, registry) == f"-p {module}"
    (entry,) = [e for e in registry.entries("inner_loss") if e.name == loss]
    assert registry.loaded_by(entry.origin) == f"-p {module}"  # as innerloop plugins and checkpoints name it
    registry.remove_plugin(f"-p {module}")  # 'everything it registered'
    assert loss not in registry.names("inner_loss")


@pytest.mark.slow  # ~3 s: two models, a comparison at two lengths interrupted, then run again
def test_a_rerun_with_another_seed_leaves_no_partial_file_of_the_interrupted_run(
    tmp_path, monkeypatch
) -> None:
    from lm_testing import untrained_run

    from innerloop.cli import main
    from innerloop.train import compare as compare_module

    corpus = tmp_path / "corpus.py"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120)))
    runs = [
        untrained_run(tmp_path / n, corpus, m, s, 16, 3, 2) for n, m, s in (("a", "ttt", 0), ("b", "swa", 1))
    ]
    out = tmp_path / "out"
    command = ["compare", *map(str, runs), "--seq-len", "16", "24", "--out", str(out), "--resamples", "20"]
    real = compare_module._evaluate_length

    def interrupted_at_24(models, inputs, *args):
        if inputs.shape[1] == 24:
            raise KeyboardInterrupt
        return real(models, inputs, *args)

    with monkeypatch.context() as patch:
        patch.setattr(compare_module, "_evaluate_length", interrupted_at_24)
        assert main(command) == 130
    assert main([*command, "--seed", "1"]) == 0  # the docs: another --seed still reuses the kept scores
    assert sorted(p.suffix for p in out.iterdir()) == [".csv", ".md", ".png"], sorted(out.iterdir())
