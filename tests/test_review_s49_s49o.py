"""``innerloop -p MODULE`` and ``INNERLOOP_PLUGIN_MODULES`` (review s49o): a plugin module that is not
installed is loaded as an installed entry point's module is, shown by ``innerloop plugins``, recorded by a
run and named by the error of a checkpoint whose plugin is missing."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
from plugin_testing import PLUGIN_LOSS_CLASS

from innerloop.cli import main
from innerloop.registry import DISABLE_ENV, get_registry, isolated_registry
from innerloop.registry.modules import PLUGIN_MODULES_ENV, load_plugin_modules

_COUNTER = itertools.count()

#: A plugin loss class (``{cls}``, named ``{name}``), the body of both module templates below.
_LOSS_CLASS = PLUGIN_LOSS_CLASS

#: A module registering its loss through a ``register_inner_losses`` hook.
_HOOKED = (
    """
from innerloop.core.protocol import InnerLoss, LossPairs
from innerloop.registry import hookimpl

"""
    + _LOSS_CLASS
    + """

@hookimpl
def register_inner_losses(register):
    register({cls}())
"""
)

#: A module registering its loss class with the ``@innerloop.register_inner_loss`` decorator at import.
_DECORATED = """
import innerloop
from innerloop.core.protocol import InnerLoss, LossPairs

