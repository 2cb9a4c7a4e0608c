"""Registration refuses plugins that would compute wrong numbers, a refused plugin leaves the registry
exactly as it was, and a broken external plugin is skipped with one warning instead of breaking
everyone (issue "Trust", items 6, 14 and 15)."""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

import innerloop
from innerloop.core.protocol import Activation, AffineLayer, LossPairs, StackModel
from innerloop.plugins.losses.reconstruction import HalfSquaredError
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.optimizers.minibatch_gd import MiniBatchGD
from innerloop.registry import (
    DISABLE_ENV,
    PluginError,
    PluginLoadWarning,
    Registry,
    build_registry,
    hookimpl,
    manager,
)
from innerloop.testing import check_inner_loss, check_inner_model

README = Path(__file__).resolve().parents[2] / "README.md"


class PluginWith:
    """A plugin object registering the given objects through the hook of their kind."""

    def __init__(self, losses=(), models=(), rules=()):
        self.losses, self.models, self.rules = losses, models, rules

    @hookimpl
    def register_inner_models(self, register):
        for model in self.models:
            register(model)

    @hookimpl
    def register_inner_losses(self, register):
        for loss in self.losses:
            register(loss)

    @hookimpl
    def register_update_rules(self, register):
        for rule in self.rules:
            register(rule)


def snapshot(registry: Registry) -> tuple:
    """Everything the registry exposes: entries of every kind (by object identity), the pluggy
    plugins and hook implementations, and the broken plugins."""
    manager_ = registry.plugin_manager
    entries = [(e.kind, e.name, id(e.obj), e.origin) for e in registry.entries()]
    plugins = sorted((name, id(plugin)) for name, plugin in manager_.list_name_plugin())
    hooks = {
        hook: [(impl.plugin_name, id(impl.function)) for impl in caller.get_hookimpls()]
        for hook, caller in vars(manager_.hook).items()
    }
    return entries, plugins, hooks, registry.broken()


# --------------------------------------------------------------------------------------------------
# 6. Registration runs the cheap conformance checks
# --------------------------------------------------------------------------------------------------


class Reconstruct(HalfSquaredError):
    name = "reconstruct_test"

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value, None, {})


class WrongGradient(Reconstruct):
    name = "wrong_gradient"

    def token_loss_grad(self, prediction, target):
        return 2.0 * (prediction - target)  # the loss is 1/2 ||p - y||^2: the factor 2 is wrong


class FreshNoise(Reconstruct):
    """The old README example: fresh noise on every call."""

    name = "fresh_noise"

    def pairs(self, views, carry):
        return LossPairs(views.key + 0.1 * torch.randn_like(views.key), views.value, None, {})


class LooksAhead(Reconstruct):
    """Reconstructs each token's value from the next token's key: not causal."""

    name = "looks_ahead"

    def pairs(self, views, carry):
        return LossPairs(torch.roll(views.key, -1, dims=2), views.value, None, {})


class ChunkStart(Reconstruct):
    """Subtracts the first key of the chunk it is given: causal, but the pairs depend on where a
    sequence is cut (the first key of the sequence should have been carried)."""

    name = "chunk_start"

    def pairs(self, views, carry):
        return LossPairs(views.key - views.key[:, :, :1], views.value, None, {})


class ForwardWithoutBias(StackModel):
    """Declares ``x @ W1 + b1`` but computes ``x @ W1``: the dual form and the primal form disagree."""

    name = "forward_without_bias"

    @property
    def stack(self):
        return (AffineLayer("W1", "b1", None),)

    def param_shapes(self, head_dim):
        return {"W1": (head_dim, head_dim), "b1": (1, head_dim)}

    def init_params(self, num_heads, head_dim, generator=None):
        return LinearModel().init_params(num_heads, head_dim, generator)

    def forward(self, params, x):
        return x @ params["W1"]


TANH_WRONG_DERIVATIVE = Activation("tanh", torch.tanh, lambda z: 1 - z**2)  # should be 1 - tanh(z)^2


