"""Tests from the fifth mutation round (review_s17_mutation5.md): each catches a mutant of correct code
that no other test noticed (K1, K6: the CPU kernel's layouts; C19: a NaN output's message; R3: the recall
task's gap; E6, E9, E11: an official E2E config's defaults and warm-up; L6, L8: reference checkpoints)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from innerloop.data.recall import RECALL_DISTRACTORS, recall_example
from innerloop.interop import ttt_lm_pytorch
from innerloop.interop.ttt_e2e import model_config, special_token_ids
from innerloop.interop.ttt_lm_pytorch import load_model
from innerloop.kernels.cpu import build
from innerloop.registry import get_registry
from innerloop.testing.checks import assert_finite_where_expected_is

DATA = Path(__file__).resolve().parent / "data"

B, H, T, F, K = 2, 2, 8, 4, 4


def _spec():
    build.load_library()
    return next(s for s in get_registry().kernels() if s.name == "cpu_ttt_linear")


def _inputs():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    xq, xk, xv = (r(B, H, T, F) for _ in range(3))
    lr = r(B, H, T).abs() * 0.1
    tau = torch.full((K,), 1.0 / K, dtype=torch.float64)
    params = {"W1": r(B, H, F, F) * 0.1, "b1": r(B, H, 1, F) * 0.1}
    return xq, xk, xv, lr, tau, params, r(H, F), r(H, F)


def test_a_query_whose_last_dim_is_strided_gives_the_same_numbers():
    spec = _spec()
    xq, xk, xv, lr, tau, params, w, b = _inputs()
    strided = torch.empty(B, H, T, F, 2, dtype=torch.float64)[..., 0]  # stride(-1) == 2
    strided.copy_(xq)
    assert strided.stride(-1) == 2
    with torch.no_grad():
        want, _ = spec.forward(xq, xk, xv, lr, tau, {k: v.clone() for k, v in params.items()}, w, b, 1e-6)
        got, _ = spec.forward(strided, xk, xv, lr, tau, {k: v.clone() for k, v in params.items()}, w, b, 1e-6)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_the_output_is_laid_out_tokens_before_heads():
    spec = _spec()
    xq, xk, xv, lr, tau, params, w, b = _inputs()
    with torch.no_grad():
        out, _ = spec.forward(xq, xk, xv, lr, tau, params, w, b, 1e-6)
    assert out.transpose(1, 2).is_contiguous()  # [B, T, H, f] memory: the layer's [B, T, H*f] is a view


def test_nan_where_reference_finite_is_named_as_not_finite():
    expected = torch.ones(4, dtype=torch.float64)
    actual = expected.clone()
    actual[1] = float("nan")
    with pytest.raises(AssertionError, match="not finite where the reference is"):
        assert_finite_where_expected_is(actual, expected, "x", 1e-4)


def test_the_gap_holds_only_distractor_tokens():
    pairs, gap = 4, 10
    example = recall_example(pairs, gap, torch.Generator().manual_seed(0))
    inputs = example[0] if isinstance(example, tuple) else example.inputs
    between = inputs[2 * pairs : 2 * pairs + gap]
    assert all(int(t) in RECALL_DISTRACTORS for t in between), between.tolist()


CONFIG = json.loads((DATA / "e2e" / "config.json").read_text(encoding="utf-8"))


def _without(section, key):
    c = copy.deepcopy(CONFIG)
    del c[section][key]
    return c


def test_an_absent_rms_norm_eps_is_the_official_default():  # E6
    assert model_config(_without("model", "rms_norm_eps")).norm_eps == 1e-6


def test_an_absent_bos_token_id_is_the_official_default():  # E9
    assert special_token_ids(_without("model", "bos_token_id"))["bos_token_id"] == 1


def test_a_later_spec_excludes_what_an_earlier_one_chose():  # E10
    c = copy.deepcopy(CONFIG)
    c["training"]["spec_inner"] = [
        "**",
        "exclude language_model.**",
        "language_model.**.suffix_blocks.feed_forward_prime.**",
    ]
    model_config(c)  # selects the prime MLPs only: accepted


def test_the_inner_lr_warmup_fraction_is_warmup_over_total():  # E11
    e2e = model_config(CONFIG).e2e
    frac = e2e["inner_lr_warmup_fraction"] if isinstance(e2e, dict) else e2e.inner_lr_warmup_fraction
    assert frac == pytest.approx(480 / 4800)


MODELS = DATA / "models"


@pytest.mark.slow  # ~0.8 s: a reference model converted; moved out of the fast loop, at its one-minute limit
def test_a_model_checkpoint_that_mixes_dtypes_is_refused(tmp_path):  # L6
    folder = tmp_path / "m"
    shutil.copytree(MODELS / "ttt_linear_transformer", folder)
    weights = load_file(str(folder / "model.safetensors"))
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[key] = weights[key].double()
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="mixes dtypes"):
        load_model(folder)


def test_the_layers_rope_theta_is_the_configs():  # L8
    kw = ttt_lm_pytorch.layer_kwargs({"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 500.0})
    assert kw["rope_theta"] == 500.0
