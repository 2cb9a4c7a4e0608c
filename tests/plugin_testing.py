"""Plugins for the tests: two plugin losses under one name, with different math, for the tests of what
checkpoints and exports record of their plugins (tests/train/test_checkpoint_plugin_origins.py, tests/hf/
test_export_plugin_origins.py: loading where the other one answers to the name must warn),
:class:`One`, a plugin object registering one object through one hook (the registry's tests),
:func:`without_key`, a checkpoint as written before one of its records existed, and
:class:`ModuleEntryPoint`, an installed entry point naming a module, :class:`DoubledGradient`, the
identity whose backward doubles the gradient (a plugin's or kernel's wrong hand-written backward), and
:func:`register_linear_dual_form_kernel`, a kernel of TTT-Linear's dual form registered as a plugin,
:data:`PLUGIN_LOSS_CLASS`, the source of a plugin loss class for plugin modules written by a test, and
:func:`plugin_module_folder`, the folder on ``sys.path`` those modules are written to."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import innerloop
from innerloop import HalfSquaredError, LossPairs, hookimpl
from innerloop.checkpoints import checkpoint_digest
from innerloop.kernels.spec import KernelSpec
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.registry import DISABLE_ENV, isolated_registry, manager
from innerloop.registry.modules import PLUGIN_MODULES_ENV

NAME = "origins_test_loss"


class DoubledGradient(torch.autograd.Function):
    """The identity forward, twice the gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class TargetsAsGiven(HalfSquaredError):
    """A plugin loss: the key view should reconstruct the value view."""

    name = NAME

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})


class TargetsDoubled(TargetsAsGiven):
    """Another plugin's loss under the same name, with other math (the model computes another function)."""

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=2 * views.value, valid=None, carry={})


class GradientByAutograd(Reconstruction):
    """reconstruction whose closed form takes ``torch.autograd.grad`` of ``token_loss`` (keeping the graph,
    so that its derivative is right): under ``torch.inference_mode`` (evaluation, generation) it raises."""

    name = "s64_gradient_by_autograd"

    def token_loss_grad(self, prediction, target):
        with torch.enable_grad():
            given = prediction if prediction.requires_grad else prediction.detach().requires_grad_()
            (grad,) = torch.autograd.grad(self.token_loss(given, target).sum(), given, create_graph=True)
        return grad


class ScaledWithoutGrad(Reconstruction):
    """reconstruction whose closed form is off by 1e-4 only when autograd is off."""

    name = "s64_scaled_without_grad"

    def token_loss_grad(self, prediction, target):
        grad = super().token_loss_grad(prediction, target)
        return grad if torch.is_grad_enabled() else grad * 1.0001


def class_name(cls: type) -> str:
    """``module.QualName``, as a plugin record names a plugin's class."""
    return f"{cls.__module__}.{cls.__qualname__}"


class One:
    """A plugin registering one object through the hook of ``kind``."""

    def __init__(self, kind: str, obj):
        def hook(register):
            register(obj)

        setattr(self, f"register_{kind}", hookimpl(hook))


def without_key(source: Path, target: Path, key: str) -> Path:
    """``source`` as innerloop wrote checkpoints before ``key`` existed (a plugin record, the source
    digests): the same tree without ``key``, with a valid checksum, written to ``target``."""
    with safe_open(str(source), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    tree = json.loads(metadata["innerloop.tree"])
    del tree[key]
    metadata["innerloop.tree"] = json.dumps(tree)
    metadata["innerloop.sha256"] = checkpoint_digest(metadata["innerloop.tree"], tensors)
    save_file(tensors, str(target), metadata=metadata)
    return target


class ModuleEntryPoint:
    """An installed entry point naming a module (``importlib.metadata``'s shape)."""

    def __init__(self, name: str, value: str) -> None:
        self.name, self.value = name, value
        self.dist = type("Dist", (), {"name": f"{name}-dist", "version": "0.1"})()

    def load(self) -> object:
        import importlib

        return importlib.import_module(self.value)


#: :func:`linear_dual_form_kernel`'s default priority: asked before every built-in kernel.
AHEAD_OF_THE_BUILT_INS = 10**6


def accept_every_input(inputs) -> None:
    """A kernel's ``verify`` that takes every block it is offered."""
    return None


def linear_dual_form_kernel(
    name: str, forward, *, verify=accept_every_input, priority: int = AHEAD_OF_THE_BUILT_INS, **fields
) -> KernelSpec:
    """A kernel for TTT-Linear's dual form (inner model ``linear``, loss ``reconstruction``, rule
    ``dual_form``) running ``forward``, with any other :class:`KernelSpec` field given (``decode``,
    ``training_only``, ...); by default it takes every block and is asked before the built-ins."""
    return KernelSpec(
        name=name,
        inner_model="linear",
        inner_loss="reconstruction",
        update_rule="dual_form",
        forward=forward,
        verify=verify,
        priority=priority,
        **fields,
    )


def register_linear_dual_form_kernel(name: str, forward, **fields) -> str:
    """Register :func:`linear_dual_form_kernel` ``(name, forward, **fields)`` in the process's registry
    (a test wraps this in the ``fresh_global_registry`` fixture or ``isolated_registry()``); returns
    ``name``."""
    innerloop.register_kernel(linear_dual_form_kernel(name, forward, **fields))
    return name


#: A plugin loss class (``{cls}``, named ``{name}``) for a plugin module's source: half the squared error
#: of the key's prediction of the value (``{{}}``: the template is filled with ``str.format``).
PLUGIN_LOSS_CLASS = """
class {cls}(InnerLoss):
    name = "{name}"

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={{}})

    def token_loss(self, prediction, target):
        return (prediction - target).pow(2).sum(dim=-1)
"""


@contextlib.contextmanager
def plugin_module_folder(folder: Path, monkeypatch, prefix: str) -> Iterator[Path]:
    """``folder`` put first on ``sys.path`` for plugin modules whose names start with ``prefix``, inside a
    fresh process registry with no installed plugin; the modules imported from there, and what the
    registry remembers of their imports, are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv(DISABLE_ENV, "1")
    monkeypatch.delenv(PLUGIN_MODULES_ENV, raising=False)
    modules_before = set(sys.modules)
    with isolated_registry():
        yield folder
    for name in set(sys.modules) - modules_before:
        if name.startswith(prefix):
            del sys.modules[name]
    for store in (manager._REGISTERED_AT_IMPORT, manager._ROLLED_BACK_AT_IMPORT):
        for key in [key for key in store if prefix in key]:
            del store[key]
