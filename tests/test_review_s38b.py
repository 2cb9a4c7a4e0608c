"""Review s38b: module hygiene and numerics from a new angle (forward-mode AD through attention)."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch.func import functional_call, grad, jvp, vmap

from innerloop.models import build_model
from innerloop.models.attention import sliding_window_attention


def _qkv() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, 12, 4, dtype=torch.float64, generator=gen) for _ in range(4))


def _central_difference(q, k, v, tangent, bounds):
    eps = 1e-6
    ahead = sliding_window_attention(q + eps * tangent, k, v, 5, bounds)
    behind = sliding_window_attention(q - eps * tangent, k, v, 5, bounds)
    return (ahead - behind) / (2 * eps)


def test_attention_forward_ad_dual_tensor_matches_finite_differences():
    # CPU's fused SDPA kernel has no forward derivative: a dual query met torch's bare NotImplementedError
    q, k, v, tangent = _qkv()
    bounds = [0, 7, 12]
    with forward_ad.dual_level():
        out = sliding_window_attention(forward_ad.make_dual(q, tangent), k, v, 5, bounds)
        got = forward_ad.unpack_dual(out).tangent
    torch.testing.assert_close(got, _central_difference(q, k, v, tangent, bounds), rtol=1e-6, atol=1e-8)


def test_attention_func_jvp_matches_finite_differences():
    q, k, v, tangent = _qkv()
    bounds = [0, 12]
    _, got = jvp(lambda z: sliding_window_attention(z, k, v, 5, bounds), (q,), (tangent,))
    torch.testing.assert_close(got, _central_difference(q, k, v, tangent, bounds), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mixer", ["ttt", "e2e"])
def test_vmap_over_input_ids_is_one_error_naming_them(mixer):
    # it met torch's bare 'Cannot access data pointer of Tensor that doesn't have storage' (the id range check)
    section = {"vocab_size": 11, "hidden_size": 8, "num_layers": 2, "num_heads": 2}
    if mixer == "e2e":
        section.update(mixer="e2e", intermediate_size=16, window=4)
    model = build_model(section)
    ids = torch.randint(0, 11, (2, 5))
    with pytest.raises(TypeError, match=r"input_ids is batched by a torch.func transform \(vmap\)"):
        vmap(lambda row: model(row[None])[0][0])(ids)


@pytest.mark.parametrize("transform", ["jvp", "grad"])
def test_e2e_under_a_func_transform_is_one_clear_error(transform):
    # it met torch's bare 'You are attempting to call Tensor.requires_grad_() ... functorch transform' from
    # the inner step (any torch.func transform): now one TypeError naming the autograd remedies
    model = build_model(
        {
            "mixer": "e2e",
            "vocab_size": 11,
            "hidden_size": 8,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 16,
        }
        | {"window": 4, "e2e": {"chunk_size": 4}}
    )
    ids = torch.randint(0, 11, (1, 6))  # its first chunk trains (the token after it has been read)
    weight = model.embed.weight.detach()

    def logits(w):
        return functional_call(model, {"embed.weight": w}, (ids,))[0]

    with pytest.raises(TypeError, match=r"torch.func transforms .*forward_ad"):
        if transform == "jvp":
            jvp(logits, (weight,), (torch.ones_like(weight),))
        else:
            grad(lambda w: logits(w).sum())(weight)
