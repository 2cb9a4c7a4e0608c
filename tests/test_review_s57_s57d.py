"""Review s57d: non-finite numbers -- finite numbers never called NaN or inf, NaN or inf never passed
on silently (every mixer, the E2E model's inner-loop check, norms, metrics)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from innerloop.models import build_model
from innerloop.models.attention import attend
from innerloop.models.e2e import _row_sums
from innerloop.train.compare import token_losses
from innerloop.train.module import LanguageModelModule
from tests.models.test_e2e_review_s13 import VOCAB, tiny_config  # the tiny E2E config (one copy)


@pytest.mark.slow  # four calls of a tiny E2E model with their inner steps: ~1 s on a loaded 2-core CPU
def test_finite_float32_fast_weights_whose_row_sums_pass_float32s_range_are_not_called_non_finite() -> None:
    """A float32 E2E model given a state whose fast weights are finite (2e37, the same sign) but whose
    row sums pass 3.4e38: its inner-loop check summed them in float32, got inf, and raised
    NonFiniteInnerStepError ("made fast weight (none: the losses) NaN or inf") where
    ``non_finite='ignore'`` gives finite logits and fast weights. Now summed in float64."""
    ids = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for policy in ("ignore", "raise"):
        torch.manual_seed(0)
        model = build_model(tiny_config(non_finite=policy)).float().eval()
        with torch.no_grad():
            _, state = model(ids[:, :8])
            fast = {k: v.abs() * 2e37 if "down_proj" in k else v for k, v in state.fast.items()}
            assert all(torch.isfinite(v).all() for v in fast.values())
            assert max(float(v.sum((1, 2)).max()) for v in fast.values()) == float("inf")  # in float32
            results.append(model(ids[:, 8:], dataclasses.replace(state, fast=fast)))  # raised before
    (expected, expected_state), (logits, new_state) = results
    assert torch.isfinite(expected).all() and all(
        torch.isfinite(v).all() for v in expected_state.fast.values()
    )
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_inner_loop_checks_row_sums_are_finite_iff_every_value_is(dtype: torch.dtype) -> None:
    """Rows of the dtype's largest finite value (of either sign, 4096 a row) stay finite; one NaN, inf
    or -inf in a row makes that row's sum non-finite and no other's."""
    big = torch.finfo(dtype).max
    rows = torch.full((5, 64, 64), big, dtype=dtype)
    rows[1] = -big
    rows[2, 3, 7], rows[3, 0, 0], rows[4, 63, 63] = float("nan"), float("inf"), float("-inf")
    finite = torch.isfinite(_row_sums(rows))
    assert finite.tolist() == [True, True, False, False, False], (dtype, _row_sums(rows))
    assert torch.isfinite(_row_sums(rows[:2, 0, 0])).all()  # a [B] tensor (the losses) too


class _PoisonedLogits(torch.nn.Module):
    """Logits one-hot at each input token; a position reading token 7 gets NaN, token 9 a +inf logit."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.one_hot(ids, 16).float()
        logits[ids == 7] = float("nan")
        logits[..., 0] = torch.where(ids == 9, float("inf"), 0.0)
        return logits


def test_compare_refuses_non_finite_logits_naming_the_windows() -> None:
    """compare's token losses took NaN logits (and +inf ones: a NaN or infinite loss) into a perplexity
    (NaN, inf) in the table and CSV without a word; now refused, naming the windows (of the first batch holding any)."""
    inputs = torch.ones(5, 4, dtype=torch.long)
    targets = torch.full((5, 4), 2)
    assert torch.isfinite(token_losses(_PoisonedLogits(), inputs, targets, 2)).all()
    inputs[1, 2], inputs[0, 0], inputs[4, 3] = 7, 9, 7
    with pytest.raises(ValueError, match=r"non-finite logits .* in windows \[0, 1\] of 5 at length 4"):
        token_losses(_PoisonedLogits(), inputs, targets, 2)


@pytest.mark.parametrize("mixer", ["attention", "swa"])
def test_an_evaluation_refuses_a_non_finite_loss_of_any_mixer(mixer: str) -> None:
    """An attention model (full or sliding-window: no check of their own) with a NaN weight, evaluated
    outside a fit (``innerloop eval``, ``trainer.test``): its val_ppl became NaN without a word. Now the
    batch is refused, as a fit's validation stops on it."""
    torch.manual_seed(0)
    config = {"mixer": mixer, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}
    module = LanguageModelModule(model=config | ({"window": 4} if mixer == "swa" else {})).eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        module.validation_step((ids[:, :-1], ids[:, 1:]), 0)  # finite: accepted
        module.model.blocks[0].mixer.qkv_proj.weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match=r"evaluation batch 3: the model's loss is not finite"):
            module.validation_step((ids[:, :-1], ids[:, 1:]), 3)


@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("queries", [1, 8])
def test_attention_on_a_cpu_keeps_nan_and_inf_where_the_definition_does(which: str, queries: int) -> None:
    """torch's fused CPU SDPA returned finite numbers for a NaN/inf query and for the queries seeing a NaN
    key (a decoded token; blocks of 8), so an attention model with a NaN weight gave finite, wrong logits.
    attend now matches the math kernel (the definition) value for value, NaN and inf included."""
    for value in (float("nan"), float("inf")):
        torch.manual_seed(0)
        t = {name: torch.randn(1, 2, queries if name == "q" else 8, 8) for name in "qkv"}
        t[which][0, 0, 0, 0] = value
        options = {"is_causal": queries > 1}  # a prefill: causal; a decoded token: every key, no mask
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            expected = torch.nn.functional.scaled_dot_product_attention(t["q"], t["k"], t["v"], **options)
        assert not torch.isfinite(expected).all() or (which, value) == ("k", float("inf"))  # may weigh 0
        torch.testing.assert_close(attend(t["q"], t["k"], t["v"], **options), expected, equal_nan=True)
