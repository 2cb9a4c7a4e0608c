"""Every language model takes the same weights-dtype x autocast-dtype combinations (review s10, LOW):
float32 or float64 weights under any ``torch.autocast``, and bfloat16 / float16 weights without
autocast or under autocast to their own dtype, run and train; bfloat16 weights under float16 autocast
(or float16 under bfloat16) are refused before anything runs, with one error naming both dtypes,
instead of torch's "Unexpected floating ScalarType in at::autocast::prioritize" from deep inside some
models (mamba backbone, TTT-E2E) and running, or failing elsewhere, in others.

A combination that runs is compared with the float32 model of the same (rounded) weights: relative
error (RMS) below 8 units of roundoff of the dtype the products run in (measured: at most ~4, deltanet
and TTT-E2E under bfloat16); float64 weights, which autocast leaves as they are, within 1e-5 (float32's
own error on these models, measured ~1e-6).
"""

from __future__ import annotations

import copy

import pytest
import torch

from innerloop.core.functional import relative_error
from innerloop.models import ModelConfig, build_model

MODEL_KINDS = {
    "attention": {"mixer": "attention"},
    "swa": {"mixer": "swa"},
    "ttt": {"mixer": "ttt"},
    "ttt_mamba": {"mixer": "ttt", "backbone": "mamba"},
    "ttt_mlp_mamba": {"mixer": "ttt", "backbone": "mamba", "ttt": {"inner_model": "mlp"}},
    "linear_attention": {"mixer": "linear_attention"},
    "deltanet": {"mixer": "deltanet"},
    "gated_deltanet": {"mixer": "gated_deltanet"},
    "titans": {"mixer": "titans"},
    "e2e": {"mixer": "e2e", "e2e": {"chunk_size": 4}},
}
WEIGHT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
AUTOCAST_DTYPES = (None, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)
ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def tiny_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "window": 8}
    return build_model(ModelConfig.from_dict({**shape, "vocab_size": 64, **options}))


def token_ids() -> torch.Tensor:
    return torch.randint(64, (2, 12), generator=torch.Generator().manual_seed(1))


def tolerance(weights: torch.dtype, autocast: torch.dtype | None) -> float:
    """8 units of roundoff of the dtype the products run in; float32's own error for float64 weights."""
    if weights in LOW_PRECISION:
        return 8 * ROUNDOFF[weights]
    if weights == torch.float32 and autocast is not None:
        return 8 * ROUNDOFF[autocast]
    return 1e-5


def run(model: torch.nn.Module, ids: torch.Tensor, autocast: torch.dtype | None) -> torch.Tensor:
    """Logits of a training step under ``autocast`` (None: off), after its backward."""
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        logits, _ = model(ids)
        logits.float().square().mean().backward()
    return logits.detach()


# reason: 12 training steps per model kind, and a process's first TTT models probe each kernel once
# per dtype (kernels/first_use.py): ~0.5 s per kind, 4-10 s for the first ones on 2 cores
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*(autocast|dtype).*:UserWarning")  # nn.RMSNorm under autocast
@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_every_model_runs_the_supported_precisions_and_refuses_the_others_up_front(kind):
    ids = token_ids()
    for weights in WEIGHT_DTYPES:
        for autocast in AUTOCAST_DTYPES:
            case = f"{kind}: weights {weights}, autocast {autocast}"
            model = tiny_model(**MODEL_KINDS[kind]).to(weights)
            if weights in LOW_PRECISION and autocast not in (None, weights):
                embedded: list[bool] = []
                model.embed.register_forward_hook(lambda *_, seen=embedded: seen.append(True))
                refusal = rf"weights are {weights} but torch\.autocast\('cpu'\) is on with dtype {autocast}"
                with pytest.raises(TypeError, match=refusal):
                    run(model, ids, autocast)
                assert not embedded, f"{case}: refused only after the model started"
                continue
            reference = copy.deepcopy(model).float()  # the same rounded weights, in float32
            logits = run(model, ids, autocast)
            assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters()), case
            want, _ = reference(ids)
            assert relative_error(logits, want) < tolerance(weights, autocast), case


def test_e2e_refuses_weights_that_do_not_fit_its_compute_dtype():
    model = tiny_model(mixer="e2e", e2e={"chunk_size": 4, "compute_dtype": "bfloat16"}).half()
    with pytest.raises(TypeError, match=r"weights are torch.float16 but model.e2e.compute_dtype='bfloat16'"):
        model(token_ids())


@pytest.mark.filterwarnings("ignore:.*(autocast|dtype).*:UserWarning")
def test_e2e_compute_dtype_runs_float32_weights_inside_another_autocast_and_its_own_dtype():
    ids = token_ids()
    model = tiny_model(mixer="e2e", e2e={"chunk_size": 4, "compute_dtype": "float16"})
    want, _ = copy.deepcopy(model)(ids)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # compute_dtype decides
        logits, _ = model(ids)
    assert relative_error(logits, want) < 8 * ROUNDOFF[torch.float16]
    model.half()
    reference = copy.deepcopy(model).float()
    reference.config.e2e.compute_dtype = "float32"
    assert relative_error(run(model, ids, None), reference(ids)[0]) < 8 * ROUNDOFF[torch.float16]
