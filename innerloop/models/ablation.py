"""The same weights with test-time training switched off: what learning at test time contributes.

``with no_test_time_training(model): logits, _ = model(ids)`` runs ``model`` with

- every :class:`~innerloop.core.layer.TTTLayer` (any inner model and loss) at inner learning rate 0
  (``base_lr = 0``): every token's inner step is zero, so the inner weights stay at the learned initial
  ones for the whole sequence, and each output is the initial inner model's. An update rule whose step
  does not vanish at learning rate 0 (a plugin's own optimizer) would still move them: that is measured
  on each layer (:func:`weights_moved_at_zero_lr`), one already at ``base_lr = 0`` too, and refused with
  a ``ValueError``;
- an :class:`~innerloop.models.E2ELM` with ``e2e.test_time_training`` off: the prime MLPs stay fixed at
  their meta-learned weights (the same network as a sliding-window Transformer).

Everything else (projections, gates, norms, attention) is unchanged, and the model is restored when the
block exits, also on an error. Models without test-time training run unchanged (the context yields 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from innerloop.core.layer import TTTLayer, plugin_label
from innerloop.core.protocol import Views
from innerloop.core.scan import run_scan
from innerloop.models.e2e import E2ELM


def modules_learning_at_test_time(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that learn at test time (TTT layers with ``base_lr > 0``, or at
    ``base_lr == 0`` with an update rule that moves the inner weights all the same, measured by
    :func:`weights_moved_at_zero_lr`; E2E models with ``test_time_training`` on); ``""`` is the model
    itself."""
    return [name for name, module in model.named_modules() if _learns_at_test_time(module)]


def _learns_at_test_time(module: nn.Module) -> bool:
    """Whether ``module`` is a TTT layer or an E2E model that learns at test time (see
    :func:`modules_learning_at_test_time`)."""
    if isinstance(module, TTTLayer):
        return module.base_lr > 0 or weights_moved_at_zero_lr(module) is not None
    return isinstance(module, E2ELM) and module.config.e2e.test_time_training


ZERO_LR_ROUNDING = 64
"""How far (in units of the scan dtype's eps, relative to the largest initial weight or output, or 1) the
weights and outputs of a rule at learning rate 0 may move (:func:`weights_moved_at_zero_lr`); the built-in
rules move neither (measured: 0 at head width 64 with the linear and MLP models)."""


def weights_moved_at_zero_lr(layer: TTTLayer, seed: int = 0) -> str | None:
    """None if ``layer``'s update rule keeps the inner weights where they start at inner learning rate 0
    (measured), else what moved: the rule and by how much.

    ``layer`` runs at ``base_lr == 0`` (as :func:`no_test_time_training` sets it; its own ``base_lr`` is
    restored, and so is its :attr:`~innerloop.core.layer.TTTLayer.dispatches` record) on two mini-batches
    of random input (``seed``, a generator of its own: the global RNG is not drawn from) through its own
    reading, gates and scan, twice: with the same queries and other keys and values. The weights after them must be the initial ones, and the outputs the same both times
    (weights that stay fixed read the queries alike, whatever the keys and values they would learn from).
    The mini-batch rules built on gradient descent pass (their step is ``lr`` times a gradient, checked at
    registration against the naive token loop); a plugin rule that is another inner optimizer (its own
    ``reference``) may step without ``lr``: a sign step of fixed size, an added constant."""
    base_lr, record = layer.base_lr, layer._dispatch_record()
    recorded = list(record)
    layer.base_lr = 0.0
    try:
        return _moved_at_current_lr(layer, seed)
    finally:
        layer.base_lr = base_lr
        record[:] = recorded


def _moved_at_current_lr(layer: TTTLayer, seed: int) -> str | None:
    """:func:`weights_moved_at_zero_lr`'s measurement, at the layer's ``base_lr`` as it is."""
    tokens = 2 * layer.mini_batch_size  # ends on a mini-batch boundary: the state's weights are W_T
    reference = next(iter(layer.initial_params.values()))
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(2, 1, tokens, layer.hidden_size, generator=generator, dtype=torch.float64)
    x, other = inputs.to(reference.device, reference.dtype)
    with torch.no_grad():
        state = layer.init_state(1, x)
        views, lr, tau, _ = layer._read(x, state)
        others = layer._read(other, state)[0]
        if not layer.update_rule.uses_token_scale:
            tau = None
        views, gates = layer.in_scan_dtype(views, lr, tau, *layer.scan_gates(x))
        task = layer.inner_task()
        runs = [
            run_scan(layer.update_rule, state, task, read, *gates[:4], decay_log=gates[4])
            for read in (
                views,
                Views(views.query, others.key.to(views.key.dtype), others.value.to(views.key.dtype)),
            )
        ]
        (outputs, new_state), (other_outputs, _) = runs
        moves = [(other_outputs - outputs, outputs)]
        moves += [(new_state.params[k] - state.params[k], state.params[k]) for k in state.params]
    moved = max(change.abs().max().item() for change, _ in moves)
    scale = max(1.0, *(start.abs().max().item() for _, start in moves))
    if moved <= ZERO_LR_ROUNDING * torch.finfo(outputs.dtype).eps * scale:
        return None
    return (
        f"the {plugin_label('update_rule', layer.update_rule)} moves the inner weights at inner learning "
        f"rate 0 (its weights or its outputs for other keys and values moved by {moved:.3g} over {tokens} "
        "random tokens): its step does not scale with the learning rate, so test-time training cannot be "
        "switched off by setting it to 0"
    )


def zero_lr_refusal(model: nn.Module) -> str | None:
    """Why :func:`no_test_time_training` refuses ``model``: the first TTT layer (by name) whose update
    rule moves the inner weights at learning rate 0 (:func:`weights_moved_at_zero_lr`, measured at
    ``base_lr = 0`` and then restored), or None when none does. A layer already at ``base_lr == 0`` is
    measured too: its rule may still move the weights, which switching cannot stop. ``innerloop eval``
    and ``compare`` ask before reading any window."""
    for name, module in model.named_modules():
        if isinstance(module, TTTLayer):
            moved = weights_moved_at_zero_lr(module)
            if moved is not None:
                return f"the TTT layer {name or '(the model itself)'!r}: {moved}"
    return None


@contextmanager
def no_test_time_training(model: nn.Module) -> Iterator[int]:
    """Switch test-time training off in ``model`` inside the ``with`` block (see the module doc).

    Yields how many modules were switched off (TTT layers and E2E models); 0 for a model that has no
    test-time training to switch off. Not thread-safe: the model is changed in place while the block
    runs.
    """
    refusal = zero_lr_refusal(model)
    if refusal is not None:
        raise ValueError(f"no_test_time_training: {refusal}")
    restore: list[tuple[nn.Module, str, object]] = []
    try:
        for module in model.modules():
            if isinstance(module, TTTLayer) and module.base_lr > 0:
                restore.append((module, "base_lr", module.base_lr))
                module.base_lr = 0.0
            elif isinstance(module, E2ELM) and module.config.e2e.test_time_training:
                config = module.config
                restore.append((module, "config", config))
                module.config = replace(config, e2e=replace(config.e2e, test_time_training=False))
        yield len(restore)
    finally:
        for module, name, value in reversed(restore):
            setattr(module, name, value)
