"""Review s54r: the leftovers of session 54's reviews."""

import pytest
import torch

from innerloop import InnerLoss, LossPairs
from innerloop.models import E2EConfig, ModelConfig, NonFiniteInnerStepError, build_model


def _e2e(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        mixer="e2e",
        window=8,
        hidden_size=16,
        num_heads=2,
        num_layers=2,
        e2e=E2EConfig(chunk_size=4, **options),
    )
    return build_model(config).eval()


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_e2e_huge_inner_lr_is_named_at_the_chunk_outside_training(clip) -> None:
    """model.e2e.inner_lr=1e30 gave inf/NaN logits with no error in eval: the first step's fast weights
    were huge but finite, the next chunk's logits NaN, and the plugin check blames only a plugin's NaN
    from finite inputs. Now the chunk, the fast weight and the inner rate are named."""
    model = _e2e(inner_lr=1e30, inner_grad_clip=clip)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad(), pytest.raises(NonFiniteInnerStepError) as caught:
        model(ids)
    said = str(caught.value)
    assert "inner step 2 of this call" in said
    assert "blocks.1.prime." in said
    assert "lower model.e2e.inner_lr (configured 1e+30)" in said


def test_e2e_non_finite_input_hidden_states_do_not_blame_the_inner_lr() -> None:
    """NaN hidden states entering the suffix (an outer divergence) are their own message, not the inner rate."""
    model = _e2e()
    with torch.no_grad():
        model.embed.weight.fill_(float("nan"))
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad(), pytest.raises(NonFiniteInnerStepError) as caught:
        model(ids)
    said = str(caught.value)
    assert "inner step 1 of this call" in said and "hidden states entering the suffix" in said
    assert "lower model.e2e.inner_lr" not in said


def test_e2e_finite_run_raises_nothing() -> None:
    model = _e2e()
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        assert bool(torch.isfinite(model(ids)[0]).all())


def test_the_lr_cap_says_why_it_holds_in_a_64_true_run_too() -> None:
    """optim.lr=1e39 was refused as "inf in float32, the weights' dtype", untrue in a 64-true run
    (float64 weights). The cap is one number for every precision and now says so."""
    from innerloop.config.load import validate_run_config
    from innerloop.config.schema import OptimConfig, RunConfig

    with pytest.raises(ValueError) as caught:
        validate_run_config(RunConfig(optim=OptimConfig(lr=1e39, weight_decay=0.0)))
    said = str(caught.value)
    assert "optim.lr=1e+39" in said
    assert "but 64-true" in said and "one cap for every precision" in said


class _NaNGradientLoss(InnerLoss):
    """An inner loss whose gradient is NaN once ``armed`` (after registration, which checks it)."""

    name = "review_s54r_nan_gradient"
    armed = False

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss(self, prediction, target):
        return 0.5 * (prediction - target).pow(2).sum(-1)

    def token_loss_grad(self, prediction, target):
        return (prediction - target) * (float("nan") if self.armed else 1.0)


@pytest.mark.slow  # ~1 s: a module built and one training step
def test_the_divergence_advice_names_the_configured_base_lr_during_its_warm_up(
    fresh_global_registry, monkeypatch
) -> None:
    """With optim.ttt_base_lr_warmup on, "lower model.ttt.base_lr (now X)" showed the warm-up's current
    layer.base_lr, not the configured model.ttt.base_lr the user would lower."""
    import innerloop
    from innerloop.models import TTTConfig
    from innerloop.train.module import LanguageModelModule, NonFiniteLayerOutputError

    innerloop.register_inner_loss(_NaNGradientLoss())
    monkeypatch.setattr(_NaNGradientLoss, "armed", True)
    torch.manual_seed(0)
    ttt = TTTConfig(mini_batch_size=8, inner_loss=_NaNGradientLoss.name, base_lr=2.0)
    config = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, ttt=ttt)
    module = LanguageModelModule(config, max_steps=2, warmup_steps=0)
    for layer in module.modules():  # as TTTBaseLRWarmup sets it, part-way through its warm-up
        if hasattr(layer, "plugin_nan_diagnosis"):
            layer.base_lr = 0.5
    ids = torch.randint(0, 64, (2, 17))
    with pytest.raises(NonFiniteLayerOutputError) as err:
        module.training_step((ids[:, :-1], ids[:, 1:]), 0)
    assert "lower model.ttt.base_lr (configured 2; 0.5 now, in its warm-up)" in str(err.value), str(err.value)
