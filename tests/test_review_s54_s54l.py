"""Review s54l: a newcomer's walk through writing, installing, training and property-testing a plugin.

- An installed plugin (a distribution's entry point) whose code changed under the same version, as an
  editable install (``pip install -e``, the docs' way to develop a plugin) changes it with every edit,
  loaded a checkpoint saved with the old code silently: only plugins registered in the process had
  their source digest recorded and compared. Now every plugin not built in has it.
- A plugin module whose function is named after a hook but not marked ``@innerloop.hookimpl``, beside
  a marked one, was accepted and that function skipped (pluggy calls marked functions only): its
  objects were missing, and a run asking for them failed later, far from the cause ("unknown update
  rule"). Only a module with no marked hook at all was refused with the hint. Now it is refused too.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch

import innerloop
from innerloop import HalfSquaredError, InnerModel, LossPairs, UpdateRule
from innerloop.checkpoints import PLUGIN_SOURCES_KEY, PluginChangedWarning, load_checkpoint, load_model
from innerloop.models import ModelConfig, TTTConfig, build_model
from innerloop.registry import PluginError, get_registry, reset_registry
from innerloop.train.module import save_model_checkpoint

pytestmark = pytest.mark.usefixtures("fresh_global_registry")

DISTRIBUTION_MODULE = "review_s54l_cosine"
DISTRIBUTION_SOURCE = """
    import torch

    import innerloop
    from innerloop import InnerLoss, LossPairs


    class Cosine(InnerLoss):
        \"\"\"1 - cos(prediction, target), smoothed by eps.\"\"\"

        name = "review_s54l_cosine"
        eps = {eps}

        def pairs(self, views, carry):
            return LossPairs(views.key, views.value)

        def token_loss(self, prediction, target):
            dot = (prediction * target).sum(-1)
            norms = ((prediction.pow(2).sum(-1) + self.eps) * (target.pow(2).sum(-1) + self.eps)).sqrt()
            return 1 - dot / norms


    @innerloop.hookimpl
    def register_inner_losses(register):
        register(Cosine())
"""


def cosine_loss_config() -> ModelConfig:
    """A one-layer model whose TTT layer uses the installed plugin loss ``review_s54l_cosine``."""
    return ModelConfig(
        vocab_size=64,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        ttt=TTTConfig(inner_loss="review_s54l_cosine"),
    )


def _install(folder: Path, eps: str) -> None:
    """The distribution ``review-s54l-cosine`` 0.1 with its entry point, its module computing with ``eps``
    (an editable install's module: the file itself, edited in place, the version unchanged)."""
    (folder / f"{DISTRIBUTION_MODULE}.py").write_text(textwrap.dedent(DISTRIBUTION_SOURCE.format(eps=eps)))
    dist = folder / "review_s54l_cosine-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: review-s54l-cosine\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[innerloop]\ncosine = {DISTRIBUTION_MODULE}\n")
    sys.modules.pop(DISTRIBUTION_MODULE, None)
    importlib.invalidate_caches()
    reset_registry()  # the next get_registry() loads the entry point again, as a new process would


@pytest.mark.slow  # reason: builds the process registry with an entry point twice (~1 s)
def test_an_installed_plugin_whose_code_changed_under_the_same_version_is_warned_of(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, DISTRIBUTION_MODULE, raising=False)
    _install(tmp_path, "1e-6")
    entry = next(e for e in get_registry().entries("inner_loss") if e.name == "review_s54l_cosine")
    assert get_registry().distribution(entry.origin) is not None  # an installed plugin, not in-process
    torch.manual_seed(0)
    path = save_model_checkpoint(build_model(cosine_loss_config()), tmp_path / "c.safetensors")
    assert "review_s54l_cosine" in load_checkpoint(path)[PLUGIN_SOURCES_KEY].get("inner_loss", {})

    _install(tmp_path, "1e-3")  # the plugin's code edited, its version the same
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(path)
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginChangedWarning)]
    assert len(messages) == 1, messages
    assert "'review_s54l_cosine'" in messages[0] and "its code changed" in messages[0]


# -- a plugin module's function named after a hook but not marked: skipped by pluggy, silently -------------


def _module_with_an_unmarked_hook() -> types.ModuleType:
    """A plugin module whose loss hook is marked and whose update-rule hook (the same name exactly) is
    not: pluggy only calls marked functions, so the rule would never be registered."""
    module = types.ModuleType("review_s54l_unmarked")

    class Rule(UpdateRule):
        """Mini-batch gradient descent, delegated to the built-in primal form."""

        name = "review_s54l_rule"

        def forward(self, state, task, views, lr, tau):
            return get_registry().update_rule("minibatch_gd").forward(state, task, views, lr, tau)

    class Loss(HalfSquaredError):
        """Reconstruct the value view from the key view."""

        name = "review_s54l_loss"

        def pairs(self, views, carry):
            return LossPairs(views.key, views.value)

    @innerloop.hookimpl
    def register_inner_losses(register):
        register(Loss())

    def register_update_rules(register):  # the newcomer's slip: no @innerloop.hookimpl
        register(Rule())

    module.register_inner_losses = register_inner_losses
    module.register_update_rules = register_update_rules
    return module


def test_a_function_named_after_a_hook_but_not_marked_is_refused_naming_it() -> None:
    module = _module_with_an_unmarked_hook()
    with pytest.raises(PluginError, match=r"register_update_rules.*@innerloop\.hookimpl"):
        innerloop.register(module)
    assert "review_s54l_loss" not in innerloop.available("inner_loss")  # nothing of it was registered


# -- an inner model's init_params without the generator: registered, then the kit's checks crash ----------


class _NoGenerator(InnerModel):
    """``x W`` whose ``init_params(H, f)`` takes no generator (docs/architecture.md's contract said so)."""

    name = "review_s54l_no_generator"

    def param_shapes(self, head_dim):
        return {"W": (head_dim, head_dim)}

    def init_params(self, num_heads, head_dim):
        return {"W": torch.randn(num_heads, head_dim, head_dim) * 0.02}

    def forward(self, params, x):
        return x @ params["W"]


def test_an_init_params_without_the_generator_is_refused_at_registration() -> None:
    """Registration accepted it, and the kit (check_inner_model; make_problem, so check_update_rule with
    the model) then failed with a TypeError from inside it."""
    with pytest.raises(PluginError, match=r"init_params\(num_heads, head_dim\).*takes no generator"):
        innerloop.register_inner_model(_NoGenerator())
    assert _NoGenerator.name not in innerloop.available("inner_model")


def test_a_plugin_object_in_a_config_is_told_to_give_its_registered_name() -> None:
    """``TTTConfig(inner_loss=MyLoss())`` (a TTTLayer takes an instance; a config takes names) said only
    'must be a string': now the message says to register the object and give its name."""

    class Loss(HalfSquaredError):
        """Reconstruct the value view from the key view."""

        name = "review_s54l_object"

        def pairs(self, views, carry):
            return LossPairs(views.key, views.value)

    config = ModelConfig(
        vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, ttt=TTTConfig(inner_loss=Loss())
    )
    with pytest.raises(ValueError, match=r"model\.ttt\.inner_loss=.*register.*'review_s54l_object'"):
        build_model(config)
