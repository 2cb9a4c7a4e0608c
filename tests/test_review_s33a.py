"""Review s33a: regression tests for what the grader of issues 2 and 12 found."""

from __future__ import annotations

import pytest
import torch

from innerloop.core.protocol import InnerModel
from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.testing import check_update_rule, checks


class _WrongAtSizeOne(DualForm):
    """Dual form, but its step is 1% off when one dimension has size 1: what a ``.squeeze()`` does to a
    rule (it drops the batch of a single sequence in generation, the head of a one-head layer, the
    mini-batch of DeltaNet's K = 1)."""

    def __init__(self, name: str, dimension: str) -> None:
        self.name = name
        self.dimension = dimension

    def forward(self, state, task, views, lr, tau, decay=None):
        sizes = {
            "batch": views.query.shape[0],
            "heads": views.query.shape[1],
            "head_dim": views.query.shape[3],
            "mini_batch_size": task.mini_batch_size,
        }
        if sizes[self.dimension] == 1:
            lr = 1.01 * lr
        return super().forward(state, task, views, lr, tau, decay)


def test_check_update_rule_reaches_every_size_of_one_by_default():
    """Before, the default shapes had two sequences or more, two heads or more, head dims 4 and 5 and
    mini-batches of 4, 5 and 16 (and ``strategies.problems`` draws batches from 2): a rule wrong for one
    sequence, one head, head dim 1 or K = 1 passed check_update_rule."""
    assert checks.UNIT_CHECK_SHAPE == {
        "batch": 1,
        "heads": 1,
        "head_dim": 1,
        "tokens": checks.UNIT_CHECK_SHAPE["tokens"],
        "mini_batch_size": 1,
    }
    shapes = [shape for shape, _ in checks._default_check_shapes({"norm": True, "residual": True}, {})]
    assert checks.UNIT_CHECK_SHAPE in shapes


@pytest.mark.slow  # reason: check_update_rule's default shapes include a 150-token naive loop (~1 s each)
@pytest.mark.parametrize("dimension", ["batch", "heads", "head_dim", "mini_batch_size"])
def test_a_rule_wrong_at_a_size_of_one_is_caught_and_the_shape_named(dimension):
    rule = _WrongAtSizeOne(f"s33a_wrong_at_{dimension}_1", dimension)
    with pytest.raises(AssertionError, match=r"at B=1 H=1 T=9 f=1 K=1, cut at"):
        check_update_rule(rule, model="linear", loss="reconstruction", gradients=False, without_grad=False)


@pytest.mark.slow  # reason: three rules through the naive loop, cut at every token (~0.8 s)
def test_the_builtin_rules_pass_at_the_unit_shape():
    for rule in ("dual_form", "minibatch_gd", "momentum"):
        check_update_rule(
            rule, model="linear", loss="reconstruction", gradients=False, without_grad=False,
            **checks.UNIT_CHECK_SHAPE, norm=False, residual=True, dtype=torch.float64,
        )  # fmt: skip


# ---- the kit's own arguments: one error naming the argument, not a misleading check failure -------


@pytest.mark.parametrize("tolerance", [-1.0, float("nan"), float("inf"), "1e-9"])
def test_check_update_rule_refuses_a_tolerance_that_is_not_a_finite_number_at_least_0(tolerance):
    """Before: -1 failed the right built-in rule ('relative error 0.000e+00 > -1.0e+00'), NaN failed it
    as 'allowed: nan' (and passed the comparisons written ``error > tolerance``)."""
    with pytest.raises(ValueError, match=r"check_update_rule: tolerance must be a finite number >= 0.*got"):
        check_update_rule("dual_form", model="linear", tolerance=tolerance)


def test_check_update_rule_gradients_takes_a_rule_by_name_as_check_update_rule_does():
    """Before: AttributeError: 'str' object has no attribute 'supports_decay' (and a misspelt name
    was not named as unknown)."""
    with pytest.raises(ValueError, match=r"unknown update rule 'dual_from'; registered: \["):
        checks.check_update_rule_gradients("dual_from", "matrix", "reconstruction")


def test_make_problem_takes_registered_names_and_refuses_a_bad_seed_or_dtype():
    """Before: make_problem('linear', ...) raised AttributeError ('str' has no 'init_params'), a str
    seed torch's RuntimeError from manual_seed, and dtype=torch.int64 built a problem whose random
    inputs were truncated to integers, silently."""
    by_name = checks.make_problem("matrix", "reconstruction", tokens=3)
    assert set(by_name.state.params) == {"W"}
    with pytest.raises(TypeError, match=r"seed must be an int, got 'a'"):
        checks.make_problem("matrix", "reconstruction", seed="a")
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch dtype .* got torch.int64"):
        checks.make_problem("matrix", "reconstruction", dtype=torch.int64)


class _NoStack(InnerModel):
    """A matrix model that declares no stack: the dual form refuses it (check_model)."""

    name = "s33a_no_stack"

    def param_shapes(self, head_dim):
        return {"W": (head_dim, head_dim)}

    def init_params(self, num_heads, head_dim, generator=None):
        return {"W": torch.zeros(num_heads, head_dim, head_dim)}

    def forward(self, params, x):
        return x @ params["W"]


def test_check_update_rule_on_a_model_the_rule_refuses_says_so():
    """Before: TypeError: 'NoneType' object is not iterable, from inside the dual form."""
    with pytest.raises(
        ValueError, match=r"update rule 'dual_form' refuses inner model 's33a_no_stack' \(its"
    ):
        check_update_rule("dual_form", model=_NoStack())


def test_check_zero_decay_and_momentum_takes_registered_names():
    """Before: AttributeError: 'str' object has no attribute 'uses_token_scale'."""
    checks.check_zero_decay_and_momentum("momentum", "matrix", "reconstruction", tokens=5)
