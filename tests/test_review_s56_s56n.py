"""Review s56n: TTT-E2E at other configs -- the meta-gradient through the inner loop against finite
differences (windows of 1, not dividing the length, past it; one, some or all blocks trained; chunks
not dividing the length; inner lr at its extremes; both chunk targets; both outer losses), what
``first_order`` computes, and decoding token by token against the one-shot forward."""

from __future__ import annotations

import math

import pytest
import torch
from lm_testing import directional_difference, streamed_logits

from innerloop.data.recall import IGNORE_INDEX
from innerloop.models import E2ELM, build_model
from innerloop.plugins.e2e import ScoreFirstSGD
from innerloop.registry import get_registry, hookimpl
from tests.models.test_e2e_review_s13 import VOCAB, tiny_config  # the tiny E2E config (one copy)

LENGTH = 12  # inputs per sequence


def tiny_e2e(layers: int = 2, window: int = 4, **e2e) -> E2ELM:
    """tests/models/test_e2e_review_s13's tiny config (width 8, 2 heads, init_std 0.3: the inner steps move
    the predictions well above float64 noise) at ``layers`` and ``window``, float64."""
    torch.manual_seed(0)
    return build_model(tiny_config(layers, window=window, **e2e)).double()


def sequences(batch: int = 2, length: int = LENGTH + 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def training_loss(model: E2ELM, ids: torch.Tensor) -> torch.Tensor:
    """What a training step minimises: the model's own outer loss (``outer_loss``) of the pre-update logits."""
    logits, _ = model(ids[:, :-1])
    return model.training_loss(logits, ids[:, 1:], IGNORE_INDEX)


def random_direction(model: E2ELM) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]


# One to three settings away from the tested default (window 4, chunks of 4, 12 tokens, 1 of 2 blocks):
META_GRADIENT_CONFIGS = {
    "window-1": dict(window=1),
    "window-3-chunk-5": dict(window=3, chunk_size=5),  # neither divides the 12 tokens: a pending chunk
    "window-past-the-length": dict(window=20),
    "1-of-3-blocks-trained": dict(layers=3, suffix_fraction=0.01),  # at least one
    "all-3-blocks-trained": dict(layers=3, suffix_fraction=1.0),
    "chunk-1": dict(chunk_size=1),
    "chunk-7-within-chunk": dict(chunk_size=7, chunk_targets="within_chunk"),
    "chunk-past-the-length": dict(chunk_size=13),  # nothing trains: the plain model's gradient
    "inner-lr-0": dict(inner_lr=0.0),
    "inner-lr-10-no-clip": dict(inner_lr=10.0, inner_grad_clip=0.0),
    "inner-lr-100-clipped": dict(inner_lr=100.0, inner_grad_clip=1.0),
    "token-mean-chunk-5": dict(chunk_size=5, outer_loss="token_mean"),
}


@pytest.mark.slow  # 0.5-2.5 s each (one thread, a shared machine): five forwards and a second-order backward
@pytest.mark.parametrize("name", META_GRADIENT_CONFIGS)
@pytest.mark.filterwarnings("ignore::innerloop.models.e2e.OneChunkTrainingWarning")  # chunk-past-the-length's
def test_the_meta_gradient_equals_finite_differences_at_other_configs(name: str) -> None:
    model = tiny_e2e(**META_GRADIENT_CONFIGS[name])
    ids = sequences()
    params = list(model.parameters())
    grads = torch.autograd.grad(training_loss(model, ids), params)
    direction = random_direction(model)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction, strict=True)).item()
    # h = 1e-6: at 1e-5 the five-point rule's O(h^4) error is 3e-6 relative with every block trained
    numeric = directional_difference(params, direction, lambda: training_loss(model, ids), h=1e-6)
    assert math.isclose(analytic, numeric, rel_tol=1e-7), (analytic, numeric)


class DetachedGradientSGD(ScoreFirstSGD):
    """``score_first_sgd`` whose step treats the (clipped) inner gradient as a constant: first-order MAML
    written out, to compare ``first_order=True`` with."""

    name = "test_s56n_detached_gradient_sgd"

    def step(self, fast, losses, lr, max_grad_norm, create_graph):
        stepped = super().step(fast, losses, lr, max_grad_norm, create_graph=False)
        return {k: fast[k] - (fast[k] - stepped[k]).detach() for k in fast}


class DetachedGradientPlugin:
    @hookimpl
    def register_model_update_rules(self, register):
        register(DetachedGradientSGD())


@pytest.fixture
def detached_gradient_rule():
    registry = get_registry()
    registry.add_plugin(DetachedGradientPlugin(), origin="test_s56n_detached")
    yield DetachedGradientSGD.name
    registry.remove_plugin("test_s56n_detached")


