"""Review s54h: NaN through the CPU C++ kernels' GELU clamps; the testing kit beyond its default draws."""

from __future__ import annotations

import pytest
import torch

from innerloop import TTTLayer, get_registry
from innerloop.core.functional import relative_error
from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.testing import FLOAT64_TOLERANCE, checks, make_problem
from innerloop.testing.checks import (
    MINI_BATCH_LONGER_THAN_CALL_SHAPE,
    ONE_TOKEN_MINI_BATCH_SHAPE,
    PLUGIN_CHECK_SHAPES,
    UNIT_CHECK_SHAPE,
    WIDE_MINI_BATCH_SHAPE,
)

_NEW_SHAPES = (WIDE_MINI_BATCH_SHAPE, MINI_BATCH_LONGER_THAN_CALL_SHAPE)


@pytest.mark.slow  # the first call loads the compiled library (~2.8 s)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_mlp_kernel_keeps_a_nan_pre_activation_nan_forward_and_backward(dtype):
    """ttt_stack.cpp clamps GELU's derivative argument (and exp_f32's, tanh_of's) with
    ``std::min(std::max(x, lo), hi)``, x first: ``std::max(NaN, lo)`` returns its first argument, so a
    NaN stays NaN (-O3 without -ffast-math keeps that). A NaN token must poison the later outputs and
    the gradients the kernel computes in training, not leave them finite. (No C++ defect was found: the
    clamps keep NaN; this test guards the whole path, it was not seen failing.)"""
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, inner_model="mlp", mini_batch_size=4, kernel="cpu_ttt_mlp", non_finite="ignore")
    layer = layer.to(dtype)
    x = torch.randn(1, 8, 16, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        x[0, 5, 3] = float("nan")
    y, _ = layer(x)
    assert layer.last_dispatch[0] == "cpu_ttt_mlp"
    assert y[0, :4].isfinite().all() and y[0, 5:].isnan().any()
    y[0, 6:].sum().backward()
    assert x.grad[0, 5].isnan().any()


class _RowsPast16Wrong(DualForm):
    """The dual form, but a mini-batch's rows past the 16th read their output 1% too large: the slip of a
    kernel that tiles a mini-batch by 16 rows. Right at every K <= 16."""

    name = "rows_past_16_wrong"

    def forward(self, state, task, views, lr, tau, *args, **kwargs):
        out, new_state = super().forward(state, task, views, lr, tau, *args, **kwargs)
        offsets = (state.position + torch.arange(out.shape[2])) % task.mini_batch_size
        return out * torch.where(offsets >= 16, 1.01, 1.0).to(out.dtype)[:, None], new_state


class _FeaturesPast8Wrong(DualForm):
    """The dual form, but for a head dim above 8 that is not a power of two (12, 20), the features past
    the 8th read 1% too large: a feature tile of 8 whose remainder is mishandled."""

    name = "features_past_8_wrong"

    def forward(self, state, task, views, lr, tau, *args, **kwargs):
        out, new_state = super().forward(state, task, views, lr, tau, *args, **kwargs)
        width = out.shape[-1]
        if width <= 8 or width & (width - 1) == 0:
            return out, new_state
        scale = torch.ones(width, dtype=out.dtype)
        scale[8:] = 1.01
        return out * scale, new_state


#: What check_update_rule checked a rule at without a shape before review s54h: K <= 16, head dim <= 8.
_OLD_DEFAULT_SHAPES = (*PLUGIN_CHECK_SHAPES, UNIT_CHECK_SHAPE, ONE_TOKEN_MINI_BATCH_SHAPE)
_WRONG_RULES = [_RowsPast16Wrong(), _FeaturesPast8Wrong()]


def _errors_at(shape) -> list[float]:
    """Each wrong rule's relative error to the naive loop on one problem (linear, reconstruction)."""
    problem = make_problem("linear", "reconstruction", **shape)
    expected = problem.naive()[0]
    return [relative_error(problem.for_rule(rule).run(rule)[0], expected) for rule in _WRONG_RULES]


@pytest.mark.slow  # ~1.5 s: the naive loop over the 150-token shape
def test_only_the_new_default_shapes_see_a_rule_wrong_past_k16_or_head_dim_8():
    """The old default shapes (K <= 16, head dim <= 8) pass both wrong rules (error ~1e-16); each new
    one sees at least one, and together they see both (measured: 1e-3 to 1e-2)."""
    for shape in _OLD_DEFAULT_SHAPES:
        assert max(_errors_at(shape)) < FLOAT64_TOLERANCE, shape
    caught = [[error > 1e-3 for error in _errors_at(shape)] for shape in _NEW_SHAPES]
    assert caught == [[True, True], [False, True]]  # K = 32 sees both; K = 12 > T = 7 at head dim 12


@pytest.mark.slow  # ~1.5 s: values, whole and cut, at the new shapes
@pytest.mark.parametrize("wrong", _WRONG_RULES, ids=lambda r: r.name)
def test_the_default_check_catches_a_rule_wrong_past_k16_or_head_dim_8(wrong):
    """check_update_rule without a shape now also checks WIDE_MINI_BATCH_SHAPE (K = 32, head dim 20) and
    MINI_BATCH_LONGER_THAN_CALL_SHAPE (K = 12 > T = 7, head dim 12); before review s54h neither was among
    its default shapes. Its values check (whole and cut) at those two shapes (the others pass, above)."""
    wrapping = {"norm": True, "residual": True}
    shapes = [shape for shape, _ in checks._default_check_shapes(wrapping, {})]
    assert all(shape in shapes for shape in _NEW_SHAPES)
    registry = get_registry()
    check = checks._RuleCheck(wrong, [1, 5], 0, FLOAT64_TOLERANCE)  # two cuts: cheap
    model, loss = registry.inner_model("linear"), registry.inner_loss("reconstruction")
    caught = []
    for shape in _NEW_SHAPES:
        try:
            checks._check_rule_on(check, model, loss, {**shape, **wrapping})
        except AssertionError as error:
            assert wrong.name in str(error)
            caught.append(shape)
    assert caught, f"{wrong.name} passed every new default shape"


@pytest.mark.slow  # ~1 s: hypothesis searches its draws
def test_wide_problems_first_example_and_its_draws():
    """wide_problems' simplest example is K = 32, T = 45 (T % K != 0), head dim 12; its draws reach
    K > T and every head dim and mini-batch it lists; a bad list is named."""
    from hypothesis import find
    from hypothesis import strategies as st

    from innerloop.testing.strategies import WIDE_HEAD_DIMS, WIDE_MINI_BATCHES, wide_problems

    first = find(wide_problems(), lambda shape: True)
    assert first == {"batch": 2, "heads": 2, "head_dim": 12, "tokens": 45, "mini_batch_size": 32}
    assert find(wide_problems(), lambda s: s["mini_batch_size"] > s["tokens"])["tokens"] == 16
    assert find(wide_problems(inner_models=("mlp",)), lambda s: True)["model"] == "mlp"
    assert set(WIDE_HEAD_DIMS) > {12, 20, 33, 64} and max(WIDE_MINI_BATCHES) == 64
    with pytest.raises(ValueError, match="wide_problems: mini_batch_sizes must hold positive integers"):
        find(wide_problems(mini_batch_sizes=(0,)), lambda s: True)
    with pytest.raises(ValueError, match="wide_problems: head_dims"):
        find(st.just(0).flatmap(lambda _: wide_problems(head_dims=())), lambda s: True)


@pytest.mark.slow  # ~0.5 s: two naive loops of 45 tokens
@pytest.mark.parametrize("wrong", _WRONG_RULES, ids=lambda r: r.name)
def test_wide_problems_first_example_catches_a_rule_wrong_past_k16_or_head_dim_8(wrong):
    from hypothesis import find

    from innerloop.testing.strategies import wide_problems

    shape = find(wide_problems(), lambda shape: True)
    problem = make_problem("linear", "reconstruction", **shape).for_rule(wrong)
    assert relative_error(problem.run(wrong)[0], problem.naive()[0]) > 1e-3


@pytest.mark.slow  # ~0.3 s warm; alone it builds the registry (~2.5 s)
def test_the_reference_memo_runs_once_per_problem_returns_copies_and_skips_graphs(monkeypatch):
    """Within check_update_rule the reference runs once per distinct problem (the check rebuilds the
    same one for values, no-grad modes, zero gates); a caller that writes into what it got does not
    change the next caller's numbers, and a problem whose inputs require grad is not memoised."""
    runs = []
    naive = checks.naive_token_loop
    monkeypatch.setattr(checks, "naive_token_loop", lambda *a, **k: runs.append(1) or naive(*a, **k))
    rule = get_registry().update_rule("dual_form")
    with checks._memoised_references():
        first = checks.finite_expected(make_problem("linear", "reconstruction", tokens=5), rule)
        wanted = first[0].clone()
        first[0].add_(1.0)
        again = checks.finite_expected(make_problem("linear", "reconstruction", tokens=5), rule)
        assert len(runs) == 1 and torch.equal(again[0], wanted)
        checks.finite_expected(make_problem("linear", "reconstruction", tokens=5, seed=1), rule)
        assert len(runs) == 2  # another seed: another problem
        graph = make_problem("linear", "reconstruction", tokens=5)
        graph.lr.requires_grad_(True)
        checks.finite_expected(graph, rule)
        checks.finite_expected(graph, rule)
        assert len(runs) == 4
    checks.finite_expected(make_problem("linear", "reconstruction", tokens=5), rule)
    assert len(runs) == 5  # outside a check: no memo