class WrongActivationDerivative(StackModel):
    name = "wrong_activation_derivative"

    @property
    def stack(self):
        return (AffineLayer("W1", "b1", TANH_WRONG_DERIVATIVE), AffineLayer("W2", "b2", None))

    def param_shapes(self, head_dim):
        return {
            "W1": (head_dim, head_dim),
            "b1": (1, head_dim),
            "W2": (head_dim, head_dim),
            "b2": (1, head_dim),
        }

    def init_params(self, num_heads, head_dim, generator=None):
        shapes = self.param_shapes(head_dim)
        return {k: 0.02 * torch.randn(num_heads, *shape, generator=generator) for k, shape in shapes.items()}


class RenamedGD(MiniBatchGD):
    name = "renamed_gd"


class FineModel(LinearModel):
    name = "fine_model"


class ForgetsTau(MiniBatchGD):
    """Mini-batch GD that ignores the token-index scale ``tau`` (uses 1 for every token)."""

    name = "forgets_tau"

    def forward(self, state, task, views, lr, tau):
        return super().forward(state, task, views, lr, torch.ones_like(tau))


class HeadMixing(MiniBatchGD):
    """Shares one learning rate across the batch and the heads: right at one sequence and one head."""

    name = "head_mixing"

    def forward(self, state, task, views, lr, tau):
        return super().forward(state, task, views, lr.mean(dim=(0, 1), keepdim=True).expand_as(lr), tau)


class HuberWrongTail(Reconstruct):
    """The Huber loss (delta 3) whose closed-form gradient clips at 6, not 3: right for small errors,
    wrong wherever an error is over 3."""

    name = "huber_wrong_tail"
    delta = 3.0

    def token_loss(self, prediction, target):
        return torch.nn.functional.huber_loss(prediction, target, reduction="none", delta=self.delta).sum(-1)

    def token_loss_grad(self, prediction, target):
        return (prediction - target).clamp(-2 * self.delta, 2 * self.delta)


@pytest.mark.parametrize(
    ("plugin", "match"),
    [
        (
            PluginWith(losses=[WrongGradient()]),
            r"'wrong_gradient' fails a conformance check: .*token_loss_grad",
        ),
        (PluginWith(losses=[FreshNoise()]), r"'fresh_noise' fails .*pairs\(\) is not deterministic"),
        (PluginWith(losses=[LooksAhead()]), r"'looks_ahead' fails .*pairs causal"),
        (PluginWith(losses=[ChunkStart()]), r"'chunk_start' fails .*chunked at"),
        (PluginWith(models=[ForwardWithoutBias()]), r"forward vs its declared stack: relative error"),
        (PluginWith(models=[WrongActivationDerivative()]), r"derivative of activation 'tanh' vs autograd"),
        (PluginWith(rules=[ForgetsTau()]), r"update rule 'forgets_tau' fails a conformance check: .*naive"),
        (PluginWith(rules=[HeadMixing()]), r"update rule 'head_mixing' fails a conformance check: .*naive"),
        (
            PluginWith(losses=[HuberWrongTail()]),
            r"'huber_wrong_tail' fails a conformance check: .*token_loss_grad",
        ),
    ],
    ids=[
        "loss-gradient",
        "loss-pairs-random",
        "loss-not-causal",
        "loss-chunk-dependent",
        "stack-vs-forward",
        "activation-derivative",
        "update-rule",
        "update-rule-mixing-heads",
        "loss-gradient-wrong-in-its-tails",
    ],
)
def test_a_plugin_that_computes_wrong_numbers_is_refused_with_the_reason(plugin, match):
    registry = build_registry(include_external=False)
    before = snapshot(registry)
    with pytest.raises(PluginError, match=match):
        registry.add_plugin(plugin, origin="wrong")
    assert snapshot(registry) == before


