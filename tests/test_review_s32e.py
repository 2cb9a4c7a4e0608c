"""Review s32e: a last look at the day's changes (f6da202..). Each test here found something (a
regression test), unless its docstring says it covers a promise no other test covered."""

from __future__ import annotations

import pytest
import torch
from plugin_testing import ModuleEntryPoint

from innerloop.core.ops import scan

# --- minibatch_gd's planned primal form (b661ad3) on an empty batch ------------------------------------


@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
def test_minibatch_gd_with_decay_takes_an_empty_batch(inner_model: str) -> None:
    """b661ad3 reshaped each gradient with ``-1`` for its trailing size, which torch cannot infer from
    a batch of 0 sequences: ``scan(update_rule="minibatch_gd", decay=...)`` on ``B = 0`` (which
    ops.scan takes, tests/core/test_review_s17_core_inputs.py) raised 'cannot reshape tensor of 0
    elements' from inside the rule; it ran before. It also warned (torch's 'var(): degrees of freedom is
    <= 0', from the inner LayerNorm under torch.func's transforms over no rows), with decay or without:
    a batch of no sequences is no mistake, and the primal form now computes it from one row of zeros."""
    import warnings

    q = torch.randn(0, 2, 12, 8)
    per_token = torch.rand(0, 2, 12)
    for decay in (per_token, None):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            outputs, weights = scan(
                q, q, q, per_token, inner_model=inner_model, update_rule="minibatch_gd", decay=decay
            )
        assert outputs.shape == (0, 2, 12, 8)
        assert weights and all(w.shape[:2] == (0, 2) for w in weights.values())


# --- the chunked delta rule's non-finite path (b266abc) and what TTTLayer's docstring says of it --------


def test_delta_chunk_nan_reaches_no_earlier_output_and_the_layer_docstring_says_so() -> None:
    """b266abc made ``delta_chunk`` run its token loop on a NaN input, so the NaN no longer reaches its
    64-token chunk's earlier outputs (ops.scan's docstring and delta_chunk/README.md were updated); the
    ``non_finite`` entry of ``TTTLayer``'s docstring still said it spread to 'a chunked
    kernel's whole chunk: delta_chunk's 64 tokens'."""
    from innerloop import TTTLayer

    torch.manual_seed(0)
    options = {"inner_model": "matrix", "mini_batch_size": 1, "inner_norm": False, "inner_residual": False}
    layer = TTTLayer(hidden_size=16, num_heads=2, kernel="delta_chunk", non_finite="ignore", **options)
    x = torch.randn(1, 100, 16)
    x[0, 70] = float("nan")
    with torch.no_grad():
        y, _ = layer(x)
    assert layer.last_dispatch[0] == "delta_chunk"
    finite = torch.isfinite(y[0]).all(-1)
    assert finite[:70].all() and not finite[70:].any()
    doc = " ".join((TTTLayer.__doc__ or "").split())
    assert "64 tokens" not in doc and "whole chunk" not in doc
    assert (
        "on every path (the chunked ``delta_chunk`` kernel then runs its token loop for the whole batch"
        in doc
    )


# --- testing/checks.py and testing/strategies.py: the new argument checks (326d0a4, 283a82e, 9faea32) ---


def test_make_problem_and_check_update_rule_take_numpy_and_torch_integers() -> None:
    """The new checks took ``isinstance(value, int)`` for 'an integer', so a numpy or 0-d torch integer
    (``np.arange`` cut points, a size read from an array), which make_problem and check_update_rule
    took before, was refused: 'batch must be an int >= 1, got np.int64(2)', 'cut_points must be a
    list of token indices (ints), got [np.int64(5)]'. The project takes them elsewhere
    (``init_state(np.int64(3))``). Floats and bools are still refused."""
    import numpy as np

    from innerloop import get_registry
    from innerloop.testing.checks import check_update_rule, make_problem

    registry = get_registry()
    model, loss = registry.inner_model("linear"), registry.inner_loss("reconstruction")
    problem = make_problem(
        model, loss, batch=np.int64(2), tokens=torch.tensor(7), mini_batch_size=np.int32(3)
    )
    assert problem.views.query.shape == (2, 2, 7, 4) and type(problem.task.mini_batch_size) is int
    rule = registry.update_rule("dual_form")
    options = {"model": "linear", "loss": "reconstruction", "norm": True, "residual": True}
    check_update_rule(rule, cut_points=[np.int64(5), torch.tensor(3)], tokens=np.int64(9), **options)
    with pytest.raises(TypeError, match=r"cut_points must be a list of token indices \(ints\), got \[5.0\]"):
        check_update_rule(rule, cut_points=[5.0], tokens=9, **options)
    with pytest.raises(ValueError, match="batch must be an int >= 1, got True"):
        make_problem(model, loss, batch=True)


