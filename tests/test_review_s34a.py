"""Review s34a: what a plugin model's ``init_params`` returns becomes each layer's own weights."""

from __future__ import annotations

import torch

import innerloop
from innerloop.plugins.models.linear import LinearModel


class SharedAcrossHeads(LinearModel):
    """One initial matrix for every head, returned as an ``expand`` view (heads share its memory)."""

    name = "shared_across_heads"

    def init_params(self, num_heads, head_dim, generator=None):
        weight = torch.randn(1, head_dim, head_dim, generator=generator) * 0.02
        return {
            "W1": weight.expand(num_heads, -1, -1),
            "b1": torch.zeros(1, 1, head_dim).expand(num_heads, -1, -1),
        }


class CachedInit(LinearModel):
    """Makes its initial weights once and returns the same tensors again (a cache)."""

    name = "cached_init"

    def __init__(self) -> None:
        self.cached = {}

    def init_params(self, num_heads, head_dim, generator=None):
        if (num_heads, head_dim) not in self.cached:
            self.cached[num_heads, head_dim] = super().init_params(num_heads, head_dim, generator)
        return self.cached[num_heads, head_dim]


def test_an_expanded_initial_weight_trains_with_adamw_each_head_its_own() -> None:
    layer = innerloop.TTTLayer(8, 2, inner_model=SharedAcrossHeads(), mini_batch_size=2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.randn(2, 4, 8))[0].pow(2).sum().backward()
    optimizer.step()  # raised "more than one element of the written-to tensor refers to a single memory location"
    weight = layer.initial_params["W1"]
    assert not torch.equal(weight[0], weight[1])  # each head trained on its own gradient


def test_two_layers_of_a_model_that_caches_its_init_do_not_share_weights() -> None:
    model = CachedInit()
    first, second = (innerloop.TTTLayer(8, 2, inner_model=model) for _ in range(2))
    with torch.no_grad():
        first.initial_params["W1"].add_(1.0)
    assert not torch.equal(first.initial_params["W1"], second.initial_params["W1"])