@pytest.mark.parametrize("seed", range(8))
def test_a_verdict_does_not_depend_on_the_callers_seed(seed):
    registry = build_registry(include_external=False)
    torch.manual_seed(seed)
    with pytest.raises(PluginError, match="huber_wrong_tail"):
        registry.add_plugin(PluginWith(losses=[HuberWrongTail()]), origin="wrong")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"inner_loss": WrongGradient()}, r"inner loss 'wrong_gradient' fails a conformance check"),
        ({"inner_loss": HuberWrongTail()}, r"inner loss 'huber_wrong_tail' fails a conformance check"),
        ({"update_rule": HeadMixing()}, r"update rule 'head_mixing' fails a conformance check"),
        ({"update_rule": ForgetsTau()}, r"update rule 'forgets_tau' fails a conformance check"),
    ],
    ids=["loss-gradient", "loss-tails", "rule-mixing-heads", "rule-without-tau"],
)
def test_a_plugin_given_as_an_instance_meets_the_registrars_checks(options, match):
    with pytest.raises(PluginError, match=match):
        innerloop.TTTLayer(8, 2, mini_batch_size=2, **options)
    q = k = v = torch.randn(1, 2, 4, 4)
    with pytest.raises(PluginError, match=match):
        innerloop.ops.scan(q, k, v, torch.full((1, 2, 4), 0.1), mini_batch_size=2, **options)


@pytest.mark.slow  # ~0.8 s: instances of every kind checked as registration checks them
def test_a_right_plugin_given_as_an_instance_is_accepted():
    loss, rule = Reconstruct(), RenamedGD()
    layer = innerloop.TTTLayer(8, 2, mini_batch_size=2, inner_loss=loss, update_rule=rule)
    reference = innerloop.TTTLayer(8, 2, mini_batch_size=2, update_rule="minibatch_gd")
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(1, 6, 8)
    torch.testing.assert_close(layer(x)[0], reference(x)[0])


@pytest.mark.slow  # ~0.9 s: every kind of plugin registered, each with its conformance checks
def test_correct_plugins_of_every_kind_are_accepted_and_the_seed_does_not_move():
    registry = build_registry(include_external=False)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    registry.add_plugin(
        PluginWith(losses=[Reconstruct()], models=[FineModel()], rules=[RenamedGD()]), origin="fine"
    )
    assert torch.equal(torch.rand(3), expected)  # the checks drew from a forked generator
    assert "reconstruct_test" in registry.names("inner_loss") and "renamed_gd" in registry.names(
        "update_rule"
    )
    assert "fine_model" in registry.names("inner_model")


@pytest.mark.parametrize("model", [ForwardWithoutBias(), WrongActivationDerivative()], ids=lambda m: m.name)
def test_check_inner_model_catches_what_registration_refuses(model):
    with pytest.raises(AssertionError, match="declared stack|derivative of activation"):
        check_inner_model(model)


def test_check_inner_loss_names_a_non_deterministic_pairs():
    with pytest.raises(AssertionError, match=r"pairs\(\) is not deterministic"):
        check_inner_loss(FreshNoise())


