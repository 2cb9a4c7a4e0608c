"""Whole reference models (ttt-lm-pytorch ``TTTForCausalLM``) of configurations the two fixtures in
tests/data/models do not have, against numbers the reference itself computed (review s20).

Each case is a tiny model whose weights are a fixed formula of the reference's own key names
(:func:`weight`), so nothing but the expected numbers is stored. The numbers come from the
reference's ``ttt.py`` run in float64 on CPU (torch 2.13.0), with two changes that only widen its
float32 casts: its ``RMSNorm`` normalises in float64 instead of float32 and its logits are not cast to
float32 (in float32 both are the same code). The cases cover what the fixtures (mini-batch 8, one
width, base lr 1, RoPE theta 1e4, conv kernel 4, only the two pure backbones, logits only) leave out:
mini-batches of 1, 2, 3, 5 and 16 (the last longer than the sequence), base learning rates 0 and 3.7,
other RoPE thetas, conv kernels 2, 3 and 5, pre-conv / shared-QK / gate mixed outside the two
backbones, ``pretraining_tp=2``, tied heads with a padding row, ``swish``, 1 and 3 layers, a learnable
token index clamped at zero, and the loss gradient of every parameter.

Per case: the logits of one call, the loss, a projection of every parameter's gradient (one scalar
that any wrong gradient moves) and the logits of a prefill followed by token-by-token decoding.
TTT-MLP's outer gradients differ from the reference's by up to ~3e-8 relative per tensor, by design
(innerloop differentiates tanh-GELU with the reference's own polynomial, innerloop/core/functional.py);
with the reference's polynomial in its outer backward too, every gradient agrees to ~1e-13.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from innerloop.interop.ttt_lm_pytorch import _reference_key, load_model, model_config
from innerloop.models import CausalLM

#: name -> (TTTConfig fields, batch, length, prefill length, learnable_token_idx scale)
CASES: dict[str, tuple[dict, int, int, int, float]] = {
    "linear_mb1_tied_pad": (  # RoPE is the identity here: every token is position 0 of its mini-batch
        dict(
            hidden_size=16,
            num_attention_heads=2,
            mini_batch_size=1,
            ttt_layer_type="linear",
            tie_word_embeddings=True,
            pad_token_id=0,
            num_hidden_layers=1,
        ),
        2,
        6,
        2,
        0.02,
    ),
    "mlp_mb3_shareqk_only_k2_lr0.5_tp2": (
        dict(
            hidden_size=24,
            num_attention_heads=1,
            mini_batch_size=3,
            ttt_layer_type="mlp",
            share_qk=True,
            conv_kernel=2,
            ttt_base_lr=0.5,
            pretraining_tp=2,
            num_hidden_layers=1,
        ),
        1,
        10,
        4,
        0.02,
    ),
    "linear_mb5_preconv_gate_k3_eps0.05_theta500": (
        dict(
            hidden_size=32,
            num_attention_heads=2,
            mini_batch_size=5,
            ttt_layer_type="linear",
            pre_conv=True,
            use_gate=True,
            conv_kernel=3,
            rms_norm_eps=0.05,
            rope_theta=500.0,
            num_hidden_layers=2,
        ),
        2,
        12,
        7,
        0.02,
    ),
    "mlp_mb2_mamba_k5_theta1e6_lr3.7": (
        dict(
            hidden_size=16,
            num_attention_heads=2,
            mini_batch_size=2,
            ttt_layer_type="mlp",
            pre_conv=True,
            share_qk=True,
            use_gate=True,
            conv_kernel=5,
            rope_theta=1e6,
            ttt_base_lr=3.7,
            num_hidden_layers=1,
        ),
        2,
        9,
        3,
        0.02,
    ),
    "linear_mb16_longer_than_T_lr0_swish_3layers": (
        dict(
            hidden_size=32,
            num_attention_heads=4,
            mini_batch_size=16,
            ttt_layer_type="linear",
            ttt_base_lr=0.0,
            hidden_act="swish",
            num_hidden_layers=3,
        ),
        1,
        7,
        3,
        0.02,
    ),
    "linear_mb8_token_idx_clamped_shareqk_gate": (
        dict(
            hidden_size=16,
            num_attention_heads=1,
            mini_batch_size=8,
            ttt_layer_type="linear",
            share_qk=True,
            use_gate=True,
            num_hidden_layers=1,
        ),
        3,
        11,
        5,
        0.6,
    ),
    "mlp_mb5_token_idx_clamped_preconv_tied": (
        dict(
            hidden_size=16,
            num_attention_heads=2,
            mini_batch_size=5,
            ttt_layer_type="mlp",
            pre_conv=True,
            tie_word_embeddings=True,
            pad_token_id=3,
            num_hidden_layers=2,
        ),
        2,
        12,
        6,
        0.6,
    ),
}
COMMON = dict(vocab_size=24, intermediate_size=20, tie_word_embeddings=False)

#: name -> (loss, logits projection, gradient projection, number of parameter tensors), from the reference.
EXPECTED: dict[str, tuple[float, float, float, int]] = {
    "linear_mb16_longer_than_T_lr0_swish_3layers": (
        2.8389721835387456,
        1.3964807228587075,
        0.35596405574480705,
        57,
    ),
    "linear_mb1_tied_pad": (5.6254708131027495, -12.648663923232949, 1.9033079204325396, 20),
    "linear_mb5_preconv_gate_k3_eps0.05_theta500": (
        3.08402244682249,
        1.1192614300658792,
        1.5295896561583748,
        47,
    ),
    "linear_mb8_token_idx_clamped_shareqk_gate": (
        3.9072585140759934,
        4.701660145620325,
        0.4890389417694436,
        25,
    ),
    "mlp_mb2_mamba_k5_theta1e6_lr3.7": (4.068604612157803, 2.8418803712469045, 0.6365997312906502, 30),
    "mlp_mb3_shareqk_only_k2_lr0.5_tp2": (3.0316321843132936, 4.906803468393037, -0.8838384191636927, 26),
    "mlp_mb5_token_idx_clamped_preconv_tied": (
        6.0656429474778495,
        -10.008620908458829,
        5.611276740284362,
        48,
    ),
}


def config(name: str) -> dict:
    return {**COMMON, **CASES[name][0]}


def _phase(name: str) -> float:
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % 997 / 97.0


def _wave(name: str, shape, a: float, b: float) -> torch.Tensor:
    i = torch.arange(math.prod(shape), dtype=torch.float64)
    return (torch.sin(i * a + _phase(name)) * torch.cos(i * b + 2 * _phase(name))).reshape(shape)


def weight(name: str, shape, token_idx_scale: float) -> torch.Tensor:
    """The value of the reference's tensor ``name`` in every case: a fixed formula of its key."""
    s = 2 * _wave(name, shape, 2.3999, 0.6180)
    if name.endswith("norm.weight") or name.endswith("ttt_norm_weight"):
        return 1 + 0.2 * s
    if name.endswith("learnable_token_idx"):
        return token_idx_scale * s
    if name.endswith("bias"):
        return 0.1 * s
    if name.endswith("embed_tokens.weight"):
        return 0.7 * s
    return s * (0.8 / math.sqrt(shape[-1] if len(shape) > 1 else 1))


