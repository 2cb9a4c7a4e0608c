"""Review s49p: ``innerloop -p MODULE`` with multi-process training and activation checkpointing."""

from __future__ import annotations

import pickle

import pytest
from test_review_s49_s49o import _module, plugin_dir  # noqa: F401 (a fixture)

from innerloop.checkpoints import plugin_origin
from innerloop.registry import isolated_registry
from innerloop.registry.modules import load_plugin_modules
from innerloop.train.module import LanguageModelModule

SMALL = {"hidden_size": 16, "num_heads": 2, "intermediate_size": 32, "num_layers": 1, "vocab_size": 32}


@pytest.mark.slow  # two fresh registries and a model built: ~0.9 s on a loaded machine
def test_a_spawned_process_registers_the_p_modules_of_the_run_it_trains(plugin_dir) -> None:  # noqa: F811
    """ddp_spawn sends the module to fresh processes, whose registries have only the installed plugins:
    the -p module was not registered there, so the checkpoint they wrote recorded no origin of its
    plugin, and a resume without -p failed without naming -p (measured with 2 gloo processes)."""
    module, name = _module(plugin_dir)
    with isolated_registry():
        load_plugin_modules([module])
        trained = LanguageModelModule({**SMALL, "ttt": {"inner_loss": name, "mini_batch_size": 4}})
        sent = pickle.dumps(trained)
    with isolated_registry():  # a spawned process: its registry is built afresh
        received = pickle.loads(sent)
        received.setup("fit")
        assert plugin_origin("inner_loss", name) == {
            "origin": f"-p {module}",
            "class": f"{module}.Loss{module.rsplit('_', 1)[1]}",
        }


def test_a_module_name_is_found_as_a_file_of_the_working_folder(tmp_path, monkeypatch) -> None:
    """The remedy a run names (config.yaml's comment, a checkpoint's error: ``innerloop -p my_loss``) for a
    module given as ``-p ./my_loss.py``: the ``innerloop`` console script has its own folder, not the
    working one, on sys.path, so the name did not import, even beside the file."""
    import sys

    from innerloop.registry.modules import PLUGIN_MODULES_ENV, PluginModuleError

    monkeypatch.delenv(PLUGIN_MODULES_ENV, raising=False)
    module, name = _module(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    try:
        with isolated_registry():
            assert load_plugin_modules([module]) == [f"-p {module}"]
            assert plugin_origin("inner_loss", name)["origin"] == f"-p {module}"
        monkeypatch.chdir(tmp_path.parent)  # elsewhere: not found, and the error says what to give
        with isolated_registry(), pytest.raises(PluginModuleError, match=r"give the \.py file.s path"):
            load_plugin_modules(["s49p_nowhere"])
    finally:
        sys.modules.pop(module, None)


def test_preserve_rng_state_is_an_option_of_torchs_checkpoint_and_is_kept() -> None:
    """``torch.utils.checkpoint.checkpoint(..., preserve_rng_state=False)`` is documented but taken through
    ``**kwargs``, so it is not a keyword-only parameter of its signature: it was refused as 'not options of
    torch.utils.checkpoint.checkpoint'."""
    from innerloop.models import build_model

    model = build_model({**SMALL, "mixer": "attention"})
    model.gradient_checkpointing_enable({"preserve_rng_state": False})
    assert model._gradient_checkpointing_func.keywords == {
        "use_reentrant": False,
        "preserve_rng_state": False,
    }


@pytest.mark.slow  # a tiny model saved and exported: ~1.5 s
def test_export_with_p_says_to_import_the_module_before_from_pretrained(plugin_dir, capsys) -> None:  # noqa: F811
    """The export's 'load it with: import innerloop; AutoModelForCausalLM.from_pretrained(...)' failed
    for a model whose plugin came from -p: the plugin's module must be imported first."""
    from innerloop.cli import main
    from innerloop.config import load_config
    from innerloop.config.load import save_config
    from innerloop.models import build_model
    from innerloop.train.module import save_model_checkpoint

    module, name = _module(plugin_dir)
    out = plugin_dir / "run"
    out.mkdir()
    with isolated_registry():
        load_plugin_modules([module])
        overrides = [f"model.{k}={v}" for k, v in SMALL.items() if k != "vocab_size"]
        run, cfg = load_config("tiny", [*overrides, f"model.ttt.inner_loss={name}", f"out_dir={out}"])
        save_config(cfg, out / "config.yaml")
        save_model_checkpoint(build_model(run.model), out / "last.safetensors")
    with isolated_registry():
        assert main(["-p", module, "export", str(out / "last.safetensors"), str(plugin_dir / "hf")]) == 0
    said = capsys.readouterr().out
    assert f"load it with: import innerloop; import {module}; AutoModelForCausalLM.from_pretrained(" in said


def test_a_plugin_a_p_module_registers_at_import_is_recorded_with_the_option(plugin_dir) -> None:  # noqa: F811
    """A -p module that registers with ``@innerloop.register_inner_loss`` (no hook) was recorded under its
    class's origin, so a checkpoint whose module is missing named no remedy at all (docs/training.md: it
    names ``innerloop -p MODULE``)."""
    from test_review_s49_s49o import _DECORATED

    from innerloop.checkpoints import missing_plugins_note

    module, name = _module(plugin_dir, _DECORATED)
    load_plugin_modules([module])
    origin = plugin_origin("inner_loss", name)
    assert origin["origin"] == f"-p {module}"
    with isolated_registry():  # where the module is not loaded
        assert missing_plugins_note({"inner_loss": {name: origin}}).endswith(f"`innerloop -p {module}`")


@pytest.mark.slow  # the compiled CPU kernels (built on first use), two steps of a tiny model: 0.1 s once built
@pytest.mark.parametrize("kernel", ["cpu_ttt_linear", "cpu_ttt_mlp"])
def test_the_compiled_cpu_kernels_backward_under_a_checkpoint_gives_the_same_gradients(kernel: str) -> None:
    """kernel='auto' picks these while training on the CPU: their custom backward runs again inside the
    non-reentrant checkpoint's recomputation; measured bit-equal (every update rule and inner loss)."""
    import torch

    from innerloop.models import build_model

    ttt = {"mini_batch_size": 4, "inner_model": kernel.removeprefix("cpu_ttt_"), "kernel": kernel}
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_model({**SMALL, "num_layers": 2, "ttt": ttt}).train()
        if checkpointed:
            model.gradient_checkpointing_enable()
        first, state = model(ids[:, :8])
        second, _ = model(ids[:, 8:], state)
        (first.logsumexp(-1).mean() + second.logsumexp(-1).pow(2).mean()).backward()
        results.append([p.grad for p in model.parameters()])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
