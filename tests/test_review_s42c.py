"""Review s42c: the invariance matrix of every sequence layer (the session's report holds it).

A defect found on the way: a ``TTTLayer`` whose update rule takes no token scale (``momentum``) kept a
trainable ``learnable_token_idx`` it never reads, and DDP refuses such a parameter.
"""

from __future__ import annotations

import pytest
import torch

from innerloop import TTTLayer

RULES = ("dual_form", "minibatch_gd", "momentum")
D, H = 8, 2


def _x(batch: int, tokens: int, seed: int, width: int = D) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, width, generator=generator, dtype=torch.float64)


# ---- a defect found: the momentum rule's unread token offsets were trainable ----------------------------


@pytest.mark.parametrize("rule", RULES)
def test_every_trainable_parameter_of_a_ttt_layer_gets_a_gradient(rule):
    """DDP (trainer.strategy=ddp / ddp_spawn) refuses a trainable parameter that no loss reaches: the
    momentum rule takes no token scale, so its ``learnable_token_idx`` is frozen (kept in the state dict)."""
    torch.manual_seed(0)
    layer = TTTLayer(D, H, update_rule=rule, mini_batch_size=2, kernel="torch")
    y, _ = layer(_x(1, 3, seed=0).float())
    y.square().sum().backward()
    assert [n for n, p in layer.named_parameters() if p.requires_grad and p.grad is None] == []
    assert layer.learnable_token_idx.requires_grad == (rule != "momentum")
    assert "learnable_token_idx" in layer.state_dict()


@pytest.mark.slow  # ~30 s: two spawned processes import the training stack
def test_a_momentum_ttt_model_trains_on_two_processes(tmp_path):
    """Before the fix, the second process died: 'LightningModule has parameters that were not used in
    producing the loss returned by training_step' (seen)."""
    from lm_testing import TINY

    from innerloop.config import load_config
    from innerloop.train import train

    overrides = [
        *TINY,
        "trainer.max_steps=2",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.strategy=ddp_spawn",
        "model.ttt.update_rule=momentum",
        f"out_dir={tmp_path / 'run'}",
    ]
    run, cfg = load_config("tiny", overrides)
    result = train(run, cfg)
    assert result.checkpoint.is_file()
