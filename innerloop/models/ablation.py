"""The same weights with test-time training switched off: what learning at test time contributes.

``with no_test_time_training(model): logits, _ = model(ids)`` runs ``model`` with

- every :class:`~innerloop.core.layer.TTTLayer` (any inner model, loss and update rule) at inner
  learning rate 0 (``base_lr = 0``): every token's inner step is zero, so the inner weights stay at the
  learned initial ones for the whole sequence, and each output is the initial inner model's;
- an :class:`~innerloop.models.E2ELM` with ``e2e.test_time_training`` off: the prime MLPs stay fixed at
  their meta-learned weights (the same network as a sliding-window Transformer).

Everything else (projections, gates, norms, attention) is unchanged, and the model is restored when the
block exits, also on an error. Models without test-time training run unchanged (the context yields 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from torch import nn

from innerloop.core.layer import TTTLayer
from innerloop.models.e2e import E2ELM


def modules_learning_at_test_time(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that learn at test time (TTT layers with ``base_lr > 0``,
    E2E models with ``test_time_training`` on); ``""`` is the model itself."""
    return [
        name
        for name, module in model.named_modules()
        if (isinstance(module, TTTLayer) and module.base_lr > 0)
        or (isinstance(module, E2ELM) and module.config.e2e.test_time_training)
    ]


@contextmanager
def no_test_time_training(model: nn.Module) -> Iterator[int]:
    """Switch test-time training off in ``model`` inside the ``with`` block (see the module doc).

    Yields how many modules were switched off (TTT layers and E2E models); 0 for a model that has no
    test-time training to switch off. Not thread-safe: the model is changed in place while the block
    runs.
    """
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