def readme_plugin_block() -> str:
    section = README.read_text().split("## Plugins", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Plugins section has one python example"
    return blocks[0]


@pytest.mark.slow  # check_inner_loss on the README's plugin: ~0.45 s
def test_the_readme_plugin_example_runs_and_passes_check_inner_loss(fresh_global_registry):
    namespace: dict = {}
    exec(compile(readme_plugin_block(), str(README), "exec"), namespace)
    assert isinstance(namespace["layer"], innerloop.TTTLayer)
    losses = [v for v in namespace.values() if isinstance(v, type) and issubclass(v, innerloop.InnerLoss)]
    registered = [innerloop.get_registry().inner_loss(cls.name) for cls in losses if hasattr(cls, "name")]
    assert registered, "the README example registers an inner loss"
    for loss in registered:
        check_inner_loss(loss)


# --------------------------------------------------------------------------------------------------
# 14. A refused registration leaves the registry exactly as it was
# --------------------------------------------------------------------------------------------------


class Named(Reconstruct):
    def __init__(self, name):
        self.name = name


class RaisesAfterOne:
    @hookimpl
    def register_inner_models(self, register):
        register(FineModel())

    @hookimpl
    def register_inner_losses(self, register):
        raise RuntimeError("the plugin's own bug")


class Cell:
    """A plugin class as written in a notebook cell (re-running the cell makes a new instance)."""

    @hookimpl
    def register_inner_losses(self, register):
        register(Named("cell_loss"))


FIRST = PluginWith(losses=[Named("first_loss")])

FAILURES = {
    "same-object-twice": (FIRST, "first", r"already registered \(this same object\); nothing was changed"),
    "same-origin-new-object": (PluginWith(losses=[Named("other")]), "first", "a plugin named 'first' is already"),
    "name-twice-in-one-plugin": (PluginWith(losses=[Named("twice"), Named("twice")]), "p", "'twice' twice"),
    "name-of-another-plugin": (PluginWith(losses=[Named("first_loss")]), "p", "already registered by plugin 'first'"),
    "validator-fails-mid-plugin": (
        PluginWith(models=[FineModel()], losses=[Named("ok_loss"), WrongGradient()]),
        "p", "token_loss_grad",
    ),
    "hook-raises-mid-plugin": (RaisesAfterOne(), "p", "the plugin's own bug"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_refused_registration_leaves_the_registry_as_it_was(case):
    registry = build_registry(include_external=False)
    registry.add_plugin(FIRST, origin="first")
    before = snapshot(registry)
    plugin, origin, match = FAILURES[case]
    with pytest.raises((PluginError, RuntimeError), match=match):
        registry.add_plugin(plugin, origin=origin)
    assert snapshot(registry) == before
    assert registry.inner_loss("first_loss").name == "first_loss"


def test_rerunning_a_notebook_cell_keeps_the_first_registration(fresh_global_registry):
    innerloop.register(Cell())
    before = snapshot(innerloop.get_registry())
    with pytest.raises(PluginError, match=r"remove_plugin\('Cell'\) first"):
        innerloop.register(Cell())
    assert snapshot(innerloop.get_registry()) == before
    innerloop.TTTLayer(16, 2, inner_loss="cell_loss")


# --------------------------------------------------------------------------------------------------
# A plugin that would register nothing (a hook returns its object, no hook, a misspelt hook) is refused
# --------------------------------------------------------------------------------------------------


class ReturnsItsLoss:
    """The reviewer's mistake: the hook returns the object instead of calling ``register``."""

    @hookimpl
    def register_inner_losses(self, register):
        return Named("returned_loss")


class RegistersThenReturns:
    @hookimpl
    def register_inner_models(self, register):
        register(FineModel())

    @hookimpl
    def register_inner_losses(self, register):
        register(Named("kept_loss"))
        return [Named("listed_loss")]


class UnmarkedHook:
    def register_inner_losses(self, register):  # no @hookimpl
        register(Named("unmarked_loss"))


class UnmarkedMisspelt:
    def register_inner_loss(self, register):  # singular, no @hookimpl
        register(Named("misspelt_loss"))


class MarkedMisspeltBesideAGoodHook:
    @hookimpl
    def register_inner_losses(self, register):
        register(Named("good_half_loss"))

    @hookimpl
    def register_update_rule(self, register):  # singular: not a hook
        register(MiniBatchGD())


def module_plugin(name: str, **functions) -> ModuleType:
    """A plugin module (what ``innerloop.register(my_module)`` gets) holding ``functions``."""
    module = ModuleType(name)
    for attribute, function in functions.items():
        setattr(module, attribute, function)
    return module


@hookimpl
def returning_hook(register):
    return Named("module_returned_loss")


HOOK_LIST = re.escape(str(list(manager.HOOK_NAMES)))
REFUSED_AS_EMPTY = {
    "hook-returns-its-object": (
        ReturnsItsLoss(),
        r"'p'.*register_inner_losses returned a Named named 'returned_loss'.*"
        r"call register\(obj\) instead of returning it",
    ),
    "hook-registers-then-returns": (
        RegistersThenReturns(),
        r"'p'.*register_inner_losses returned a list.*call register\(obj\) instead of returning it",
    ),
    "module-hook-returns": (
        module_plugin("returning_module", register_inner_losses=returning_hook),
        r"'p'.*register_inner_losses returned a Named named 'module_returned_loss'",
    ),
    "no-hook-at-all": (SimpleNamespace(), rf"'p'.*implements no innerloop hook.*{HOOK_LIST}"),
    "unmarked-hook": (
        UnmarkedHook(),
        r"no innerloop hook \(not decorated with @innerloop\.hookimpl: function 'register_inner_losses'\)",
    ),
    "unmarked-misspelt-hook": (
        UnmarkedMisspelt(),
        r"no innerloop hook.*'register_inner_loss' \(did you mean 'register_inner_losses'\?\)",
    ),
    "marked-misspelt-beside-good-hook": (
        MarkedMisspeltBesideAGoodHook(),
        rf"'p'.*'register_update_rule' \(did you mean 'register_update_rules'\?\), which is not a hook.*{HOOK_LIST}",
    ),
    "marked-unrelated-name": (
        module_plugin("odd_module", setup=hookimpl(lambda register: None)),
        rf"'p'.*function 'setup', which is not a hook; valid hook names: {HOOK_LIST}",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED_AS_EMPTY))
def test_a_plugin_that_would_register_nothing_is_refused_and_changes_nothing(case):
    registry = build_registry(include_external=False)
    registry.add_plugin(FIRST, origin="first")
    before = snapshot(registry)
    plugin, match = REFUSED_AS_EMPTY[case]
    with pytest.raises(PluginError, match=match):
        registry.add_plugin(plugin, origin="p")
    assert snapshot(registry) == before
    registry.add_plugin(PluginWith(losses=[Named("after_loss")]), origin="p")  # the origin is still free


def test_the_reviewers_returning_module_is_refused_by_innerloop_register(fresh_global_registry):
    plugin = module_plugin("my_plugin", register_inner_losses=returning_hook)
    before = snapshot(innerloop.get_registry())
    with pytest.raises(PluginError, match=r"'my_plugin'.*call register\(obj\) instead of returning it"):
        innerloop.register(plugin)
    assert snapshot(innerloop.get_registry()) == before


def test_the_example_plugin_package_still_registers(monkeypatch):
    monkeypatch.syspath_prepend(str(README.parent / "examples" / "innerloop-huber" / "src"))
    plugin = importlib.import_module("innerloop_huber.plugin")
    registry = build_registry(include_external=False)
    registry.add_plugin(plugin, origin="huber")
    assert [(e.kind, e.name) for e in registry.entries() if e.origin == "huber"] == [("inner_loss", "huber")]


def test_one_object_registration_and_the_built_in_plugins_still_register(fresh_global_registry):
    registry = build_registry(include_external=False)
    assert {"inner_model", "inner_loss", "update_rule", "kernel"} <= {e.kind for e in registry.entries()}
    assert all(e.origin.startswith(manager.BUILTIN_PREFIX) for e in registry.entries())
    assert innerloop.register_inner_loss(Named("one_object_loss")).name == "one_object_loss"
    assert innerloop.get_registry().inner_loss("one_object_loss").name == "one_object_loss"


# --------------------------------------------------------------------------------------------------
# 15. A broken external plugin is skipped with one warning
# --------------------------------------------------------------------------------------------------


class FakeEntryPoint:
    """What ``importlib.metadata.entry_points`` yields, with a ``load`` we choose."""

    def __init__(self, name, load, distribution):
        self.name, self.value, self._load = name, f"{name}_module", load
        self.dist = SimpleNamespace(name=distribution)

    def load(self):
        return self._load()


def fail_import():
    raise ModuleNotFoundError("No module named 'missing_dependency'")


class HookRaises:
    @hookimpl
    def register_inner_losses(self, register):
        register(Named("half_done_loss"))
        raise RuntimeError("hook exploded")


BROKEN = {
    "import-error": (fail_import, "missing_dependency", "some_loss"),
    "hook-raises": (HookRaises, "hook exploded", "half_done_loss"),
    "validator-refuses": (lambda: PluginWith(losses=[WrongGradient()]), "token_loss_grad", "wrong_gradient"),
    "hook-returns-its-object": (
        ReturnsItsLoss,
        "call register(obj) instead of returning it",
        "returned_loss",
    ),
    "no-hook": (UnmarkedMisspelt, "implements no innerloop hook", "misspelt_loss"),
}


@pytest.fixture(params=list(BROKEN))
def broken_entry_point(request, monkeypatch, fresh_global_registry):
    """The global registry sees one broken entry point and one good one; yields (error text, name asked)."""
    load, error, name = BROKEN[request.param]
    good = FakeEntryPoint("good", lambda: PluginWith(losses=[Named("good_loss")]), "good-dist")
    entry_points = [
        FakeEntryPoint("shaky", load if load is fail_import else lambda: load(), "shaky-dist"),
        good,
    ]
    monkeypatch.setattr(manager, "_entry_points", lambda: entry_points)
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv(manager.ALLOW_ENV, raising=False)
    return error, name


def assert_names_the_plugin(message: str, error: str) -> None:
    for part in ("'shaky'", "'shaky-dist'", error, DISABLE_ENV):
        assert part in message, (part, message)


def test_a_layer_still_builds_with_one_warning(broken_entry_point):
    error, _ = broken_entry_point
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        innerloop.TTTLayer(16, 2)
        innerloop.TTTLayer(16, 2)
    plugin_warnings = [w for w in caught if issubclass(w.category, PluginLoadWarning)]
    assert len(plugin_warnings) == 1
    assert_names_the_plugin(str(plugin_warnings[0].message), error)
    assert "good_loss" in innerloop.available("inner_loss")  # the good plugin after it still loads
    assert "half_done_loss" not in innerloop.available("inner_loss")  # nothing of the broken one


def test_asking_for_a_name_of_the_broken_plugin_fails_with_its_message(broken_entry_point):
    error, name = broken_entry_point
    with pytest.warns(PluginLoadWarning), pytest.raises(ValueError) as raised:
        innerloop.TTTLayer(16, 2, inner_loss=name)
    assert_names_the_plugin(str(raised.value), error)


def test_the_plugins_command_lists_the_broken_plugin(broken_entry_point, capsys):
    from innerloop.cli import main

    error, _ = broken_entry_point
    with pytest.warns(PluginLoadWarning):
        assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "good_loss" in out
    broken_section = out.split("broken plugins", 1)[1]
    assert "shaky (shaky-dist)" in broken_section and error in broken_section


def test_a_training_config_asking_for_its_name_fails_with_its_message(broken_entry_point, capsys):
    """`innerloop train` validates the config first: one line naming the broken plugin, exit 2."""
    from innerloop.cli import main

    error, name = broken_entry_point
    with pytest.warns(PluginLoadWarning):
        assert main(["train", f"model.ttt.inner_loss={name}", "out_dir=/nonexistent/never-written"]) == 2
    message = capsys.readouterr().err
    assert message.startswith("innerloop train: error: ") and message.count("\n") == 1
    assert_names_the_plugin(message, error)


class ReturnsWhatItRegistered:
    @hookimpl
    def register_inner_models(self, register):
        return register(FineModel())  # register returns its argument: nothing is dropped


def test_returning_what_register_returned_is_not_a_dropped_object():
    registry = build_registry(include_external=False)
    registry.add_plugin(ReturnsWhatItRegistered(), origin="returns-registered")
    assert FineModel.name in registry.names("inner_model")