""" + _LOSS_CLASS.replace("\nclass ", "\n@innerloop.register_inner_loss\nclass ", 1)


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder on sys.path for plugin modules; the modules written there are forgotten afterwards, and
    the process's registry is back as it was."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(PLUGIN_MODULES_ENV, raising=False)
    before = set(sys.modules)
    with isolated_registry():
        yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("s49o_"):
            del sys.modules[name]


def _module(folder: Path, template: str = _HOOKED, source: str | None = None) -> tuple[str, str]:
    """Write a plugin module (a fresh name each time) into ``folder``; returns (module, loss name)."""
    number = next(_COUNTER)
    module, name = f"s49o_plugin_{number}", f"s49o_loss_{number}"
    text = source if source is not None else template.format(cls=f"Loss{number}", name=name)
    (folder / f"{module}.py").write_text(text)
    return module, name


def test_p_before_or_after_the_command_lists_the_module_with_its_origin(plugin_dir, capsys) -> None:
    module, name = _module(plugin_dir)
    assert main(["-p", module, "plugins"]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if name in line]
    assert row.split() == ["inner_loss", name, "-p", module]
    with isolated_registry():
        assert main(["plugins", "-p", module]) == 0
        assert name in capsys.readouterr().out


def test_the_environment_variable_loads_modules_too(plugin_dir, capsys, monkeypatch) -> None:
    first, first_name = _module(plugin_dir)
    second, second_name = _module(plugin_dir, _DECORATED)
    monkeypatch.setenv(PLUGIN_MODULES_ENV, f"{first}, {second},")
    monkeypatch.setenv(DISABLE_ENV, "1")  # the switches of entry points do not apply to named modules
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert f"-p {first}" in out and first_name in out and second_name in out


def test_a_path_and_its_module_name_are_one_module_loaded_once(plugin_dir, monkeypatch) -> None:
    module, name = _module(plugin_dir)
    monkeypatch.chdir(plugin_dir)
    origins = load_plugin_modules([str(plugin_dir / f"{module}.py"), module, f"./{module}.py"])
    assert origins == [f"-p {module}"]
    assert get_registry().names("inner_loss").count(name) == 1


def test_a_decorated_module_registers_again_in_a_later_registry(plugin_dir) -> None:
    module, name = _module(plugin_dir, _DECORATED)
    load_plugin_modules([module])
    assert name in get_registry().names("inner_loss")
    with isolated_registry():  # the module is imported already: its decorator does not run again
        load_plugin_modules([str(plugin_dir / f"{module}.py")])
        assert name in get_registry().names("inner_loss")


@pytest.mark.parametrize(
    ("source", "said"),
    [
        (
            None,
            "importing 's49o_no_such_module' raised ModuleNotFoundError: No module named 's49o_no_such_module'",
        ),
        ("raise RuntimeError('no GPU\\nhere')", "raised RuntimeError: no GPU here"),
        ("import sys\nsys.exit(3)", "raised SystemExit: 3"),
    ],
)
def test_a_module_that_does_not_import_is_one_line_naming_the_option(
    plugin_dir, capsys, source, said
) -> None:
    module = "s49o_no_such_module" if source is None else _module(plugin_dir, source=source)[0]
    assert main(["train", "-p", module, "trainer.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"innerloop train: error: -p {module}: importing {module!r}"
    )
    assert said in err


def test_a_hook_that_raises_is_not_called_an_import_error(plugin_dir, capsys) -> None:
    source = "from innerloop.registry import hookimpl\n\n\n@hookimpl\ndef register_inner_losses(register):\n    raise RuntimeError('boom')\n"
    module, _ = _module(plugin_dir, source=source)
    assert main(["-p", module, "plugins"]) == 2
    err = capsys.readouterr().err
    assert err == f"innerloop plugins: error: -p {module}: its registration hook raised RuntimeError: boom\n"


def test_a_module_given_by_the_environment_is_named_with_the_variable(
    plugin_dir, capsys, monkeypatch
) -> None:
    monkeypatch.setenv(PLUGIN_MODULES_ENV, "s49o_absent")
    assert main(["plugins"]) == 2
    assert f"error: {PLUGIN_MODULES_ENV}: s49o_absent: importing" in capsys.readouterr().err


def test_a_module_that_takes_a_registered_name_is_refused_whole(plugin_dir, capsys) -> None:
    taken = _HOOKED.format(cls="Taken", name="reconstruction")
    module, _ = _module(plugin_dir, source=taken)
    assert main(["-p", module, "plugins"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (
        f"-p {module}: inner loss name 'reconstruction' from plugin '-p {module}' is already registered"
        in err
    )
    decorated, name = _module(plugin_dir, _DECORATED)
    twice = _module(plugin_dir, source=f"from {decorated} import *\n" + taken)[0]
    with isolated_registry(), pytest.raises(ValueError, match="already registered"):
        load_plugin_modules([twice])
    assert name not in get_registry().names("inner_loss")  # what its import registered is gone too


def test_a_missing_file_and_a_shadowed_name_are_refused(plugin_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"-p \./s49o_nowhere\.py: no such Python file"):
        load_plugin_modules(["./s49o_nowhere.py"])
    module, _ = _module(plugin_dir)
    other = tmp_path / "other"
    other.mkdir()
    (other / f"{module}.py").write_text("")
    load_plugin_modules([module])
    with pytest.raises(ValueError, match="is already another file here"):
        load_plugin_modules([str(other / f"{module}.py")])


@pytest.mark.parametrize("template", [_HOOKED, _DECORATED])
def test_a_module_an_installed_entry_point_loaded_is_loaded_already(
    plugin_dir, monkeypatch, template
) -> None:
    import importlib
    from types import SimpleNamespace

    from innerloop.registry import ALLOW_ENV, manager

    module, name = _module(plugin_dir, template)
    entry_point = SimpleNamespace(
        name="s49o_ep", value=module, group="innerloop", dist=SimpleNamespace(name="s49o-dist", version="1.0")
    )
    entry_point.load = lambda: importlib.import_module(module)
    monkeypatch.setattr(manager, "_entry_points", lambda: [entry_point])
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with isolated_registry():
        assert name in get_registry().names("inner_loss")
        load_plugin_modules([module])  # named again with -p: nothing to add, no clash with itself
        assert get_registry().names("inner_loss").count(name) == 1


def test_a_checkpoint_whose_p_module_is_missing_names_the_option() -> None:
    from innerloop.checkpoints import missing_plugins_note

    record = {
        "inner_loss": {"s49o_gone": {"origin": "-p s49o_gone_module", "class": "s49o_gone_module.Gone"}}
    }
    note = missing_plugins_note(record)
    assert note.endswith("or load it with `innerloop -p s49o_gone_module`")
    installed = {"inner_loss": {"s49o_gone": {"origin": "gone (gone-dist)", "distribution": "gone-dist"}}}
    assert missing_plugins_note(installed).endswith("or load it with `innerloop -p MODULE`")


SMALL = ["model.hidden_size=16", "model.num_heads=2", "model.intermediate_size=32", "model.num_layers=1"]


@pytest.mark.slow  # a 2-step tiny run: ~2 s (4.6 s on a loaded machine)
def test_train_with_p_records_the_module_in_config_yaml(plugin_dir) -> None:
    module, name = _module(plugin_dir)
    out = plugin_dir / "run"
    common = ["trainer.max_steps=2", "data.seq_len=32", "data.batch_size=2", "data.val_batches=1"]
    train = ["train", *common, *SMALL, "trainer.progress_bar=false", f"model.ttt.inner_loss={name}"]
    assert main(["-p", module, *train, f"out_dir={out}"]) == 0
    first = (out / "config.yaml").read_text().splitlines()[0]
    assert first == f"# plugin modules loaded (not installed): innerloop -p {module}"


@pytest.mark.slow  # an eval and a generation of an untrained tiny model: ~2 s
def test_eval_and_generate_reload_a_checkpoint_with_p(plugin_dir, capsys, monkeypatch) -> None:
    from innerloop.config import load_config
    from innerloop.config.load import save_config
    from innerloop.models import build_model
    from innerloop.train.module import save_model_checkpoint

    module, name = _module(plugin_dir)
    out = plugin_dir / "run"
    out.mkdir()
    with isolated_registry():
        load_plugin_modules([module])
        run, cfg = load_config(
            "tiny", [*SMALL, "data.seq_len=32", f"model.ttt.inner_loss={name}", f"out_dir={out}"]
        )
        save_config(cfg, out / "config.yaml")
        save_model_checkpoint(build_model(run.model), out / "last.safetensors")
    checkpoint = str(out / "last.safetensors")
    with isolated_registry():
        assert main(["eval", checkpoint, "--batches", "1", "--batch-size", "1"]) == 2
        assert f"or load it with `innerloop -p {module}`" in capsys.readouterr().err
    with isolated_registry():
        assert main(["eval", checkpoint, "--batches", "1", "--batch-size", "1", "-p", module]) == 0
    with isolated_registry():
        monkeypatch.setenv(PLUGIN_MODULES_ENV, module)
        assert main(["generate", checkpoint, "--tokens", "4"]) == 0
