"""Review s48d: the test-time-regression family (linear attention, DeltaNet, Gated DeltaNet, Titans) as
plugins, against FLA's references and ../shared/ZOO.md, at the shapes and gates the other tests leave out.

- A layer with the inner LayerNorm and heads of one feature (Titans at ``hidden_size == num_heads``, or
  any family layer given ``inner_norm=True`` there) ran without a word, but a LayerNorm over one feature
  is its bias whatever the memory holds: the memory was never read and its inner gradient was 0, a
  model that silently did no test-time training. The layer and the model config now refuse it.
"""

from __future__ import annotations

import pytest
import torch

from innerloop.core.family_layers import DeltaNetLayer, TitansLayer
from innerloop.models import ModelConfig
from innerloop.models.config import FamilyConfig, validate_model_config

# ---- the inner LayerNorm over heads of one feature -------------------------------------------------------


def test_a_layer_norm_over_one_feature_ignores_the_memory() -> None:
    """Why the width is refused: at head width 1 (built past the check) the memory's output does not
    depend on the memory, and the inner gradient w.r.t. it is 0."""
    from innerloop.ops import scan

    q, k, v = (torch.randn(1, 2, 6, 1, dtype=torch.float64) for _ in range(3))
    lr = torch.rand(1, 2, 6, dtype=torch.float64)
    start = torch.randn(1, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    other = 10 * start.detach() + 3
    out, _ = scan(q, k, v, lr, inner_model="matrix", update_rule="momentum", initial={"W": start})
    moved, _ = scan(q, k, v, lr, inner_model="matrix", update_rule="momentum", initial={"W": other})
    assert torch.equal(out, moved)
    (gradient,) = torch.autograd.grad(out.sum(), start)
    assert torch.count_nonzero(gradient) == 0


@pytest.mark.parametrize(
    "build",
    [
        lambda: TitansLayer(4, 4),
        lambda: TitansLayer(3, 3, inner_model="mlp"),
        lambda: DeltaNetLayer(6, 6, inner_norm=True),
        lambda: TitansLayer(1, 1),
    ],
    ids=["titans", "titans_mlp", "deltanet_inner_norm", "width_1"],
)
def test_the_inner_layer_norm_over_heads_of_one_feature_is_refused(build) -> None:
    with pytest.raises(ValueError, match=r"inner_norm=True needs heads of 2 or more features.*num_heads"):
        build()


def test_heads_of_one_feature_without_the_inner_layer_norm_stay_valid() -> None:
    layer = DeltaNetLayer(4, 4)  # the delta rule on scalars: defined, and what FLA computes too
    y, _ = layer(torch.randn(1, 3, 4))
    assert y.shape == (1, 3, 4)


def test_a_titans_model_config_with_heads_of_one_feature_is_refused() -> None:
    config = ModelConfig(
        mixer="titans", hidden_size=8, num_heads=8, intermediate_size=16, family=FamilyConfig()
    )
    with pytest.raises(ValueError, match=r"model\.num_heads.*valid num_heads.*\[1, 2, 4\]"):
        validate_model_config(config)
    validate_model_config(ModelConfig(mixer="deltanet", hidden_size=8, num_heads=8, intermediate_size=16))
