"""Review s24: batch independence and padding.

A sequence's outputs, states, loss and gradients must not depend on the other sequences of its batch, nor
on padding. Each test runs a batch of sequences (one of them scaled far from the others, so that anything
computed over the batch, a norm, a clip, a scale, would show) and each sequence alone, in float64 (float32
where the path is float32-only), and compares: outputs, every state tensor (row by row), and the gradient of
the sum of per-sequence losses against the sum of the gradients taken alone. Paths: TTTLayer (linear and
MLP, every CPU kernel, the other rules and losses), ``innerloop.ops.scan``, the family layers, every
language-model mixer and TTT-E2E (its inner loop's per-sequence clip, second order), right padding with
``model.padding_id`` and ``IGNORE_INDEX``, the training step's loss and the inner-loss diagnostics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

import innerloop
from innerloop.core.diagnostics import inner_loss_before_after
from innerloop.core.family_layers import FAMILY_LAYERS
from innerloop.core.functional import mean_scored_cross_entropy
from innerloop.models import ModelConfig, build_model
from innerloop.ops import scan
from innerloop.plugins.e2e import ScoreFirstSGD
from innerloop.train import IGNORE_INDEX, LanguageModelModule

F64 = 1e-10  # float64: relative to the compared tensor's largest entry
B = 3


# ---- helpers ---------------------------------------------------------------------------------------------


def _tensors(obj: object) -> Iterator[torch.Tensor]:
    """Every tensor of a state (TTTState, LMState, E2EState, caches), in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif callable(getattr(obj, "tensors", None)):
        flat = obj.tensors()
        for key in sorted(flat):
            yield flat[key]
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for key in sorted(obj):
            yield from _tensors(obj[key])
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    if not b.numel():
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _state_row_error(batched: object, alone: object, row: int) -> float:
    """Largest relative difference between row ``row`` of every batched state tensor and the state alone
    (a tensor shared by the batch, e.g. next_token's ``has_previous``, is compared whole)."""
    pairs = list(zip(_tensors(batched), _tensors(alone), strict=True))
    assert pairs
    error = 0.0
    for a, b in pairs:
        if a.dim() and a.shape[0] == B and b.shape[0] == 1:
            a = a[row : row + 1]
        assert a.shape == b.shape, (a.shape, b.shape)
        error = max(error, _relative(a, b))
    return error


def _grad_error(batched: list, summed: list) -> float:
    error = 0.0
    for a, b in zip(batched, summed, strict=True):
        if a is None or b is None:
            assert a is None and b is None or float((a if b is None else b).abs().max()) == 0
            continue
        error = max(error, _relative(a, b))
    return error


def _gradients(loss: torch.Tensor, params: list[torch.Tensor]) -> list:
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def _sum_alone(loss_of, inputs: torch.Tensor, params: list[torch.Tensor]) -> list:
    total: list = [None] * len(params)
    for i in range(inputs.shape[0]):
        grads = _gradients(loss_of(inputs[i : i + 1]).sum(), params)
        total = [g if t is None else (t if g is None else t + g) for t, g in zip(total, grads, strict=True)]
    return total


def _pieces(call, inputs: torch.Tensor, cuts: list[tuple[int, int]]):
    """``call`` over the pieces ``cuts`` of ``inputs`` with the state carried: (outputs, states)."""
    outputs, states, state = [], [], None
    for start, end in cuts:
        y, state = call(inputs[:, start:end], state)
        outputs.append(y)
        states.append(state)
    return torch.cat(outputs, 1), states


