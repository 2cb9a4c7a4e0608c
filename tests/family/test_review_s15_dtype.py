"""Review s15 (dtype): the family's layers in float16 and bfloat16 compute their reductions and gates in
at least float32, as the state they write.

- HIGH-1: ``l2_normalize`` summed the squares of q and k in their dtype; in float16 the sum overflowed
  once a head's ``|q|^2`` passed 65504, ``rsqrt(inf) = 0`` zeroed q and k and the output was wrong by
  100%, finite, with no error.
- HIGH-2: the gates (Titans' decay, momentum and step, DeltaNet's beta) were computed in the weights'
  dtype; in bfloat16 a retention ``1 - decay`` below 2^-9 was exactly 0, which wiped Titans' memory.

Errors are relative RMS against the float64 copy of the same (rounded) weights, in units ``u`` of the
low dtype's unit roundoff (float16 2^-11, bfloat16 2^-8).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import innerloop.core.family_layers as family_layers
from innerloop.core.family_layers import (
    DeltaNetLayer,
    FamilyLayer,
    GatedDeltaNetLayer,
    LinearAttentionLayer,
    TitansLayer,
    l2_normalize,
)
from innerloop.models import ModelConfig, build_model

FP16_U, BF16_U = 2.0**-11, 2.0**-8
FLOAT16_MAX = torch.finfo(torch.float16).max
# Each float16 step of a layer (projections, short convs, SiLU, the normalised q and k, the output
# norm, gate and o_proj) rounds its result once, by at most u/2 relative; their errors add up to about
# 2u in the RMS (measured 1.2-1.9u over seeds), so 4u. The defect gave about 1 (2048u).
LARGE_QK_BOUND = 4 * FP16_U


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def test_l2_normalize_of_a_large_float16_vector_is_its_direction_not_zero() -> None:
    x = torch.full((2, 64), 100.0, dtype=torch.float16)  # sum of squares 640000 > 65504
    y = l2_normalize(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, torch.full_like(x, 1 / 8), rtol=FP16_U, atol=0)


@pytest.mark.parametrize("member", [DeltaNetLayer, GatedDeltaNetLayer, TitansLayer])
@pytest.mark.parametrize("mode", ["float16 weights", "float16 autocast"])
def test_float16_layers_with_large_q_and_k_match_float64(
    member: type[FamilyLayer], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    layer = member(64, 1)  # one head of 64: the sum of squares overflows at an RMS of 32
    with torch.no_grad():
        layer.q_proj.weight.mul_(200)
        layer.k_proj.weight.mul_(200)
    x = torch.randn(1, 32, 64)
    sums_of_squares = []
    unpatched = family_layers.l2_normalize

    def recording(t: torch.Tensor) -> torch.Tensor:
        sums_of_squares.append(float(t.double().pow(2).sum(-1).max()))
        return unpatched(t)

    monkeypatch.setattr(family_layers, "l2_normalize", recording)
    with torch.no_grad():
        if mode == "float16 weights":
            layer = layer.half()
            x = x.half()
            got, _ = layer(x)
        else:
            with torch.autocast("cpu", dtype=torch.float16):
                got, _ = layer(x)
        want, _ = copy.deepcopy(layer).double()(x.double())
    assert got.dtype == torch.float16
    assert max(sums_of_squares[:2]) > FLOAT16_MAX  # q's and k's sums of squares overflow float16
    assert _relative_error(got, want) <= LARGE_QK_BOUND


GATED_MEMBERS = {"deltanet": DeltaNetLayer, "gated_deltanet": GatedDeltaNetLayer, "titans": TitansLayer}


def _bfloat16_member(member: str) -> FamilyLayer:
    """A bfloat16 member whose gates sit near 1 for an input of ones, with logits exact in bfloat16 (so
    the float64 copy reads the same ones): +8 for the sigmoid gates (``1 - sigmoid = 3.4e-4``), and a
    retention ``1 - decay = exp(-5 * softplus(1.15))`` of 8e-4 for the forgetting gates."""
    torch.manual_seed(0)
    layer = GATED_MEMBERS[member](32, 2)
    with torch.no_grad():
        if hasattr(layer, "b_proj"):  # bias-free: 32 inputs of 1 times 0.25
            layer.b_proj.weight.fill_(0.25)
        for name in ("theta_proj", "eta_proj"):
            if hasattr(layer, name):
                getattr(layer, name).weight.zero_()
                getattr(layer, name).bias.fill_(8.0)
        if hasattr(layer, "a_proj"):
            layer.a_proj.weight.zero_()
            layer.A_log.fill_(math.log(5.0))
            layer.dt_bias.fill_(1.15)
    return layer.to(torch.bfloat16)


@pytest.mark.parametrize("member", list(GATED_MEMBERS))
def test_bfloat16_gates_near_one_keep_their_distance_to_one(member: str) -> None:
    """Every gate is float32, and ``1 - gate`` equals the float64 layer's (same bfloat16 weights and
    input) to float32's rounding of the gate (eps32 / (1 - gate) <= 2e-4 relative here): in bfloat16
    a gate above 1 - 2^-9 was exactly 1, so ``1 - gate`` was 0 (100% off)."""
    layer = _bfloat16_member(member)
    x = torch.ones(1, 16, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        gates = _gates(layer, x)
        expected = _gates(copy.deepcopy(layer).double(), x.double())
    assert gates.keys() == expected.keys()
    for name, gate in gates.items():
        assert gate.dtype == torch.float32, name
        distance, want = 1 - gate.double(), 1 - expected[name]
        assert float(want.min()) > 0, name
        assert float(want.max()) < 2.0**-9, name  # the bfloat16 gate would have been exactly 1
        assert float(((distance - want).abs() / want).max()) <= 1e-3, name


def _gates(layer: FamilyLayer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The layer's gates that sit near 1 by :func:`_bfloat16_member` (the step as ``lr / base_lr``)."""
    lr, _ = layer.inner_learning_rates(x)
    decay, momentum = layer.forgetting(x)
    gates = {"step": lr / layer.base_lr, "decay": decay, "momentum": momentum}
    return {name: gate for name, gate in gates.items() if gate is not None}


