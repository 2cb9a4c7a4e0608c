"""TTT-E2E (innerloop.models.e2e): meta-gradients, streaming, the plain-SWA limit, plugins, config, CLI."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from lm_testing import directional_difference, streamed_logits

from innerloop.config import load_config
from innerloop.core.functional import relative_error
from innerloop.models import E2ELM, CausalLM, E2EConfig, ModelConfig, build_model, generate
from innerloop.plugins.e2e import NextTokenChunkLoss, ScoreFirstSGD
from innerloop.registry import PluginError, get_registry, hookimpl
from innerloop.testing.checks import FLOAT64_CONDITIONING_FACTOR, FLOAT64_PER_FLOAT32
from innerloop.testing.memory import peak_cpu_allocation

VOCAB = 11


def tiny_config(**e2e) -> ModelConfig:
    """2 blocks of width 8 (the second has the prime MLP), window 4, chunks of 4 tokens.

    init_std 0.3 (not 0.02) so that the inner steps change the predictions enough for second-order
    terms to be far above float64 noise.
    """
    options = {"chunk_size": 4, "suffix_fraction": 0.5, "inner_lr_warmup_fraction": 0.0, **e2e}
    return ModelConfig(
        mixer="e2e",
        vocab_size=VOCAB,
        hidden_size=8,
        num_layers=2,
        num_heads=2,
        intermediate_size=12,
        window=4,
        init_std=0.3,
        e2e=E2EConfig(**options),
    )


def tiny_model(seed: int = 0, **e2e) -> E2ELM:
    torch.manual_seed(seed)
    return build_model(tiny_config(**e2e)).double()


def with_options(model: E2ELM, **e2e) -> E2ELM:
    """A model with the same weights and other ``config.e2e`` options."""
    config = replace(model.config, e2e=replace(model.config.e2e, **e2e))
    other = E2ELM(config).double()
    other.load_state_dict(model.state_dict())
    return other


def outer_loss(model: E2ELM, ids: torch.Tensor) -> torch.Tensor:
    """The training loss: next-token cross-entropy of the (pre-update) logits of every position."""
    logits, _ = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# Meta-gradients
# --------------------------------------------------------------------------------------------------


def directional_fd(model: E2ELM, ids: torch.Tensor, direction: list[torch.Tensor], h: float = 1e-5) -> float:
    """Five-point central difference of the outer loss along ``direction`` (error O(h^4))."""
    return directional_difference(list(model.parameters()), direction, lambda: outer_loss(model, ids), h)


def directions(model: E2ELM, seed: int) -> dict[str, list[torch.Tensor]]:
    """Random directions: all parameters; only the prime MLP's (initial fast) weights; only the
    prefix block's attention (slow weights upstream of every inner step)."""
    gen = torch.Generator().manual_seed(seed)
    names = [n for n, _ in model.named_parameters()]
    full = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]

    def only(keep) -> list[torch.Tensor]:
        return [d if keep(n) else torch.zeros_like(d) for n, d in zip(names, full, strict=True)]

    return {
        "all": full,
        "prime": only(lambda n: ".prime." in n),
        "prefix_attention": only(lambda n: n.startswith("blocks.0.attn.")),
    }


@pytest.mark.parametrize("clip", [1.0, 0.01], ids=["clip-1", "clip-active"])
def test_meta_gradient_equals_finite_differences_in_float64(clip: float) -> None:
    model = tiny_model(inner_grad_clip=clip)
    ids = random_ids(2, 13)  # 12 inputs: 3 chunks, so two inner steps feed later predictions
    grads = torch.autograd.grad(outer_loss(model, ids), list(model.parameters()))
    for name, direction in directions(model, seed=2).items():
        analytic = sum((g * d).sum() for g, d in zip(grads, direction, strict=True)).item()
        numeric = directional_fd(model, ids, direction)
        assert math.isclose(analytic, numeric, rel_tol=1e-8, abs_tol=1e-10), (name, analytic, numeric)