def _layer_inputs(length: int, width: int = 32, seed: int = 0) -> torch.Tensor:
    x = torch.randn(B, length, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[1] *= 30  # one sequence far larger than the others
    return x


def _check_layer(layer: torch.nn.Module, length: int, cuts: list[tuple[int, int]], split: int) -> None:
    """Batch vs each sequence alone: whole call, pieces with the state carried (outputs and every
    state), and gradients of per-sequence losses (outputs and the final state) across a split."""
    x = _layer_inputs(length)
    with torch.no_grad():
        whole, _ = layer(x)
        pieces, states = _pieces(layer, x, cuts)
        for i in range(B):
            alone, _ = layer(x[i : i + 1])
            assert _relative(whole[i : i + 1], alone) < F64
            alone_pieces, alone_states = _pieces(layer, x[i : i + 1], cuts)
            assert _relative(pieces[i : i + 1], alone_pieces) < F64
            for batched_state, alone_state in zip(states, alone_states, strict=True):
                assert _state_row_error(batched_state, alone_state, i) < F64

    params = [p for p in layer.parameters() if p.requires_grad]

    def loss_of(inputs: torch.Tensor) -> torch.Tensor:
        y1, state = layer(inputs[:, :split])
        y2, state = layer(inputs[:, split:], state)
        y = torch.cat([y1, y2], 1)
        final = sum(w.square().flatten(1).sum(1) for w in state.params.values())
        return y.square().sum(dim=(1, 2)) + final  # [B]

    assert _grad_error(_gradients(loss_of(x).sum(), params), _sum_alone(loss_of, x, params)) < F64


# ---- (a) TTTLayer, every CPU kernel --------------------------------------------------------------------

KERNELS = [
    (model, kernel)
    for model in ("linear", "mlp")
    for kernel in ("auto", "torch", f"fused_torch_{model}", f"cpu_ttt_{model}")
]


@pytest.mark.slow
@pytest.mark.parametrize(("inner_model", "kernel"), KERNELS, ids=[f"{m}-{k}" for m, k in KERNELS])
def test_ttt_layer_batch_equals_each_sequence_alone_with_states_split_decode_and_gradients(
    inner_model, kernel
) -> None:
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(
        32, 4, inner_model=inner_model, mini_batch_size=4, kernel=kernel, share_qk=True, use_gate=True
    ).double()
    # prefill 6 (a mini-batch and a part), 3 more, then 5 decoded tokens across a mini-batch end
    _check_layer(layer, 14, [(0, 6), (6, 9)] + [(t, t + 1) for t in range(9, 14)], split=6)


@pytest.mark.parametrize(("inner_model", "kernel"), KERNELS, ids=[f"{m}-{k}" for m, k in KERNELS])
def test_ttt_layer_float32_batch_is_each_sequence_alone_to_float32_noise(inner_model, kernel) -> None:
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(32, 4, inner_model=inner_model, mini_batch_size=4, kernel=kernel)
    x = _layer_inputs(16).float()
    y, _ = layer(x)
    params = list(layer.parameters())
    batched = _gradients(y.square().sum(), params)

    def loss_of(inputs: torch.Tensor) -> torch.Tensor:
        return layer(inputs)[0].square().sum(dim=(1, 2))

    for i in range(B):
        assert _relative(y[i : i + 1].detach(), layer(x[i : i + 1])[0].detach()) < 1e-6
    assert _grad_error(batched, _sum_alone(loss_of, x, params)) < 2e-5  # summation order, float32


OTHER_RULES = {
    "linear-minibatch_gd": {"inner_model": "linear", "update_rule": "minibatch_gd"},
    "mlp-minibatch_gd": {"inner_model": "mlp", "update_rule": "minibatch_gd"},
    "linear-next_token": {"inner_model": "linear", "inner_loss": "next_token"},
    "mlp-next_token": {"inner_model": "mlp", "inner_loss": "next_token"},
    "linear-dot_product": {"inner_model": "linear", "inner_loss": "dot_product"},
    "linear-momentum": {"inner_model": "linear", "update_rule": "momentum"},
    "matrix-bare": {"inner_model": "matrix", "inner_norm": False, "inner_residual": False},
}


@pytest.mark.slow
@pytest.mark.parametrize("options", list(OTHER_RULES.values()), ids=list(OTHER_RULES))
def test_other_rules_and_losses_batch_equals_each_sequence_alone(options) -> None:
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(32, 4, mini_batch_size=4, share_qk=True, use_gate=True, **options).double()
    _check_layer(layer, 11, [(0, 5), (5, 7)] + [(t, t + 1) for t in range(7, 11)], split=5)


@pytest.mark.parametrize(("inner_model", "kernel"), KERNELS, ids=[f"{m}-{k}" for m, k in KERNELS])
def test_a_non_finite_sequence_leaves_the_others_alone(inner_model, kernel) -> None:
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(
        32, 4, inner_model=inner_model, mini_batch_size=4, kernel=kernel, non_finite="ignore"
    ).double()
    x = _layer_inputs(13)
    bad = x.clone()
    bad[1, 5, 3] = float("nan")
    bad[1, 6, 2] = float("inf")
    with torch.no_grad():
        whole, _ = layer(bad)
        decoded, _ = _pieces(layer, bad, [(0, 7)] + [(t, t + 1) for t in range(7, 13)])
        for i in (0, 2):
            alone, _ = layer(x[i : i + 1])
            assert _relative(whole[i : i + 1], alone) < F64
            assert _relative(decoded[i : i + 1], alone) < F64
        assert not torch.isfinite(whole[1]).all()


@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
def test_cpu_kernel_training_buffers_keep_each_graphs_sequences(inner_model) -> None:
    """The CPU kernel keeps its per-mini-batch weights buffer between steps; forwards of batches of other
    sizes held at once must each backpropagate their own sequences."""
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(
        32, 4, inner_model=inner_model, mini_batch_size=4, kernel=f"cpu_ttt_{inner_model}"
    )
    layer = layer.double()
    x = _layer_inputs(16)
    params = list(layer.parameters())
    expected = [_gradients(layer(x[i : i + 1])[0].square().sum(), params) for i in range(B)]
    whole, _ = layer(x)
    alone = [layer(x[i : i + 1])[0] for i in range(B)]
    _others = [layer(0.5 * x[i : i + 1])[0] for i in range(B)]  # more graphs held at once
    batched = _gradients(whole.square().sum(), params)
    summed = [sum(g) for g in zip(*expected, strict=True)]
    assert _grad_error(batched, summed) < F64
    for i in range(B):
        assert _grad_error(_gradients(alone[i].square().sum(), params), expected[i]) < F64
    del _others


# ---- innerloop.ops.scan --------------------------------------------------------------------------------

SCANS = {
    "linear": {},
    "mlp": {"inner_model": "mlp"},
    "linear-decay": {"decay": True},
    "momentum-decay": {"update_rule": "momentum", "momentum": True, "decay": True},
    "delta-torch": {"inner_model": "matrix", "inner_norm": False, "inner_residual": False, "mini_batch_size": 1,
                    "decay": True, "kernel": "torch"},
    "delta-chunk": {"inner_model": "matrix", "inner_norm": False, "inner_residual": False, "mini_batch_size": 1,
                    "decay": True, "kernel": "delta_chunk"},
    "linear-attention": {"inner_model": "matrix", "inner_loss": "dot_product", "inner_norm": False,
                         "inner_residual": False},
}  # fmt: skip


@pytest.mark.parametrize("case", list(SCANS.values()), ids=list(SCANS))
def test_ops_scan_batch_equals_each_sequence_alone(case) -> None:
    g = torch.Generator().manual_seed(0)
    heads, length, width = 2, 10, 4
    q, k, v = (torch.randn(B, heads, length, width, generator=g, dtype=torch.float64) for _ in range(3))
    k[1] *= 20
    lr = torch.rand(B, heads, length, generator=g, dtype=torch.float64) * 0.3
    gates = {
        "decay": torch.rand(B, heads, length, generator=g, dtype=torch.float64) * 0.2,
        "momentum": torch.rand(B, heads, length, generator=g, dtype=torch.float64) * 0.5,
    }
    options = {
        "mini_batch_size": 4,
        **{key: gates[key] if key in gates else val for key, val in case.items()},
    }
    initial = None
    if options.get("inner_model") == "matrix":  # shared [H, ...] initial weights
        initial = {"W": 0.1 * torch.randn(heads, width, width, generator=g, dtype=torch.float64)}
    out, weights = scan(q, k, v, lr, initial=initial, **options)
    for i in range(B):
        row = {key: val[i : i + 1] if key in gates else val for key, val in options.items()}
        out_i, weights_i = scan(
            q[i : i + 1], k[i : i + 1], v[i : i + 1], lr[i : i + 1], initial=initial, **row
        )
        assert _relative(out[i : i + 1], out_i) < F64
        for name in weights_i:
            assert _relative(weights[name][i : i + 1], weights_i[name]) < F64


# ---- (b) the family layers -----------------------------------------------------------------------------

FAMILY = {
    **{name: (name, {}) for name in FAMILY_LAYERS},
    "titans-mlp": ("titans", {"inner_model": "mlp"}),
    "deltanet-torch": ("deltanet", {"kernel": "torch"}),
    "gated_deltanet-torch": ("gated_deltanet", {"kernel": "torch"}),
}


@pytest.mark.slow
@pytest.mark.parametrize(("member", "options"), list(FAMILY.values()), ids=list(FAMILY))
def test_family_layer_batch_equals_each_sequence_alone(member, options) -> None:
    torch.manual_seed(0)
    layer = FAMILY_LAYERS[member](32, 4, **options).double()
    # Titans' K = 16: a part, a mini-batch end inside the second piece, then decoding
    _check_layer(layer, 21, [(0, 7), (7, 17)] + [(t, t + 1) for t in range(17, 21)], split=7)


# ---- (c) language models, every mixer, TTT-E2E ---------------------------------------------------------

SMALL = {"vocab_size": 32, "hidden_size": 32, "num_heads": 4, "intermediate_size": 48, "num_layers": 2}
E2E = {"mixer": "e2e", "num_layers": 4, "window": 8}
MODELS = {
    "ttt": {"mixer": "ttt"},
    "ttt-mlp-mamba": {"mixer": "ttt", "backbone": "mamba", "ttt": {"inner_model": "mlp", "mini_batch_size": 4}},
    "attention": {"mixer": "attention"},
    "swa": {"mixer": "swa", "window": 5},
    "linear_attention": {"mixer": "linear_attention"},
    "deltanet": {"mixer": "deltanet"},
    "gated_deltanet": {"mixer": "gated_deltanet"},
    "titans": {"mixer": "titans"},
    "titans-mlp": {"mixer": "titans", "family": {"memory": "mlp", "mini_batch_size": 4}},
    "e2e": {**E2E, "e2e": {"chunk_size": 4}},
    "e2e-within-skip": {**E2E, "e2e": {"chunk_size": 4, "chunk_targets": "within_chunk", "skip_target_id": 3}},
    "e2e-absolute-first-order": {**E2E, "e2e": {"chunk_size": 4, "rope_positions": "absolute",
                                                "first_order": True, "inner_grad_clip": 0.05}},
    "e2e-off": {**E2E, "e2e": {"chunk_size": 4, "test_time_training": False}},
}  # fmt: skip


def _model(options: dict, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({**SMALL, **options, **extra})).double()
    if hasattr(model, "set_outer_progress"):
        model.set_outer_progress(1.0)  # the full inner lr
    return model


def _ids(length: int, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 32, (B, length), generator=torch.Generator().manual_seed(seed))
    ids[1] = 7  # a degenerate sequence: one token repeated
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("options", list(MODELS.values()), ids=list(MODELS))
def test_language_model_batch_equals_each_sequence_alone(options) -> None:
    """Outputs and states without gradients in eval mode (inference), gradients in train mode (a training
    step). The module's mode changes no computation of these models (no dropout; ``self.training`` only
    gates gradient checkpointing, off here, and E2E's one-chunk warning), so each mode is run where it
    is used rather than every check in both."""
    model = _model(options).eval()
    ids = _ids(19)
    cuts = [(0, 9), (9, 14)] + [(t, t + 1) for t in range(14, 19)]
    with torch.no_grad():
        whole, _ = model(ids)
        pieces, states = _pieces(model, ids, cuts)
        for i in range(B):
            assert _relative(whole[i : i + 1], model(ids[i : i + 1])[0]) < F64
            alone, alone_states = _pieces(model, ids[i : i + 1], cuts)
            assert _relative(pieces[i : i + 1], alone) < F64
            for batched_state, alone_state in zip(states, alone_states, strict=True):
                assert _state_row_error(batched_state, alone_state, i) < F64
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of(x: torch.Tensor) -> torch.Tensor:  # per-sequence next-token loss across a split
        y1, state = model(x[:, :9])
        y2, _ = model(x[:, 9:], state)
        logits = torch.cat([y1, y2], 1)
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none").mean(1)

    assert _grad_error(_gradients(loss_of(ids).sum(), params), _sum_alone(loss_of, ids, params)) < F64


CLIP = 2.0  # between the inner gradient norms of the sequences below (1.2 to 6.2)


def test_e2e_fast_weights_are_trained_on_their_own_sequence_only_with_the_clip_per_sequence() -> None:
    """Training mode, second order, the clip engaged for some sequences only (their inner gradient norms
    differ by orders of magnitude): each sequence's fast weights and meta-gradient are its own, as in
    the official code, whose inner loop runs per sequence under ``vmap`` (ttt/model/loop.py:160,
    optax.clip_by_global_norm in ttt/optimizers.py:50)."""
    model = _model({**E2E, "e2e": {"chunk_size": 4, "inner_grad_clip": CLIP}}, init_std=0.3).train()
    ids = _ids(12)
    ids[2] = torch.arange(12) % 2  # a third, easily learnt sequence
    params = [p for p in model.parameters() if p.requires_grad]
    rule = model.update_rule
    norms: list[torch.Tensor] = []
    step = rule.step

    def recording(fast, losses, lr, max_grad_norm, create_graph):
        grads = torch.autograd.grad(losses.sum(), list(fast.values()), retain_graph=True)
        norms.append(sum(g.detach().pow(2).flatten(1).sum(1) for g in grads).sqrt())
        return step(fast, losses, lr, max_grad_norm, create_graph)

    rule.step = recording
    try:
        logits, state = model(ids)
        engaged = torch.stack(norms)  # [chunks, B]
        assert bool((engaged > CLIP).any()) and bool((engaged < CLIP).any())  # clipped and not, in one batch
        batched = _gradients(logits.square().sum(), params)
        summed: list = [None] * len(params)
        for i in range(B):
            alone, alone_state = model(ids[i : i + 1])
            assert _relative(logits[i : i + 1].detach(), alone.detach()) < F64
            for name, weight in alone_state.fast.items():
                assert _relative(state.fast[name][i : i + 1].detach(), weight.detach()) < F64
            grads = _gradients(alone.square().sum(), params)
            summed = [g if s is None else s + g for s, g in zip(summed, grads, strict=True)]
        assert _grad_error(batched, summed) < F64
    finally:
        del rule.step


def test_score_first_sgd_clips_each_sequence_by_its_own_norm_to_second_order() -> None:
    rule = ScoreFirstSGD()
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(B, 7, 5, generator=g, dtype=torch.float64)
    scales = torch.tensor([0.01, 10.0, 1.0], dtype=torch.float64)  # norms about 0.6, 300, 80: clip at 1

    def losses(fast: dict, rows: slice) -> torch.Tensor:
        return (x[rows] @ fast["w"]).square().sum(dim=(1, 2)) * scales[rows]

    def outer(fast: dict, rows: slice) -> torch.Tensor:
        return (x[rows] @ fast["w"]).pow(2).sum()

    fast = {"w": weight.unsqueeze(0).expand(B, 5, 3)}
    new = rule.step(fast, losses(fast, slice(None)), 0.5, 1.0, True)
    batched = torch.autograd.grad(outer(new, slice(None)), weight)[0]
    summed = torch.zeros_like(weight)
    for i in range(B):
        rows = slice(i, i + 1)
        fast_i = {"w": weight.unsqueeze(0).expand(1, 5, 3)}
        new_i = rule.step(fast_i, losses(fast_i, rows), 0.5, 1.0, True)
        assert _relative(new["w"][rows].detach(), new_i["w"].detach()) < F64
        summed += torch.autograd.grad(outer(new_i, rows), weight)[0]
    assert _relative(batched, summed) < F64


# ---- (d) padding: model.padding_id, IGNORE_INDEX, mean_scored_cross_entropy ------------------------------

PAD = 5
LENGTHS = (14, 9, 3)  # real tokens per row; the rest is padding on the right


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::innerloop.models.e2e.OneChunkTrainingWarning")  # a 3-token row alone
@pytest.mark.parametrize("options", list(MODELS.values()), ids=list(MODELS))
def test_right_padding_leaves_the_scored_positions_and_their_loss_alone(options) -> None:
    """Rows of 14, 9 and 3 real tokens right-padded with ``model.padding_id`` to 14, plus a row that is
    all padding: the logits at real positions are each sequence's alone (unpadded), and the batch loss with
    the pads' targets ``IGNORE_INDEX`` (mean_scored_cross_entropy) and its gradient are the per-token mean
    over the sequences alone, the padded row changing nothing."""
    model = _model(options, padding_id=PAD).train()
    length = max(LENGTHS)
    gen = torch.Generator().manual_seed(2)
    real = [torch.randint(6, 32, (n + 1,), generator=gen) for n in LENGTHS]  # ids and the next token
    ids = torch.full((B + 1, length), PAD)
    targets = torch.full((B + 1, length), IGNORE_INDEX)
    for i, seq in enumerate(real):
        ids[i, : LENGTHS[i]] = seq[:-1]
        targets[i, : LENGTHS[i]] = seq[1:]
    params = [p for p in model.parameters() if p.requires_grad]
    logits, _ = model(ids)
    loss = mean_scored_cross_entropy(logits, targets, IGNORE_INDEX)
    batched = _gradients(loss, params)
    total_tokens = sum(LENGTHS)
    expected_loss = 0.0
    summed: list = [None] * len(params)
    for i, seq in enumerate(real):
        alone, _ = model(seq[None, :-1])
        assert _relative(logits[i : i + 1, : LENGTHS[i]].detach(), alone.detach()) < F64
        token_sum = F.cross_entropy(alone[0], seq[1:], reduction="sum") / total_tokens
        expected_loss += float(token_sum.detach())
        grads = _gradients(token_sum, params)
        summed = [g if s is None else (s if g is None else s + g) for s, g in zip(summed, grads, strict=True)]
    assert float(loss.detach()) == pytest.approx(expected_loss, rel=F64)
    assert _grad_error(batched, summed) < F64
    without_padded_row = mean_scored_cross_entropy(model(ids[:B])[0], targets[:B], IGNORE_INDEX)
    assert float(without_padded_row.detach()) == pytest.approx(float(loss.detach()), rel=F64)


def test_mean_scored_cross_entropy_of_a_batch_is_the_per_token_mean_of_its_rows() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (4, 6), generator=g)
    targets[1, 2:] = IGNORE_INDEX
    targets[3] = IGNORE_INDEX  # a padded row
    sums = [
        F.cross_entropy(logits[i], targets[i], ignore_index=IGNORE_INDEX, reduction="sum") for i in range(3)
    ]
    expected = sum(sums) / int((targets != IGNORE_INDEX).sum())
    assert float(mean_scored_cross_entropy(logits, targets, IGNORE_INDEX)) == pytest.approx(
        float(expected), rel=F64
    )
    assert float(mean_scored_cross_entropy(logits[3:], targets[3:], IGNORE_INDEX)) == 0.0