def test_a_family_layers_constant_lr_is_in_the_scan_dtype() -> None:
    """FamilyLayer's constant ``lr = base_lr`` is float32 in a bfloat16 layer: 0.1 in bfloat16 is
    0.10009765625, a step 1e-3 too large."""
    layer = LinearAttentionLayer(32, 2, base_lr=0.1).to(torch.bfloat16)
    lr, _ = layer.inner_learning_rates(torch.randn(1, 4, 32).to(torch.bfloat16))
    assert lr.dtype == torch.float32
    assert bool((lr == torch.tensor(0.1)).all())


def _strong_forgetting_titans_lm(dtype: torch.dtype) -> torch.nn.Module:
    """The review's case: a default one-block Titans LM whose mixer-norm gain grew (x40), so its gate
    logits are large, as trained gates can be: many retentions fall below 2^-9."""
    torch.manual_seed(0)
    config = {
        "mixer": "titans",
        "hidden_size": 128,
        "num_heads": 2,
        "num_layers": 1,
        "intermediate_size": 128,
        "init_std": 0.05,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(ModelConfig.from_dict(config))
    with torch.no_grad():
        model.blocks[0].mixer_norm.weight.mul_(40)
    return model.to(dtype)


# A bfloat16 model rounds once per step (norms, projections, convs, gate logits, output norm, o_proj,
# the MLP and the head; u/2 each): measured 1.8-3.2u over seeds, as under bf16 autocast (3.7u). 5u; the
# defect gave 45u (a memory wiped to LN(0) = its bias on the tokens whose retention rounded to 0).
STRONG_FORGETTING_BOUND = {torch.bfloat16: 5 * BF16_U, torch.float16: 5 * FP16_U}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_titans_lm_that_forgets_strongly_matches_float64(dtype: torch.dtype) -> None:
    model = _strong_forgetting_titans_lm(dtype)
    reference = copy.deepcopy(model).double()
    ids = torch.randint(256, (1, 32), generator=torch.Generator().manual_seed(0))
    inputs = {}
    hook = reference.blocks[0].mixer.register_forward_pre_hook(
        lambda _, args: inputs.setdefault("x", args[0])
    )
    with torch.no_grad():
        got, _ = model(ids)
        want, _ = reference(ids)
        decay, _ = reference.blocks[0].mixer.forgetting(inputs["x"])
    hook.remove()
    retention = 1 - decay
    assert int(((retention > 0) & (retention < 2.0**-9)).sum()) >= 4  # rounded to 0 in bfloat16 before
    assert _relative_error(got, want) <= STRONG_FORGETTING_BOUND[dtype]