def test_check_update_rule_still_refuses_numpy_cut_points_that_cut_nothing() -> None:
    """The cut points' check (9faea32) with the length given as a numpy integer: it returned early on a
    length that is not an ``int``; now it reads the length as an integer and still refuses."""
    import numpy as np

    from innerloop import get_registry
    from innerloop.testing.checks import check_update_rule

    rule = get_registry().update_rule("dual_form")
    with pytest.raises(ValueError, match=r"cut none of the sequences checked \(lengths \[9\]\)"):
        check_update_rule(
            rule, model="linear", loss="reconstruction", cut_points=[np.int64(9)], tokens=np.int64(9)
        )


def test_strategies_take_numpy_integers() -> None:
    """strategies.py's new argument checks (283a82e) refused numpy integers that hypothesis drew from
    before: 'split_points: total must be an integer >= 0, got np.int64(10)'. A float is still refused."""
    import numpy as np
    from hypothesis import given, settings

    from innerloop.testing.strategies import layer_configs, split_points, views

    def draw(strategy: object) -> None:
        @given(drawn=strategy)
        @settings(max_examples=1, deadline=None, database=None)
        def run(drawn: object) -> None:
            pass

        run()

    draw(split_points(np.int64(10)))
    draw(views(max_batch=np.int64(2), head_dims=(np.int64(4),)))
    draw(layer_configs(max_heads=np.int64(2), head_dims=(np.int64(8),)))
    with pytest.raises(ValueError, match=r"split_points: total must be an integer >= 0, got 2.0"):
        draw(split_points(2.0))


# --- delta_chunk's non-finite test (b266abc): its cost on every call, and what it must still catch ------


def _delta_inputs(tokens: int = 130, dtype: torch.dtype = torch.float64) -> tuple:
    generator = torch.Generator().manual_seed(0)
    xq, xk, xv = (torch.randn(1, 2, tokens, 8, generator=generator, dtype=dtype) * 0.3 for _ in range(3))
    lr = torch.rand(1, 2, tokens, generator=generator, dtype=dtype) * 0.5
    weights = torch.randn(1, 2, 8, 8, generator=generator, dtype=dtype) * 0.1
    return xq, xk, xv, lr, weights


