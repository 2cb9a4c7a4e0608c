"""The hooks an innerloop plugin implements.

A plugin is a module or object with functions decorated by ``innerloop.registry.hookimpl`` whose
names are the hooks below. Each hook receives a ``register`` callable (a typed registrar): call it
once per thing the plugin provides. The registrar checks the object against the protocol right
away and raises :class:`innerloop.registry.PluginError` with the reason if it does not conform.

Built-in plugins implement these hooks exactly as third-party plugins do; third-party plugins are
found through the ``innerloop`` entry-point group::

    [project.entry-points.innerloop]
    my_plugin = "my_package.plugin"
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("innerloop")


@hookspec
def register_inner_models(register) -> None:
    """Register inner models (the fast-weight networks).

    ``register(model)`` takes an instance of :class:`innerloop.core.protocol.InnerModel` with a
    unique ``name``. The registrar runs the model once on a tiny input to check that its
    parameters, initialisation and forward agree.
    """


@hookspec
def register_inner_losses(register) -> None:
    """Register self-supervised inner losses.

    ``register(loss)`` takes an instance of :class:`innerloop.core.protocol.InnerLoss` with a
    unique ``name``; the registrar checks that its pairs and per-token loss have the right shapes.
    """


@hookspec
def register_update_rules(register) -> None:
    """Register update rules (inner optimizers).

    ``register(rule)`` takes an instance of :class:`innerloop.core.protocol.UpdateRule` with a
    unique ``name``.
    """


@hookspec
def register_kernels(register) -> None:
    """Register fast paths.

    ``register(spec)`` takes a :class:`innerloop.kernels.spec.KernelSpec` naming the
    (inner model, inner loss, update rule) it computes and a ``verify`` that says when it can run.
    """


@hookspec
def register_model_inner_losses(register) -> None:
    """Register model-level inner losses (what a TTT-E2E model trains its fast weights on).

    ``register(loss)`` takes an instance of :class:`innerloop.core.model_inner.ModelInnerLoss` with a
    unique ``name``; the registrar checks that ``chunk_loss(logits [B, C, V], ids [B, C])`` returns
    one loss per sequence, ``[B]``.
    """


@hookspec
def register_model_update_rules(register) -> None:
    """Register model-level update rules (the per-chunk step of a TTT-E2E model's fast weights).

    ``register(rule)`` takes an instance of :class:`innerloop.core.model_inner.ModelUpdateRule` with a
    unique ``name``; the registrar runs ``step`` once on a tiny problem and checks that it returns
    new fast weights of the same names and shapes.
    """