# ---- (e) the training step's loss with uneven batches --------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mixer", ["ttt", "e2e"])
def test_training_step_loss_is_the_per_scored_token_mean_and_ignores_padded_rows(mixer) -> None:
    """Rows that score 16, 5 and 1 tokens, and a padded row (targets all IGNORE_INDEX, as the validation
    shards pad): the training step's loss is the sum of each row's token losses (computed alone) over the
    scored tokens (TTT-E2E: the official mean over rows of each row's mean over chunks of the chunk's
    scored mean), and the padded row changes neither the loss nor its gradient."""
    options = {**SMALL, **(E2E if mixer == "e2e" else {}), "mixer": mixer}
    if mixer == "e2e":
        options["e2e"] = {"chunk_size": 4}
    torch.manual_seed(0)
    module = LanguageModelModule(
        ModelConfig.from_dict(options), lr=1e-3, max_steps=2, warmup_steps=0
    ).double()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 32, (B + 1, 17), generator=gen)
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[1, 5:] = IGNORE_INDEX
    targets[2, :-1] = IGNORE_INDEX
    targets[3] = IGNORE_INDEX
    inputs[3] = 0  # RankShardOfExamples pads with zeros
    params = [p for p in module.parameters() if p.requires_grad]
    loss = module.training_step((inputs, targets), 0)
    batched = _gradients(loss, params)
    loss_without = module.training_step((inputs[:B], targets[:B]), 0)
    count = int((targets != IGNORE_INDEX).sum())
    expected = 0.0
    for i in range(B):
        logits = module(inputs[i : i + 1])
        token_losses = F.cross_entropy(logits[0], targets[i], ignore_index=IGNORE_INDEX, reduction="none")
        if mixer == "e2e":  # the official weighting: each row's mean over its chunks' scored means
            chunks = zip(token_losses.split(4), (targets[i] != IGNORE_INDEX).split(4), strict=True)
            expected += float(sum(t.detach().sum() / max(int(s.sum()), 1) for t, s in chunks)) / 4 / B
        else:
            expected += float(token_losses.sum().detach()) / count
    assert float(loss.detach()) == pytest.approx(expected, rel=F64)
    assert float(loss_without.detach()) == pytest.approx(float(loss.detach()), rel=F64)
    assert _grad_error(batched, _gradients(loss_without, params)) < F64


# ---- inner-loop diagnostics ------------------------------------------------------------------------------


@pytest.mark.parametrize("inner_loss", ["reconstruction", "next_token"])
def test_inner_loss_diagnostics_are_per_sequence(inner_loss) -> None:
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(32, 4, mini_batch_size=4, inner_loss=inner_loss).double()
    x = _layer_inputs(10)
    before, after = inner_loss_before_after(layer, x)
    for i in range(B):
        before_i, after_i = inner_loss_before_after(layer, x[i : i + 1])
        assert _relative(before[i : i + 1], before_i) < F64
        assert _relative(after[i : i + 1], after_i) < F64