@pytest.mark.parametrize("where", ["xk", "xv", "lr", "W"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_delta_chunk_non_finite_input_reaches_no_earlier_token(where: str, bad: float) -> None:
    """The check now sums each tensor (a NaN or inf makes the sum so) instead of ``isfinite(t).all()``:
    any NaN, inf or -inf in a key, value, step or the starting state still runs the token loop, so the
    outputs before the bad token equal the chunked form's on clean data and those from it on are not
    finite, as on the torch path."""
    from innerloop.kernels.delta_chunk.adapter import delta_rule_kernel_forward

    xq, xk, xv, lr, weights = _delta_inputs()
    tau = torch.ones(1, dtype=torch.float64)
    clean, _ = delta_rule_kernel_forward(xq, xk, xv, lr, tau, {"W": weights}, None, None, 1e-6)
    tensors = {"xk": xk.clone(), "xv": xv.clone(), "lr": lr.clone(), "W": weights.clone()}
    bad_token = 0 if where == "W" else 70
    if where == "lr":
        tensors["lr"][0, 0, bad_token] = bad
    elif where == "W":
        tensors["W"][0, 0, 2, 3] = bad
    else:
        tensors[where][0, 0, bad_token, 3] = bad
    out, state = delta_rule_kernel_forward(
        xq, tensors["xk"], tensors["xv"], tensors["lr"], tau, {"W": tensors["W"]}, None, None, 1e-6
    )
    torch.testing.assert_close(out[:, :, :bad_token], clean[:, :, :bad_token], rtol=1e-12, atol=1e-12)
    assert not torch.isfinite(out[0, 0, bad_token + 1 :]).all(-1).any()
    torch.testing.assert_close(out[0, 1], clean[0, 1], rtol=1e-12, atol=1e-12)  # the other head: exact


def test_delta_chunk_finite_input_whose_sum_overflows_still_equals_the_token_loop() -> None:
    """A finite tensor whose sum overflows float32 (the cheaper check's one false alarm) runs the token
    loop: the same numbers as the torch path's, only slower."""
    from innerloop.kernels.delta_chunk.adapter import _all_finite, delta_rule_kernel_forward
    from innerloop.kernels.delta_chunk.naive import delta_rule_loop

    xq, xk, xv, lr, weights = _delta_inputs(tokens=70, dtype=torch.float32)
    xv = xv.sign() * 3e37  # finite; their sum is not in float32
    assert bool(torch.isfinite(xv).all()) and not _all_finite(xv)
    tau = torch.ones(1)
    out, state = delta_rule_kernel_forward(xq, xk, xv, lr, tau, {"W": weights}, None, None, 1e-6)
    expected, final = delta_rule_loop(xq, xk, xv, lr, initial_state=weights, decay_first=False)
    assert torch.equal(out, expected) and torch.equal(state["W"], final)


def test_delta_chunk_non_finite_check_costs_a_sum_not_an_isfinite_pass() -> None:
    """b266abc's check ran ``isfinite(t).all()`` on every chunked call, 2.5 ms of a 14 ms forward at
    B = 1, H = 4, T = 2048, f = 64 on one CPU thread (21%, where its README said 4%); one float32 sum
    per tensor, 0.2 ms, says the same. Held here by the ops it runs, not by a timing (which a loaded
    machine made flaky): the only op that reads a whole input is one sum per tensor; ``isfinite`` sees
    the few sums alone."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from innerloop.kernels.delta_chunk.adapter import _all_finite

    class Reads(TorchDispatchMode):
        """Each op's name and the largest tensor it was given."""

        def __init__(self) -> None:
            super().__init__()
            self.ops: list[tuple[str, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            sizes = [
                a.numel()
                for a in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(a, torch.Tensor)
            ]
            self.ops.append((func.overloadpacket.__name__, max(sizes, default=0)))
            return func(*args, **(kwargs or {}))

    generator = torch.Generator().manual_seed(0)
    xk, xv = (torch.randn(1, 4, 2048, 64, generator=generator) for _ in range(2))
    lr, weights = torch.rand(1, 4, 2048, generator=generator), torch.zeros(1, 4, 64, 64)
    with Reads() as reads:
        assert _all_finite(xk, xv, lr, weights, None)
    whole_reads = [name for name, size in reads.ops if size >= lr.numel() and name != "detach"]  # a view
    assert whole_reads == ["sum", "sum", "sum", "sum"], reads.ops  # one pass over each input
    # every other op reads the four sums at most (s50d: this asked it of the ops named "isfinite", and under
    # a dispatch mode isfinite runs as abs, ne, eq and mul: none was named so, and the check held whatever
    # isfinite read)
    others = [(name, size) for name, size in reads.ops if name not in ("detach", "promote_types", "sum")]
    assert others and all(size <= 4 for _, size in others), reads.ops


# --- registry: a failing entry point's roll-back (116c97b) and a valid plugin it imported --------------

_SHARED_PLUGIN = """
import innerloop
from innerloop import HalfSquaredError, LossPairs


class SharedLoss(HalfSquaredError):
    name = "s32e_shared_loss"

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})


innerloop.register_inner_loss(SharedLoss())
"""


def test_a_failing_entry_point_does_not_take_down_a_valid_plugin_it_imported(tmp_path, monkeypatch) -> None:
    """Two installed plugins: ``s32e_shared`` registers a loss at import (no hook, as documented), and
    ``s32e_extra`` imports it and then fails (a missing dependency). Loaded shared-first, the loss is
    registered; loaded extra-first (install order), the roll-back removed the loss, and ``shared``'s own
    entry point was then refused as 'implements no innerloop hook' (s32e's strict xfail). The roll-back
    now keeps what another entry point's module registered aside for that entry point, which registers
    it; the failing plugin is not said to provide it."""
    import sys
    import warnings

    import innerloop
    from innerloop.registry import manager
    from innerloop.registry.manager import isolated_registry

    (tmp_path / "s32e_shared.py").write_text(_SHARED_PLUGIN)
    (tmp_path / "s32e_extra.py").write_text(
        "import s32e_shared  # noqa\nraise ImportError('needs a missing dependency')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("s32e_shared", "s32e_extra"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(manager, "_REGISTERED_AT_IMPORT", dict(manager._REGISTERED_AT_IMPORT))
    monkeypatch.setattr(manager, "_ROLLED_BACK_AT_IMPORT", {})
    entry_points = [ModuleEntryPoint("extra", "s32e_extra"), ModuleEntryPoint("shared", "s32e_shared")]
    monkeypatch.setattr(manager, "_entry_points", lambda: entry_points)
    try:
        for _ in range(2):  # a later registry of the process too (no module is imported again)
            with isolated_registry(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                registry = innerloop.get_registry()
                (broken,) = registry.broken()
                assert broken.entry_point == "extra" and broken.names == (), broken
                assert "s32e_shared_loss" in registry.names("inner_loss")
                origin = registry.entries("inner_loss")[-1].origin
                assert registry.distribution(origin) == ("shared-dist", "0.1")
    finally:
        for name in ("s32e_shared", "s32e_extra"):
            sys.modules.pop(name, None)


# --- registry: a plugin class refused as 'an instance method' (ec4c7f0) ---------------------------------


def test_a_class_used_as_a_namespace_of_hooks_still_registers() -> None:
    """ec4c7f0 refused every class whose marked hook is a plain function, as 'an instance method:
    register an instance', to catch ``def hook(self, register)`` on a class. A class whose hooks take
    ``register`` first (no self: pluggy calls them on the class, as for a module) registered before and
    was refused too, with advice that would break it (an instance would bind ``register`` to itself).
    Such a class registers again; one whose hook takes ``self`` is still refused (tests/test_review_s32d.py)."""
    import innerloop
    from innerloop import HalfSquaredError, LossPairs, PluginError, hookimpl
    from innerloop.registry.manager import isolated_registry

    class Loss(HalfSquaredError):
        name = "s32e_namespace_loss"

        def pairs(self, views, carry):
            return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})

    class Namespace:
        @hookimpl
        def register_inner_losses(register):  # noqa: N805 (no self: called on the class)
            register(Loss())

    class NeedsAnInstance:
        @hookimpl
        def register_inner_losses(self, register):
            register(Loss())

    with isolated_registry():
        innerloop.register(Namespace)
        assert "s32e_namespace_loss" in innerloop.get_registry().names("inner_loss")
    with isolated_registry(), pytest.raises(PluginError, match="register an instance, .*NeedsAnInstance()"):
        innerloop.register(NeedsAnInstance)


# --- check_update_rule given decay / momentum among its problem options (420c79d) -----------------------


@pytest.mark.parametrize("given", [{"decay": True}, {"decay": False}, {"momentum": True}])
def test_check_update_rule_refuses_decay_or_momentum_among_problem_options(given: dict) -> None:
    """420c79d merged each variant with the problem options as ``{**variant, **problem_kwargs}``, so
    ``check_update_rule(minibatch_gd, ..., decay=True)`` replaced the plain variant's decay=False and
    failed with 'minibatch_gd (linear, reconstruction) with decay 0 vs without decay: relative error
    3.5e-01', blaming a correct rule; other options raised Python's 'got multiple values for keyword
    argument'. Both are now refused at the call, naming the option (check_update_rule_gradients too)."""
    from innerloop import get_registry
    from innerloop.testing.checks import check_update_rule, check_update_rule_gradients

    registry = get_registry()
    rule = registry.update_rule("minibatch_gd")
    (name,) = given
    with pytest.raises(TypeError, match=rf"check_update_rule: {name}=\w+ is not a problem option here"):
        check_update_rule(rule, model="linear", loss="reconstruction", tokens=9, **given)
    with pytest.raises(TypeError, match=rf"check_update_rule_gradients: {name}=\w+ is not a problem option"):
        check_update_rule_gradients(
            rule, registry.inner_model("linear"), registry.inner_loss("reconstruction"), **given
        )
