"""Review s30a, mutation testing of the modules that compute the numbers a user reads (compare's bands and
curves, the metrics, TTT-E2E, the family layers, packing, the recall task, sampling): each test kills a
mutant that no earlier test did (the table of mutants: /work/notes/review_s30a.md).

Every test passes on the code as it is and fails on the mutant named in its comment; each is checked
against an independent computation (a hand count, a float64 loop), never the code's own output."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import innerloop.core.family_layers as family
from innerloop.train.compare import ComparedModel, Comparison, LengthResult, _add_length

# ------------------------------------------------------------------------------------------------------
# innerloop/train/compare.py
# ------------------------------------------------------------------------------------------------------


# mutant c02_curve_empty: the loss curve's 0 / 0 for a bucket without scored tokens turned into 0
# (a loss of 0.000 in the CSV, the best possible, where nothing was scored)
def test_a_bucket_without_scored_tokens_has_a_nan_loss_in_the_curve_and_csv() -> None:
    loss_sums = torch.tensor([[[2.0, 0.0], [4.0, 0.0]]], dtype=torch.float64)  # [M=1, W=2, K=2]
    counts = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)  # bucket 1 scores nothing
    result = LengthResult(4, [(0, 2), (2, 4)], loss_sums, counts, 2)
    curve = result.curve(0)
    assert curve[0].item() == pytest.approx(6.0 / 4.0)  # (2 + 4) / (1 + 3) tokens
    assert math.isnan(curve[1].item())
    assert result.perplexity(0) == pytest.approx(math.exp(1.5))


def _recall_like_comparison():
    """Two models on 6 windows scored as the recall task scores them: bucket 0 (the pairs and the gap)
    has no scored token in any window, bucket 1 (the queries) some in each window but one."""
    models = [ComparedModel(n, Path(f"{n}.safetensors"), None, 1000, 64, None) for n in ("base", "other")]  # type: ignore[arg-type]
    comparison = Comparison(models, 0, [], {}, 0.95, 200, 0, "test windows")
    counts = torch.tensor([[0, 2], [0, 0], [0, 3], [0, 1], [0, 2], [0, 4]], dtype=torch.float64)
    base = counts * 2.0  # 2 nats per scored token
    other = counts * torch.tensor([1.0, 1.5, 1.0, 0.5, 1.25, 1.5], dtype=torch.float64)[:, None]
    _add_length(comparison, LengthResult(8, [(0, 4), (4, 8)], torch.stack([base, other]), counts, 6))
    return comparison, other - base, counts


# mutant c08_bands_counts: the per-bucket bands computed with a window's 0 scored tokens of a bucket
# counted as 1 (the recall task's windows score no token in most buckets): a mean difference per token
# divided by tokens that were never scored
def test_the_per_bucket_difference_divides_by_the_scored_tokens_only() -> None:
    comparison, differences, counts = _recall_like_comparison()
    mean, low, high = comparison.bands[8][1]
    expected = float(differences[:, 1].sum() / counts[:, 1].sum())  # (-2 + 0 - 3 - 1.5 - 1.5 - 2) / 12
    assert expected == pytest.approx(-10.0 / 12.0)
    assert mean[1].item() == pytest.approx(expected)
    assert math.isnan(mean[0].item()) and math.isnan(low[0].item()) and math.isnan(high[0].item())
    assert comparison.overall[8][1][0] == pytest.approx(expected)


# mutant c15_table_ppl: every row of the table showing the first model's perplexity
def test_the_table_gives_each_model_its_own_perplexity() -> None:
    from innerloop.train.compare import format_table

    comparison, _, _ = _recall_like_comparison()
    rows = {
        line.split(" | ")[0]: line for line in format_table(comparison).splitlines() if line.startswith("| ")
    }
    assert f"| {math.exp(2.0):.3f} |" in rows["| base (baseline)"]  # 2 nats on each of the 12 tokens
    assert f"| {math.exp(2.0 - 10.0 / 12.0):.3f} |" in rows["| other"]  # 14 nats on 12 tokens


# mutant c18_ppl_inf: a perplexity called infinite from float32's range (a mean loss past 88.7 nats)
# where float64 holds it (up to 709.8 nats)
def test_a_perplexity_past_float32s_range_is_finite() -> None:
    counts = torch.full((2, 1), 4.0, dtype=torch.float64)
    result = LengthResult(4, [(0, 4)], counts[None] * 100.0, counts, 2)  # 100 nats per token
    assert result.perplexity(0) == pytest.approx(math.exp(100.0))
    result = LengthResult(4, [(0, 4)], counts[None] * 710.0, counts, 2)
    assert result.perplexity(0) == math.inf


# mutant c17_per_s: the table's "tok/s in training" not tokens trained / seconds in training steps
def test_the_training_tokens_per_second_are_tokens_over_seconds(monkeypatch) -> None:
    from types import SimpleNamespace

    import innerloop.train.compare as compare

    counters = {"tokens_seen": 1000, "train_seconds": 4.0}
    monkeypatch.setattr(compare, "load_module", lambda path: SimpleNamespace(model=None))
    monkeypatch.setattr(compare, "recorded_entry", lambda path, key: {"TrainingThroughput": counters})
    monkeypatch.setattr(compare, "count_parameters", lambda model: SimpleNamespace(total=7))
    monkeypatch.setattr(compare, "recorded_data_state", lambda path: None)
    model = compare.load_compared_model(Path("a.safetensors"), "a", False)
    assert (model.tokens_trained, model.tokens_per_s, model.parameters) == (1000, 250.0, 7)


# mutant c12_middles: the plot's points at (start + end) / 2, half a position right of each bucket's middle
@pytest.mark.slow  # reason: the plot imports matplotlib (about 1 s)
def test_the_plot_puts_each_bucket_at_its_middle_position(tmp_path, monkeypatch) -> None:
    import matplotlib.axes

    from innerloop.train.compare import plot_comparison

    drawn = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "plot",
        lambda self, *a, **k: drawn.append(list(a[0])) or original(self, *a, **k),
    )
    comparison, _, _ = _recall_like_comparison()
    plot_comparison(tmp_path / "c.png", comparison)
    assert drawn[0] == [1.5, 5.5]  # positions 0..3 and 4..7


# ------------------------------------------------------------------------------------------------------
# innerloop/train/bootstrap.py
# ------------------------------------------------------------------------------------------------------


# mutant b21_large_dof: Student's t taken from the normal with 1/dof corrections from dof = 1000 on, where
# those are off by about 1e-9 (the docs promise an error below 1e-11 from LARGE_DOF = 1e6 on)
@pytest.mark.parametrize(
    ("dof", "quantile", "cdf"),
    # scipy.stats.t.ppf(0.975, dof) and scipy.stats.t.cdf(-3.0, dof), scipy 1.17.1 (scipy is no dependency)
    [(2000, 1.9611508260994377, 0.0013665718810164), (50_000, 1.9600114310936798, 0.0013505628959770207)],
)
def test_students_t_for_thousands_of_degrees_of_freedom_is_exact(dof, quantile, cdf) -> None:
    from innerloop.train.bootstrap import student_t_cdf, student_t_quantile

    assert student_t_quantile(0.975, dof) == pytest.approx(quantile, rel=1e-11, abs=0)
    assert student_t_cdf(-3.0, dof) == pytest.approx(cdf, rel=1e-10, abs=0)


# ------------------------------------------------------------------------------------------------------
# innerloop/train/metrics.py
# ------------------------------------------------------------------------------------------------------


# mutant m10_reduce_pad: forward() of a batch shorter than the state seen so far (varying_lengths=True)
# reduced with that state, the state's last positions cut off to the batch's length (F.pad with a
# negative width)
def test_loss_by_position_forward_of_a_shorter_batch_keeps_the_longer_positions() -> None:
    from innerloop.train.metrics import LossByPosition

    metric = LossByPosition(num_buckets=4, varying_lengths=True)
    metric.update(torch.tensor([[3.0, 4.0, 5.0, 6.0]]))  # positions 0..3
    metric(torch.tensor([[1.0, 2.0]]))  # forward: positions 0, 1, reduced with the state
    # by hand: position 0 holds 3 and 1, position 1 holds 4 and 2, positions 2 and 3 hold 5 and 6
    assert metric.compute().tolist() == [2.0, 3.0, 5.0, 6.0]


# mutant m15_mean_loss: the mean loss of a single scored token (or of none) divided by more tokens
def test_perplexity_mean_loss_of_one_token_and_of_none() -> None:
    from innerloop.train.metrics import Float64Perplexity

    metric = Float64Perplexity(ignore_index=-100)
    logits = torch.tensor([[[0.0, math.log(2.0), 0.0], [5.0, 1.0, 2.0]]])  # [B=1, T=2, V=3]
    metric.update(logits, torch.tensor([[1, -100]]))  # one scored token: p = 2 / (1 + 2 + 1)
    assert metric.mean_loss().item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert metric.compute().item() == pytest.approx(2.0, rel=1e-6)
    metric.reset()
    metric.update(logits, torch.tensor([[-100, -100]]))  # nothing scored: no mean to give
    assert math.isnan(metric.mean_loss().item())


# ------------------------------------------------------------------------------------------------------
# innerloop/models/e2e.py
# ------------------------------------------------------------------------------------------------------


# mutant e13_stream_first: the first piece's losses scored against the piece's own tokens, not the next
# ones (the streaming test's first piece had one token, whose losses are empty either way)
def _tiny_e2e(**e2e):
    """2 blocks of width 8 (the second with the prime MLP), window 4, chunks of 4 tokens, float64."""
    from innerloop.models import E2EConfig, ModelConfig, build_model

    options = {"chunk_size": 4, "suffix_fraction": 0.5, "inner_lr_warmup_fraction": 0.0, **e2e}
    config = ModelConfig(
        mixer="e2e", vocab_size=32, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=12,
        window=4, init_std=0.3, e2e=E2EConfig(**options),
    )  # fmt: skip
    torch.manual_seed(0)
    return build_model(config).double()


def test_stream_losses_of_a_first_piece_of_several_tokens_score_the_next_token() -> None:
    model = _tiny_e2e()
    ids = torch.randint(32, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole, _ = model(ids)
    losses = torch.cat(list(model.stream_losses([ids[:, :6], ids[:, 6:]])), dim=1)  # [B, 10]
    log_probs = whole.log_softmax(-1)
    expected = torch.tensor(
        [[-float(log_probs[b, t, ids[b, t + 1]]) for t in range(10)] for b in range(2)], dtype=torch.float64
    )  # -log p(x_{t+1} | x_{<=t}), one by one
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)


# mutant e14_outer_token_mean: outer_loss "chunk_mean" and "token_mean" swapped (equal when every
# target is scored and the chunks are full, as in every test before)
def test_the_chunk_mean_training_loss_weighs_each_chunk_alike() -> None:
    model = _tiny_e2e()
    logits = torch.randn(1, 8, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets = torch.randint(32, (1, 8), generator=torch.Generator().manual_seed(3))
    targets[0, :3] = -100  # chunk 0 scores one token, chunk 1 four
    nll = [-float(logits[0, t].log_softmax(-1)[targets[0, t]]) if t >= 3 else 0.0 for t in range(8)]
    chunk_mean = (nll[3] + sum(nll[4:]) / 4) / 2
    assert float(model.training_loss(logits, targets, -100)) == pytest.approx(chunk_mean, rel=1e-12)
    assert chunk_mean != pytest.approx(sum(nll[3:]) / 5, rel=1e-3)  # the token mean differs


# mutant e16_float32_fast: the initial fast weights of a bfloat16 model kept in bfloat16, where every
# inner update smaller than its rounding step is lost (documented: at least float32)
def test_the_initial_fast_weights_of_a_bfloat16_model_are_float32() -> None:
    model = _tiny_e2e().to(torch.bfloat16)
    fast = model.initial_fast_weights(2)
    params = dict(model.named_parameters())
    assert fast and all(w.dtype == torch.float32 for w in fast.values())
    for name, w in fast.items():
        assert w.shape == (2, *params[name].shape)
        assert torch.equal(w[1], params[name].float())  # the same values, widened exactly


# ------------------------------------------------------------------------------------------------------
# innerloop/core/family_layers.py
# ------------------------------------------------------------------------------------------------------


# mutant f18_relu: feature_map="relu" applied as the identity (no test built a layer with it)
@pytest.mark.parametrize("layer_class", ["LinearAttentionLayer", "DeltaNetLayer"])
def test_the_relu_feature_map_equals_a_float64_reference(layer_class) -> None:
    from tests.family.test_review_s21_family import _perturbed, _reference, _rel

    torch.manual_seed(1)
    layer = _perturbed(getattr(family, layer_class)(6, 2, feature_map="relu", qk_activation="identity"))
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    assert _rel(layer(x)[0], _reference(layer, x)) < 1e-13


# ------------------------------------------------------------------------------------------------------
# innerloop/data/packing.py
# ------------------------------------------------------------------------------------------------------

_DOCUMENTS = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]


def _read(epoch: int, first: int):
    return ((i, _DOCUMENTS[i]) for i in range(first, len(_DOCUMENTS)))


# mutant p08_offset_check: a recorded position one token past its document's end (the data changed)
# taken as valid, the windows then read from a negative count of tokens left
def test_a_recorded_position_past_its_documents_end_is_refused() -> None:
    from innerloop.data.packing import StreamPosition, packed_windows
    from innerloop.data.text import DataError

    # at the end of document 0 (3 tokens): valid, the stream goes on with document 1
    window, after = next(packed_windows(_read, 3, StreamPosition(0, 0, 3)))
    assert (window, after) == ([4, 5, 6, 7], StreamPosition(0, 1, 3))
    with pytest.raises(DataError, match=r"past the end of document 0 \(3 tokens\)"):
        next(packed_windows(_read, 3, StreamPosition(0, 0, 4)))


# mutant p07_val_need: the held-out tokens that make exactly one more window (seq_len + 1 left) dropped
def test_validation_windows_use_tokens_that_fill_a_window_exactly() -> None:
    from innerloop.data.packing import validation_windows

    def read(epoch: int, first: int):
        return iter([(9, [1, 2, 3]), (19, [4, 5, 6, 7])])  # 7 tokens: windows of 4 at 0 and 3

    assert validation_windows(read, 3, 5) == [[1, 2, 3, 4], [4, 5, 6, 7]]


# ------------------------------------------------------------------------------------------------------
# innerloop/data/recall.py
# ------------------------------------------------------------------------------------------------------


def _recall_examples(num_pairs: int, gap: int, count: int):
    from innerloop.data.recall import recall_example

    generator = torch.Generator().manual_seed(0)
    return [recall_example(num_pairs, gap, generator) for _ in range(count)]


# mutant r08_keys_perm: keys drawn with replacement: a key given twice with two values, which no model
# can recall (the task promises each key once, then every key once more)
def test_the_keys_of_a_recall_example_are_distinct_and_each_queried_once() -> None:
    for inputs, _ in _recall_examples(32, 4, 20):
        keys = inputs[0:64:2].tolist()  # k1 v1 ... k32 v32
        assert len(set(keys)) == 32 and all(16 <= k < 80 for k in keys)
        queried = inputs[64 + 4 :: 2].tolist()  # after the gap: every key once more
        assert sorted(queried) == sorted(keys)


# mutants r03_values_range, r06_distr_range: a value never drawn (63 of the 64 values); distractors
# drawn among the keys too (documented ranges: keys 16-79, distractors 80-127, values 128-191)
def test_recall_values_and_distractors_cover_their_documented_ranges() -> None:
    values, distractors = set(), set()
    for inputs, _ in _recall_examples(8, 16, 200):
        values |= set(inputs[1:16:2].tolist())
        distractors |= set(inputs[16:32].tolist())
    assert values == set(range(128, 192))
    assert distractors == set(range(80, 128))


# mutant r07_gap_bound: a gap one past the one that makes a 64-pair sequence 2**30 tokens (data.seq_len's
# limit) accepted
def test_the_largest_recall_gap_makes_a_sequence_of_2_to_the_30_tokens() -> None:
    from innerloop.data.recall import RECALL_GAP_BOUNDS, recall_length

    largest = int(RECALL_GAP_BOUNDS.high)
    assert recall_length(64, largest) == 2**30  # 4 * 64 + gap - 1
    assert largest in RECALL_GAP_BOUNDS and largest + 1 not in RECALL_GAP_BOUNDS


# ------------------------------------------------------------------------------------------------------
# innerloop/models/generate.py
# ------------------------------------------------------------------------------------------------------


# mutant g02_topk_lt: top_k = vocab - 1 taken as "every token" (the least likely one still drawn)
def test_top_k_of_all_tokens_but_one_never_draws_the_last() -> None:
    from innerloop.models.generate import sample_next

    logits = torch.tensor([[1.0, 1.0, 0.9]]).expand(4000, 3)  # token 2: 31% of the mass without top_k
    drawn = sample_next(logits, 1.0, 2, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}


# mutant g03_eos_repeat: a row that has ended repeating the last of several end-of-sequence ids, where
# the docs say the first
def test_a_finished_row_repeats_the_first_end_of_sequence_id() -> None:
    from innerloop.models.generate import generate

    choices = [[3, 1], [1, 3], [1, 1]]  # the token each row's logits favour, step by step

    def model(ids: torch.Tensor, state: int | None) -> tuple[torch.Tensor, int]:
        step = 0 if state is None else state + 1
        logits = torch.zeros(ids.shape[0], ids.shape[1], 5)
        logits[torch.arange(ids.shape[0]), -1, torch.tensor(choices[step])] = 10.0
        return logits, step

    prompt = torch.zeros(2, 2, dtype=torch.long)
    tokens = [t.tolist() for t, _ in generate(model, prompt, 3, temperature=0, eos_token_id=[2, 3])]
    assert tokens == [[3, 1], [2, 3]]  # row 0 ended at step 0: then 2, the first id; row 1 ends at step 1


# mutants f21_dt_range, f22_Alog_range: Gated DeltaNet's and Titans' forgetting gates initialised off
# FLA's init (documented: A_log = log U(0, 16), dt_bias = softplus^-1(dt), dt log-uniform in [1e-3, 1e-1])
@pytest.mark.parametrize("layer_class", ["GatedDeltaNetLayer", "TitansLayer"])
def test_the_forgetting_gate_starts_at_flas_initialisation(layer_class) -> None:
    torch.manual_seed(0)
    # 512 heads, so 512 gates; of 2 features each (Titans' inner LayerNorm refuses heads of one)
    layer = getattr(family, layer_class)(1024, 512)
    dt = torch.nn.functional.softplus(layer.dt_bias.detach().double())
    assert 1e-3 * (1 - 1e-6) <= dt.min() < 1.3e-3 and 0.08 < dt.max() <= 0.1 * (1 + 1e-6)
    assert 0.4 < float((dt < 1e-2).double().mean()) < 0.6  # log-uniform: half below the geometric middle
    A = layer.A_log.detach().double().exp()
    assert 0 < A.min() < 0.5 and 15.5 < A.max() < 16 and 7 < float(A.mean()) < 9  # U(0, 16)


# mutant g13_greedy_tiny: a small positive temperature (below 1e-3) taken as greedy
def test_a_small_temperature_still_samples_in_proportion() -> None:
    from innerloop.models.generate import sample_next

    logits = torch.tensor([[0.0, -1e-4]]).expand(4000, 2)
    drawn = sample_next(logits, 5e-4, None, torch.Generator().manual_seed(0))
    expected = 1 / (1 + math.exp(0.2))  # p(token 1) = softmax([0, -0.2])[1], 0.450
    assert float(drawn.double().mean()) == pytest.approx(expected, abs=0.03)