@pytest.mark.slow  # ~0.5-1 s: three second-order backwards
@pytest.mark.parametrize("e2e", [dict(inner_grad_clip=0.01), dict(chunk_size=5, inner_grad_clip=0.0)])
def test_first_order_is_exactly_the_step_with_its_inner_gradient_held_constant(
    detached_gradient_rule, e2e
) -> None:
    """Over several chunks, clipped or not: docs/e2e.md's first-order MAML (the inner gradient, its
    clipping scale included, a constant of the outer backward), and not the full meta-gradient."""
    first = tiny_e2e(first_order=True, **e2e)
    surrogate = tiny_e2e(update_rule=detached_gradient_rule, **e2e)
    full = tiny_e2e(**e2e)
    ids = sequences(length=15)
    g_first, g_surrogate, g_full = (
        torch.autograd.grad(training_loss(m, ids), list(m.parameters())) for m in (first, surrogate, full)
    )
    for a, b in zip(g_first, g_surrogate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert max((a - c).abs().max().item() for a, c in zip(g_first, g_full, strict=True)) > 1e-3


DECODE_CONFIGS = {
    "chunk-5-window-3": dict(chunk_size=5, window=3),
    "chunk-1": dict(chunk_size=1),
    "window-1": dict(window=1),
    "window-and-chunk-past-the-length": dict(window=30, chunk_size=20),
    "3-layers-all-trained-within-chunk": dict(layers=3, suffix_fraction=1.0, chunk_targets="within_chunk"),
    "absolute-rope-no-clip-lr-5": dict(
        rope_positions="absolute", inner_grad_clip=0.0, inner_lr=5.0, chunk_size=3
    ),
}


@pytest.mark.slow  # 0.3-1.5 s each: a prefill of every length, then one token at a time
@pytest.mark.parametrize("name", DECODE_CONFIGS)
def test_prefill_then_decode_equals_the_one_shot_forward_in_float64(name: str) -> None:
    """Measured (review s56n): at most 5e-13 over 15 configs and every prefill length 0-17 (logits up to 2.9)."""
    model = tiny_e2e(**DECODE_CONFIGS[name]).eval()
    ids = sequences(batch=3, length=17)
    with torch.no_grad():
        whole, _ = model(ids)
    for prefill in (0, 1, 4, 5, 9, 16):
        decoded = streamed_logits(model, ids, [0, prefill, *range(prefill + 1, 18)])
        torch.testing.assert_close(decoded, whole, rtol=0, atol=1e-11, msg=f"prefill {prefill}")


def test_the_one_shot_forward_is_not_a_token_by_token_scoring_of_the_initial_weights() -> None:
    """What makes the decode test above able to fail: the inner steps move later logits well past its
    tolerance (the fast weights after each chunk are read back by the decoding)."""
    model = tiny_e2e(chunk_size=5, window=3).eval()
    frozen = tiny_e2e(chunk_size=5, window=3, inner_lr=0.0).eval()
    ids = sequences(batch=1, length=17)
    with torch.no_grad():
        assert (model(ids)[0] - frozen(ids)[0]).abs().max() > 1e-2


def decode_one_chunk(model: E2ELM, state, token: torch.Tensor, chunk: int):
    with torch.no_grad():
        for _ in range(chunk):
            _, state = model(token, state)
    return state


@pytest.mark.slow  # 1.0 s of CPU, 3.4 s wall at a load of 11 on 2 cores: two prefills, two profiled chunks
def test_decoding_costs_the_same_work_and_memory_far_into_a_sequence() -> None:
    """docs/e2e.md's constant latency, in what does not depend on the machine's load: after 48 and
    after 512 tokens (6 and 64 windows), each decoded token that trains no chunk runs the same FLOPs, decoding a whole
    chunk (its inner step included) peaks at the same CPU tensor memory, and the state has the same
    size at every position of a chunk."""
    from torch.utils.flop_counter import FlopCounterMode

    from innerloop.testing.memory import peak_cpu_allocation

    model = tiny_e2e(window=8, chunk_size=16).float().eval()
    token = torch.tensor([[3]])
    measured = []
    for context in (48, 512):
        with torch.no_grad():
            _, state = model(torch.randint(VOCAB, (1, context), generator=torch.Generator().manual_seed(0)))
            _, state = model(token, state)  # the waiting chunk trains: the next 15 tokens only score
            sizes = [state.nbytes()]
            with FlopCounterMode(display=False) as counter:  # no inner step: autograd.grad refuses the mode
                _, state = model(token, state)
            for _ in range(14):
                _, state = model(token, state)
                sizes.append(state.nbytes())
        peak = peak_cpu_allocation(lambda: decode_one_chunk(model, state, token, 16))  # noqa: B023
        measured.append((counter.get_total_flops(), peak, sizes))
    assert measured[0][0] > 0 and measured[0] == measured[1], measured


def test_finite_float64_fast_weights_past_float32s_range_are_not_called_non_finite() -> None:
    """A float64 model at an extreme inner lr (3e38, no clip): its fast weights reach 2.3e38 and sum
    to 1.5e38 per weight, all finite, and so are its logits. The inner loop's finiteness check summed
    the fast weights given to each step in float32, where two such rows overflow to inf, and raised
    NonFiniteInnerStepError ("made fast weight (none: the losses) NaN or inf") on finite numbers."""
    model = tiny_e2e(inner_lr=3e38, inner_grad_clip=0.0).eval()
    ignoring = tiny_e2e(inner_lr=3e38, inner_grad_clip=0.0, non_finite="ignore").eval()
    ids = sequences()
    with torch.no_grad():
        expected, reference_state = ignoring(ids)
        logits, state = model(ids)  # raised before the fix
    assert torch.isfinite(expected).all()
    assert max(v.abs().max().item() for v in reference_state.fast.values()) > 1e38  # past float32's range
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