def direction(name: str, shape) -> torch.Tensor:
    return _wave(name, shape, 1.1, 0.37)


def input_ids(name: str) -> torch.Tensor:
    _, batch, length, _, _ = CASES[name]
    return (torch.arange(batch * length) * 7 + 3).remainder(COMMON["vocab_size"]).reshape(batch, length)


def loss_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def projections(logits: torch.Tensor, grads: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(logits . direction, sum over the reference's parameter names of grad . direction)."""
    shape = tuple(logits.shape)
    logit_sum = (logits.double() * direction("logits", shape)).sum().item()
    grad_sum = sum(
        (grads[k].double() * direction(k, tuple(grads[k].shape))).sum().item() for k in sorted(grads)
    )
    return logit_sum, grad_sum


def reference_names(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The reference's parameter keys and shapes for ``cfg`` (a tied head is the embedding's key)."""
    model = CausalLM(model_config(cfg))
    names = {}
    for key, parameter in model.named_parameters():  # a tied head appears once, as the embedding
        names[_reference_key(key)] = tuple(parameter.shape)
    return names


def _load(tmp_path, name: str):
    cfg = config(name)
    scale = CASES[name][4]
    weights = {k: weight(k, shape, scale).contiguous() for k, shape in reference_names(cfg).items()}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "ttt"}))
    save_file(weights, str(tmp_path / "model.safetensors"))
    return load_model(tmp_path)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_gradients_and_decoding_equal_the_reference_in_float64(tmp_path, name):
    model = _load(tmp_path, name)
    assert model.embed.weight.dtype == torch.float64
    ids = input_ids(name)
    logits, _ = model(ids)
    loss = loss_of(logits, ids)
    loss.backward()
    # a tied head is one parameter, listed once as the embedding: as the reference's named_parameters
    grads = {_reference_key(k): p.grad for k, p in model.named_parameters()}
    logit_sum, grad_sum = projections(logits.detach(), grads)
    expected_loss, expected_logits, expected_grads, count = EXPECTED[name]
    assert len(grads) == count
    assert abs(loss.item() - expected_loss) <= 1e-11 * abs(expected_loss)
    assert abs(logit_sum - expected_logits) <= 1e-11 * max(1.0, abs(expected_logits))
    mlp = config(name)["ttt_layer_type"] == "mlp"
    assert abs(grad_sum - expected_grads) <= (1e-8 if mlp else 1e-11) * abs(expected_grads)

    prefill = CASES[name][3]
    with torch.no_grad():
        pieces, state = [], None
        first, state = model(ids[:, :prefill])
        pieces.append(first)
        for t in range(prefill, ids.shape[1]):
            step, state = model(ids[:, t : t + 1], state)
            pieces.append(step)
        decoded = torch.cat(pieces, dim=1)
    assert abs(projections(decoded, {})[0] - expected_logits) <= 1e-11 * max(1.0, abs(expected_logits))
    assert (decoded - logits.detach()).abs().max().item() <= 1e-12 * logits.detach().abs().max().item()