def test_first_order_option_differs_from_the_full_meta_gradient() -> None:
    full = tiny_model()
    first = with_options(full, first_order=True)
    ids = random_ids(2, 13)
    g_full = torch.autograd.grad(outer_loss(full, ids), list(full.parameters()))
    g_first = torch.autograd.grad(outer_loss(first, ids), list(first.parameters()))
    # Same logits (the option changes only the backward) to float64 rounding: the inner gradient taken
    # without a graph may run other backward kernels, so W1 and the logits after it can round differently
    # (ATEN_CPU_CAPABILITY=avx2, 2 threads: 7.8e-16, the loss 1 ulp off). The allowance is innerloop.testing's
    # rule: 100x the logits' own float32 error (6.6e-7) scaled to float64's roundoff (1.2e-13 here) ...
    logits, logits_first = full(ids[:, :-1])[0], first(ids[:, :-1])[0]  # with a graph, as in training
    float32_error = relative_error(copy.deepcopy(full).float()(ids[:, :-1])[0], logits)
    allowed = FLOAT64_CONDITIONING_FACTOR * float32_error * FLOAT64_PER_FLOAT32
    assert relative_error(logits_first, logits) <= allowed, (relative_error(logits_first, logits), allowed)
    for name, direction in directions(full, seed=3).items():
        numeric = directional_fd(full, ids, direction)
        exact = sum((g * d).sum() for g, d in zip(g_full, direction, strict=True)).item()
        approx = sum((g * d).sum() for g, d in zip(g_first, direction, strict=True)).item()
        assert math.isclose(exact, numeric, rel_tol=1e-8, abs_tol=1e-10), name
        # ... but its gradient misses the second-order terms, by far more than float64 noise.
        assert abs(approx - numeric) > 1e-3 * abs(numeric), (name, approx, numeric)


def test_first_order_gradient_treats_the_inner_gradient_as_a_constant() -> None:
    """With one inner step, dL/dW0 of first-order MAML is the gradient at the updated weights."""
    # Absolute RoPE: the plain reference below then computes the prefix block exactly as the model.
    model = tiny_model(first_order=True, inner_grad_clip=0.0, rope_positions="absolute")
    ids = random_ids(1, 9)  # 8 inputs: chunk 0 trains, chunk 1 is scored with W1
    logits, _ = model(ids[:, :-1])
    loss_chunk1 = F.cross_entropy(logits[0, 4:], ids[0, 5:])
    names = model.fast_weight_names()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss_chunk1, [params[n] for n in names])
    # Reference: a plain sliding-window copy whose prime weights are W1 (as leaves). Its chunk-0 keys
    # and values come from attention before the only prime MLP, so chunk 1's logits are the same.
    updated = with_options(model, test_time_training=False)
    with torch.no_grad():
        state = model(ids[:, :5])[1]  # chunk 0 trains once its last target, token 4, is read
        for name in names:
            dict(updated.named_parameters())[name].copy_(state.fast[name][0])
    ref_logits, _ = updated(ids[:, :8])
    ref_loss = F.cross_entropy(ref_logits[0, 4:], ids[0, 5:])
    ref_params = dict(updated.named_parameters())
    ref = torch.autograd.grad(ref_loss, [ref_params[n] for n in names])
    for name, g, r in zip(names, grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)


# --------------------------------------------------------------------------------------------------
# The inner loop against an independent, naive re-implementation
# --------------------------------------------------------------------------------------------------


def naive_inner_loop(model: E2ELM, ids: torch.Tensor, clip: float, lr: float) -> torch.Tensor:
    """Chunk logits from a plain sliding-window forward with the prime weights set by hand.

    With one suffix block the prime MLP comes after that block's attention, so a chunk's keys and
    values there do not depend on the fast weights: the logits of chunk c equal those of the plain
    model with weights W_c run over everything up to the end of chunk c. Chunk c's loss: its C tokens
    with their next tokens (``next_token``, the last chunk has no target for its last token and is
    not trained on), or the C - 1 pairs inside it (``within_chunk``).
    """
    chunk = model.config.e2e.chunk_size
    with_next = model.config.e2e.chunk_targets == "next_token"
    plain = with_options(model, test_time_training=False)
    names = plain.fast_weight_names()
    out = []
    for start in range(0, ids.shape[1], chunk):
        logits, _ = plain(ids[:, : start + chunk])
        chunk_logits = logits[0, start:]  # [C, V]
        out.append(chunk_logits.detach())
        targets = ids[0, start + 1 : start + chunk + 1] if with_next else ids[0, start + 1 : start + chunk]
        if with_next and len(targets) < chunk:
            break  # the last chunk: its last target is not given
        loss = F.cross_entropy(chunk_logits[: len(targets)], targets)
        params = dict(plain.named_parameters())
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        scale = min(1.0, clip / norm.item()) if clip > 0 else 1.0
        with torch.no_grad():
            for n, g in zip(names, grads, strict=True):
                params[n].sub_(lr * scale * g)
    return torch.cat(out)[None]


# The plain model attends every block chunk by chunk; with relative RoPE the E2E model's prefix block
# attends at absolute positions (rounded angles differ): one block, then, all suffix.
NAIVE_CASES = {
    "next_token-relative": {"num_layers": 1, "suffix_fraction": 1.0},
    "next_token-absolute": {"rope_positions": "absolute"},
    "within_chunk-absolute": {"rope_positions": "absolute", "chunk_targets": "within_chunk"},
    "within_chunk-relative": {"num_layers": 1, "suffix_fraction": 1.0, "chunk_targets": "within_chunk"},
}


@pytest.mark.parametrize("case", NAIVE_CASES)
@pytest.mark.parametrize("clip", [1.0, 0.05])
def test_inner_loop_equals_a_naive_reimplementation(clip: float, case: str) -> None:
    options = dict(NAIVE_CASES[case])
    layers = options.pop("num_layers", 2)
    torch.manual_seed(0)
    config = replace(tiny_config(inner_grad_clip=clip, inner_lr=0.7, **options), num_layers=layers)
    model = build_model(config).double()
    ids = random_ids(1, 18)  # 4 full chunks and a partial one
    with torch.no_grad():
        logits, _ = model(ids)
    torch.testing.assert_close(logits, naive_inner_loop(model, ids, clip, 0.7), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------


def test_streaming_in_any_pieces_equals_the_one_shot_forward() -> None:
    model = tiny_model(seed=4)
    ids = random_ids(2, 37, seed=5)
    with torch.no_grad():
        whole, _ = model(ids)
    cuts = [0, 1, 2, 3, 7, 8, 8, 13, 20, 21, 33, 37]  # 1-token pieces, chunk-crossing, an empty one
    torch.testing.assert_close(streamed_logits(model, ids, cuts), whole, rtol=1e-10, atol=1e-12)

    pieces = [ids[:, a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]

    losses = torch.cat(list(model.stream_losses(pieces)), dim=1)  # [B, N - 1]
    expected = F.cross_entropy(whole[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rope", ["relative", "absolute"])
def test_streaming_without_test_time_training_equals_the_one_shot_forward(rope: str) -> None:
    """The plain model: with relative RoPE every block attends chunk by chunk, whatever the pieces."""
    model = with_options(tiny_model(seed=4), test_time_training=False, rope_positions=rope)
    ids = random_ids(2, 23, seed=5)
    with torch.no_grad():
        whole, _ = model(ids)
    streamed = streamed_logits(model, ids, [0, 1, 3, 4, 9, 9, 16, 23])
    torch.testing.assert_close(streamed, whole, rtol=1e-12, atol=1e-13)


def test_streaming_float32_matches_one_shot() -> None:
    # init_std 0.02 (the default): tiny_config's 0.3 makes 16 inner steps of lr 1 amplify float32
    # rounding (pieces of other shapes in the prefix) to ~3e-5; float64 is exact (the test above).
    torch.manual_seed(0)
    model = build_model(replace(tiny_config(), init_std=0.02))  # float32
    ids = random_ids(1, 64, seed=6)
    with torch.no_grad():
        whole, _ = model(ids)
    streamed = torch.cat([logits for logits, _ in model.stream(ids.split(5, dim=1))], dim=1)
    torch.testing.assert_close(streamed, whole)  # float32 default tolerances


def test_every_sequence_learns_on_its_own() -> None:
    model = tiny_model(seed=7)
    ids = random_ids(3, 20, seed=8)
    with torch.no_grad():
        batched, _ = model(ids)
        for b in range(3):
            alone, _ = model(ids[b : b + 1])
            torch.testing.assert_close(batched[b : b + 1], alone, rtol=1e-10, atol=1e-12)


def test_inference_mode_gives_the_same_logits() -> None:
    model = tiny_model()
    ids = random_ids(2, 18)
    with torch.no_grad():
        expected, _ = model(ids)
    with torch.inference_mode():
        got, state = model(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not state.pending.is_inference()


def stream_for_memory(model: E2ELM, ids: torch.Tensor, piece: int) -> None:
    for losses in model.stream_losses(ids.split(piece, dim=1)):
        del losses  # the caller's choice: keep nothing


@pytest.mark.slow  # ~7 s: streams up to 192 tokens under the memory profiler
def test_streaming_memory_is_flat_in_sequence_length() -> None:
    torch.manual_seed(0)
    config = replace(tiny_config(), hidden_size=32, num_heads=2, intermediate_size=64, window=16)
    config = replace(config, e2e=replace(config.e2e, chunk_size=8))
    model = build_model(config)
    short, long = random_ids(1, 48, seed=9), random_ids(1, 192, seed=9)  # 3 and 12 windows
    stream_for_memory(model, short, 24)  # warm-up (lazy initialisations)
    peak_short = peak_cpu_allocation(lambda: stream_for_memory(model, short, 24))
    peak_long = peak_cpu_allocation(lambda: stream_for_memory(model, long, 24))
    assert peak_short > 0
    assert peak_long < 1.2 * peak_short, (peak_short, peak_long)
    # The one-shot forward with a graph, by contrast, grows with the length.
    peak_graph = peak_cpu_allocation(lambda: outer_loss(model, long))
    assert peak_graph > 4 * peak_long

    with torch.no_grad():
        _, state_short = model(short)
        _, state_long = model(long)
    assert state_long.nbytes() == state_short.nbytes()


def test_generation_runs_through_the_state() -> None:
    model = tiny_model().float().eval()
    prompt = random_ids(1, 6)
    tokens = [t for t, _ in generate(model, prompt, 10, temperature=0.0)]
    assert len(tokens) == 10
    # Greedy generation equals re-reading the whole text at each step.
    text = prompt
    for token in tokens:
        with torch.no_grad():
            logits, _ = model(text)
        assert int(logits[0, -1].argmax()) == int(token[0])
        text = torch.cat((text, token[:, None]), dim=1)


# --------------------------------------------------------------------------------------------------
# The limit without test-time training, score-first, causality
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"suffix_fraction": 1.0}, {"rope_positions": "absolute"}, {"chunk_targets": "within_chunk"}],
    ids=["all-suffix", "absolute-rope", "within-chunk"],
)
def test_inner_lr_zero_equals_the_plain_sliding_window_transformer(options) -> None:
    model = tiny_model(inner_lr=0.0, inner_lr_start=0.0, **options)
    plain = with_options(model, test_time_training=False)
    ids = random_ids(2, 30)
    with torch.no_grad():
        ttt, _ = model(ids)
        swa, _ = plain(ids)
    if model.num_prefix and model.config.e2e.rope_positions == "relative":
        # The E2E model's prefix attends at absolute positions, the plain model chunk by chunk at
        # relative ones (the official code's two modes): the same function, with RoPE angles
        # rounded to float32 at other positions.
        torch.testing.assert_close(ttt, swa, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(ttt, swa, rtol=1e-12, atol=1e-13)


def test_first_chunk_is_scored_before_any_update_and_later_ones_learn() -> None:
    model = tiny_model(suffix_fraction=1.0)  # every block chunked in both modes: exact
    plain = with_options(model, test_time_training=False)
    ids = random_ids(1, 12)
    with torch.no_grad():
        ttt, _ = model(ids)
        swa, _ = plain(ids)
    torch.testing.assert_close(ttt[:, :4], swa[:, :4], rtol=1e-12, atol=1e-13)
    assert (ttt[:, 4:] - swa[:, 4:]).abs().max() > 1e-3


def test_tokens_never_influence_earlier_predictions() -> None:
    model = tiny_model()
    ids = random_ids(1, 16)
    with torch.no_grad():
        base, _ = model(ids)
        for t in (3, 7, 10):  # the last token of a chunk, and tokens inside chunks
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 1) % VOCAB
            logits, _ = model(changed)
            torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=0)
            assert (logits[:, t] - base[:, t]).abs().max() > 0


def test_fast_weights_are_the_prime_mlps_of_the_last_quarter() -> None:
    config = replace(tiny_config(), num_layers=12)
    model = build_model(replace(config, e2e=replace(config.e2e, suffix_fraction=0.25)))
    assert model.num_prefix == 9
    assert [i for i, b in enumerate(model.blocks) if b.prime is not None] == [9, 10, 11]
    assert model.fast_weight_names()[:3] == [
        "blocks.9.prime.gate_proj.weight",
        "blocks.9.prime.up_proj.weight",
        "blocks.9.prime.down_proj.weight",
    ]
    assert all(b.attn.q_norm is not None for b in model.blocks)  # QK-norm everywhere
    assert model.lm_head.weight is model.embed.weight  # tied


def test_inner_lr_warms_up_with_the_outer_steps() -> None:
    model = tiny_model(inner_lr=1.0, inner_lr_start=0.1, inner_lr_warmup_fraction=0.1)
    model.set_outer_progress(0.0)
    assert model.inner_lr() == pytest.approx(0.1)
    model.set_outer_progress(0.05)
    assert model.inner_lr() == pytest.approx(0.55)
    model.set_outer_progress(0.5)
    assert model.inner_lr() == 1.0
    fresh = tiny_model(inner_lr=1.0, inner_lr_start=0.1, inner_lr_warmup_fraction=0.1)
    assert fresh.inner_lr() == 1.0  # a model that is not being trained uses the full inner lr


def test_a_warm_up_over_the_whole_run_is_valid_and_ends_at_the_inner_lr() -> None:
    """inner_lr_warmup_fraction=1 (the official config's ilr_warmup_steps = total_steps) was refused as
    outside [0, 1), and the official loader stood it in by 0.999; it is the whole run now."""
    model = tiny_model(inner_lr=1.0, inner_lr_start=0.2, inner_lr_warmup_fraction=1.0)
    for progress, lr in ((0.0, 0.2), (0.5, 0.6), (0.999, 0.9992), (1.0, 1.0)):
        model.set_outer_progress(progress)
        assert model.inner_lr() == pytest.approx(lr)
    with pytest.raises(ValueError, match=r"inner_lr_warmup_fraction=1.5 must be in \[0, 1\]"):
        tiny_model(inner_lr_warmup_fraction=1.5)


# --------------------------------------------------------------------------------------------------
# Plugins
# --------------------------------------------------------------------------------------------------


class KeepWeights:
    """An update rule that never changes the fast weights."""

    name = "test_keep_weights"

    def step(self, fast, losses, lr, max_grad_norm, create_graph):
        return dict(fast)


class ZeroLoss(NextTokenChunkLoss):
    name = "test_zero_loss"

    def chunk_loss(self, logits, input_ids):
        return 0.0 * super().chunk_loss(logits, input_ids)


class Plugin:
    def __init__(self, rule=None, loss=None):
        self.rule, self.loss = rule, loss

    @hookimpl
    def register_model_update_rules(self, register):
        if self.rule is not None:
            register(self.rule)

    @hookimpl
    def register_model_inner_losses(self, register):
        if self.loss is not None:
            register(self.loss)


@pytest.fixture
def swap_plugin():
    registry = get_registry()
    registry.add_plugin(Plugin(KeepWeights(), ZeroLoss()), origin="test_e2e_swap")
    yield
    registry.remove_plugin("test_e2e_swap")


@pytest.mark.parametrize("option", [{"update_rule": "test_keep_weights"}, {"inner_loss": "test_zero_loss"}])
def test_plugins_are_swapped_by_name(swap_plugin, option) -> None:
    model = tiny_model(suffix_fraction=1.0)  # every block chunked in both modes: exact
    swapped = with_options(model, **option)
    plain = with_options(model, test_time_training=False)
    ids = random_ids(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(swapped(ids)[0], plain(ids)[0], rtol=1e-12, atol=1e-13)
        assert (model(ids)[0] - plain(ids)[0]).abs().max() > 1e-3


def test_builtin_plugins_come_from_the_registry() -> None:
    model = tiny_model()
    assert isinstance(model.inner_loss, NextTokenChunkLoss) and isinstance(model.update_rule, ScoreFirstSGD)


class NoStep:
    name = "no_step"


class ScalarLoss(NextTokenChunkLoss):
    name = "scalar_loss"

    def chunk_loss(self, logits, input_ids):
        return super().chunk_loss(logits, input_ids).mean()


class WrongShapes(ScoreFirstSGD):
    name = "wrong_shapes"

    def step(self, fast, losses, lr, max_grad_norm, create_graph):
        return {k: v[0] for k, v in super().step(fast, losses, lr, max_grad_norm, create_graph).items()}


@pytest.mark.parametrize(
    ("plugin", "match"),
    [
        (Plugin(rule=NoStep()), r"model update rule 'no_step' lacks required method\(s\) \['step'\]"),
        (Plugin(rule=ScoreFirstSGD), "register an instance of the model update rule"),
        (Plugin(rule=WrongShapes()), "must return the fast weights with the same names and shapes"),
        (Plugin(loss=ScalarLoss()), r"must return one loss per sequence, \[B\] = \(2,\); got \(\)"),
    ],
)
def test_broken_model_plugins_are_rejected_with_the_reason(plugin, match) -> None:
    from innerloop.registry import build_registry

    registry = build_registry(include_external=False)
    with pytest.raises(PluginError, match=match):
        registry.add_plugin(plugin, origin="broken")
    assert registry.plugin_manager.get_plugin("broken") is None


# --------------------------------------------------------------------------------------------------
# Config, errors, training through the LightningModule and the CLI
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"chunk_size": 0}, r"model\.e2e\.chunk_size=0 must be in \[1, 1073741824\]"),
        (
            {"chunk_size": 1, "chunk_targets": "within_chunk"},
            r"model\.e2e\.chunk_size=1 must be >= 2 with chunk_targets='within_chunk'",
        ),
        ({"update_rule": "adam"}, r"model\.e2e\.update_rule='adam' is not a registered model_update_rule; "),
        ({"inner_loss": "mse"}, r"registered: \['next_token'"),
        ({"inner_lr": -1.0}, r"model\.e2e\.inner_lr=-1\.0 must be >= 0"),
        ({"suffix_fraction": 0.0}, r"model\.e2e\.suffix_fraction=0\.0 must be in \(0, 1\]"),
        ({"skip_target_id": 11}, r"model\.e2e\.skip_target_id=11 must be a token id in \[0, 11\)"),
        (
            {"skip_target_id": -1},
            r"model\.e2e\.skip_target_id=-1 must be a token id in \[0, 11\) .*, or null",
        ),
        (
            {"chunk_targets": "all"},
            r"model\.e2e\.chunk_targets='all' is not one of \['next_token', 'within_chunk'\]",
        ),
        ({"rope_positions": "abs"}, r"model\.e2e\.rope_positions='abs' is not one of"),
        (
            {"compute_dtype": "bf16"},
            r"model\.e2e\.compute_dtype='bf16' is not one of \['float32', 'bfloat16', 'float16'\]",
        ),
    ],
)
def test_bad_options_name_the_key_and_the_valid_values(option, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(tiny_config(**option))


def test_skipped_targets_leave_the_inner_loss_and_its_step() -> None:
    logits = torch.randn(2, 4, VOCAB, dtype=torch.float64)
    ids = random_ids(2, 5)
    marked = ids.clone()
    marked[0, [2, 4]] = -1  # two of sequence 0's targets skipped
    marked[1, 1:] = -1  # all of sequence 1's
    losses = NextTokenChunkLoss().chunk_loss(logits, marked)
    per_token = F.cross_entropy(logits[0], ids[0, 1:], reduction="none")
    torch.testing.assert_close(losses[0], per_token[[0, 2]].mean(), rtol=1e-14, atol=0)
    assert losses[1].item() == 0.0
    # In the model: a sequence without the skipped id is unaffected; with it, the steps change.
    model = tiny_model()
    skipping = with_options(model, skip_target_id=3)
    ids = random_ids(1, 13)
    without = torch.where(ids == 3, torch.full_like(ids, 4), ids)
    with torch.no_grad():
        torch.testing.assert_close(skipping(without)[0], model(without)[0], rtol=0, atol=0)
        assert (skipping(ids)[0][:, 4:] - model(ids)[0][:, 4:]).abs().max() > 1e-6
        torch.testing.assert_close(skipping(ids)[0][:, :4], model(ids)[0][:, :4], rtol=0, atol=0)


def test_a_state_of_a_model_with_other_options_is_refused() -> None:
    model = tiny_model()
    ids = random_ids(1, 6)
    with torch.no_grad():
        _, state = model(ids)
        for other, match in (
            (with_options(model, rope_positions="absolute"), "cache of block 1 is a ChunkKVCache"),
            (with_options(model, test_time_training=False), "cache of block 0 is a KVCache"),
        ):
            with pytest.raises(ValueError, match=match):
                other(ids, state)
        _, plain_state = with_options(model, test_time_training=False, rope_positions="absolute")(ids)
        with pytest.raises(ValueError, match=r"state holds fast weights \[\], this model"):
            with_options(model, rope_positions="absolute")(ids, plain_state)


def test_causal_lm_points_to_build_model_for_e2e() -> None:
    with pytest.raises(ValueError, match="build_model"):
        CausalLM(tiny_config())


def test_presets_load_and_the_125m_one_has_the_paper_shape() -> None:
    run, _ = load_config("e2e-125m")
    m = run.model
    assert (m.mixer, m.hidden_size, m.num_layers, m.num_heads) == ("e2e", 768, 12, 12)
    assert (m.window, m.rope_theta, m.e2e.chunk_size, m.e2e.inner_lr) == (8192, 500000.0, 1024, 1.0)
    with torch.device("meta"):
        model = build_model(m)
    assert model.num_prefix == 9
    run, _ = load_config("e2e-tiny", ["model.e2e.first_order=true"])
    assert run.model.e2e.first_order is True


@pytest.mark.slow  # ~0.4 s: a Lightning training run of the E2E model
def test_cli_trains_e2e_tiny_through_the_lightning_module(tmp_path, capsys, monkeypatch) -> None:
    from innerloop.cli import main
    from innerloop.train import load_model

    told: list[float] = []
    set_progress = E2ELM.set_outer_progress
    monkeypatch.setattr(
        E2ELM, "set_outer_progress", lambda self, p: (told.append(p), set_progress(self, p))[1]
    )

    text = tmp_path / "corpus.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200, encoding="utf-8")
    out = tmp_path / "run"
    args = [
        "train",
        "--config",
        "e2e-tiny",
        f"data.paths=[{text}]",
        "data.seq_len=32",
        "data.batch_size=2",
        "data.val_batches=1",
        "model.hidden_size=16",
        "model.num_heads=2",
        "model.intermediate_size=32",
        "model.e2e.chunk_size=8",
        "trainer.max_steps=3",
        "trainer.val_every=3",
        "trainer.progress_bar=false",
        "trainer.num_position_buckets=4",
        f"out_dir={out}",
    ]
    assert main(args) == 0
    assert "validation perplexity:" in capsys.readouterr().out
    model = load_model(out / "last.safetensors")
    assert isinstance(model, E2ELM) and model.config.e2e.chunk_size == 8
    # The LightningModule told the model where the outer training was before each step, that step
    # counted done as in the official schedule, min(1, (step + 1) / warm-up steps); the checkpoint keeps
    # the last step's.
    assert told == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert float(model.outer_progress) == 1.0
    assert (out / "loss_by_position.png").is_file()


@pytest.mark.parametrize(
    ("option", "value"),
    [("first_order", "false"), ("test_time_training", 0), ("chunk_size", 4.0), ("inner_grad_clip", "1")],
)
def test_an_option_of_the_wrong_type_set_on_a_built_model_is_refused_by_name(option, value) -> None:
    model = tiny_model()
    setattr(model.config.e2e, option, value)  # the options a model reads at every call
    with pytest.raises(
        ValueError, match=rf"model\.e2e\.{option}={value!r} \({type(value).__name__}\) must be"
    ):
        model(random_ids(1, 8))


def test_a_forward_on_meta_tensors_with_test_time_training_gives_the_shapes() -> None:
    with torch.device("meta"):
        model = build_model(tiny_config(inner_lr_warmup_fraction=0.5))
        logits, _ = model(torch.zeros(2, 9, dtype=torch.long))
    assert logits.shape == (2, 9, VOCAB) and logits.device.type == "meta"
