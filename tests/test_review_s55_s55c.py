"""Review s55c: named kernels and the update rules whose blocks never reach one (s54q), the scan's
momentum range and error wording (s54o)."""

from __future__ import annotations

import copy
import enum
import functools
import itertools
from collections.abc import Callable

import pytest
import torch

import innerloop
from innerloop import TTTLayer
from innerloop.kernels.dispatch import KernelUnavailableError, refused_named_kernels
from innerloop.kernels.reference import reference_kernel
from innerloop.kernels.spec import KernelSpec
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel

CPU = torch.device("cpu")
TORCH_ONLY_RULES = ("momentum", "minibatch_gd")


def _register_user_kernel(rule: str) -> str:
    """A kernel for (linear, reconstruction, ``rule``) computing the dual form's numbers, taking every
    block; returns its name."""
    forward, _ = reference_kernel(LinearModel(), Reconstruction())
    name = f"s55c_user_{rule}"
    innerloop.register_kernel(
        KernelSpec(
            name=name,
            inner_model="linear",
            inner_loss="reconstruction",
            update_rule=rule,
            forward=forward,
            verify=lambda inputs: None,
        )
    )
    return name


@pytest.mark.usefixtures("fresh_global_registry")
@pytest.mark.parametrize("rule", TORCH_ONLY_RULES)
def test_a_kernel_named_for_a_rule_that_runs_no_kernel_is_refused_at_construction(rule) -> None:
    # A kernel registered for momentum (whose state S no kernel contract carries) passed the construction
    # check and refused_named_kernels, then failed at the first step; one registered for minibatch_gd
    # (the primal form, on torch) never ran at all, silently. Both are refused when the layer is built,
    # naming kernel=, the rule, and the kernels that do run this model and loss.
    name = _register_user_kernel(rule)
    expected = rf"kernel={name!r}.*update_rule={rule!r}.*fused_torch_linear"
    with pytest.raises(ValueError, match=expected):
        TTTLayer(16, 2, inner_model="linear", update_rule=rule, mini_batch_size=4, kernel=name)
    layer = TTTLayer(16, 2, inner_model="linear", update_rule=rule, mini_batch_size=4)
    with pytest.raises(ValueError, match=expected):
        layer.kernel = name
    x = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match=expected):
        innerloop.ops.scan(x, x, x, torch.zeros(1, 2, 4), inner_model="linear", update_rule=rule, kernel=name)


def _configurations() -> list[dict]:
    """The layer settings each combination is built with: the stack kernels' (inner LayerNorm and
    residual on) and the delta rule's (both off, one token a mini-batch)."""
    return [
        {"mini_batch_size": 4, "inner_norm": True, "inner_residual": True},
        {"mini_batch_size": 1, "inner_norm": False, "inner_residual": False},
    ]


def _outcomes(rule: str, model: str, loss: str, kernels: list[str], settings: dict) -> dict[str, str]:
    """What naming each of ``kernels`` does to a layer of ``rule``, ``model`` and ``loss``: ``"refused"``
    (by kernel=, checked as at construction), ``"refused before the run"`` (by refused_named_kernels and
    at the first step alike), or ``"ran"`` (the kernel ran and matched the torch path); anything else
    fails. Empty where the combination is no layer even on torch."""
    torch.manual_seed(0)
    try:
        layer = TTTLayer(
            16, 2, inner_model=model, inner_loss=loss, update_rule=rule, kernel="torch", **settings
        )
    except ValueError:
        return {}
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    torch_path = copy.deepcopy(layer)
    expected = functools.cache(lambda trains: _output(torch_path, x, trains))  # where a kernel ran
    return {kernel: _outcome(layer, kernel, x, expected) for kernel in kernels}


def _output(layer: TTTLayer, x: torch.Tensor, trains: bool) -> torch.Tensor:
    with torch.set_grad_enabled(trains):
        return layer(x)[0]


def _outcome(layer: TTTLayer, kernel: str, x: torch.Tensor, expected: Callable[[bool], torch.Tensor]) -> str:
    layer.kernel = "torch"
    try:
        layer.kernel = kernel  # the check a layer built with kernel=... makes
    except ValueError as error:
        assert f"kernel={kernel!r}" in str(error), error
        return "refused"
    trains = not _spec(kernel).training_only  # a compiled kernel would compile for ~30 s
    if refused_named_kernels(torch.nn.Sequential(layer), [CPU], requires_grad=trains):
        with pytest.raises(KernelUnavailableError, match=f"kernel={kernel!r}"):
            _output(layer, x, trains)
        return "refused before the run"
    out = _output(layer, x, trains)
    paths = {path.removesuffix(".decode") for path, _ in layer.dispatches}
    assert kernel in paths or not trains, (kernel, layer.dispatches)
    torch.testing.assert_close(out, expected(trains), rtol=1e-4, atol=1e-5)
    return "ran"


def _spec(kernel: str) -> KernelSpec:
    from innerloop.registry import get_registry

    return next(spec for spec in get_registry().kernels() if spec.name == kernel)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_global_registry")
def test_every_rule_model_loss_and_kernel_either_runs_and_matches_torch_or_is_refused() -> None:
    # Table: every (update_rule, inner_model, inner_loss, kernel) the registry offers, plus a user kernel
    # for each rule that runs on torch only, under the stack kernels' and the delta rule's settings.
    from innerloop.registry import get_registry

    for rule in TORCH_ONLY_RULES:
        _register_user_kernel(rule)
    registry = get_registry()
    kernels = [spec.name for spec in registry.kernels()]
    table = {}
    for rule, model, loss, (index, settings) in itertools.product(
        registry.names("update_rule"),
        registry.names("inner_model"),
        registry.names("inner_loss"),
        enumerate(_configurations()),
    ):
        for kernel, outcome in _outcomes(rule, model, loss, kernels, settings).items():
            table[rule, model, loss, kernel, index] = outcome
    ran = sorted({key[3] for key, outcome in table.items() if outcome == "ran"})
    assert all(outcome == "refused" for key, outcome in table.items() if key[0] in TORCH_ONLY_RULES), table
    assert {"fused_torch_linear", "fused_torch_mlp", "delta_chunk", "cpu_ttt_linear"} <= set(ran), ran


def _delta_arguments(**changed) -> dict:
    B, H, T, f = 1, 2, 5, 4
    x = torch.randn(B, H, T, f, generator=torch.Generator().manual_seed(0))
    arguments = dict(
        xq=x, xk=x.clone(), xv=x.clone(), lr=torch.full((B, H, T), 0.1), tau=torch.ones(1),
        params={"W": torch.zeros(B, H, f, f)}, ln_weight=None, ln_bias=None, eps=1e-6,
    )  # fmt: skip
    return {**arguments, **changed}


@pytest.mark.parametrize(
    "changed, named",
    [
        ({"xq": torch.zeros(1, 2, 5, 3)}, "xk"),  # xk's shape is read off xq's and xv's
        ({"xk": torch.zeros(1, 2, 5, 3)}, "xk"),
        ({"xv": torch.zeros(1, 2, 4, 4)}, "xv"),
        ({"xq": torch.zeros(2, 5, 4)}, "xq"),
        ({"xk": torch.zeros(1, 2, 5, 4, dtype=torch.float64)}, "xq"),  # "xq, xk and xv must share"
        ({"lr": torch.zeros(1, 2, 6)}, "lr"),
        ({"params": {"W": torch.zeros(1, 2, 4, 5)}}, "params['W']"),
        ({"params": {"W": torch.zeros(1, 2, 4, 4, dtype=torch.float64)}}, "params['W']"),
        ({"decay": torch.zeros(1, 2, 6)}, "decay"),
        ({"decay_log": torch.zeros(1, 2, 4)}, "decay_log"),
    ],
    ids=[
        "xq-dim",
        "xk-dim",
        "xv-tokens",
        "xq-3d",
        "xk-dtype",
        "lr",
        "W-shape",
        "W-dtype",
        "decay",
        "decay_log",
    ],
)
def test_delta_rule_kernel_forward_names_its_own_arguments_in_its_errors(changed, named) -> None:
    # called directly (it is a kernel's forward, KernelForward's parameters), it refused bad input naming
    # the chunked form's inner arguments: q, k, v, beta, initial_state, and decay_log for a bad decay
    from innerloop.kernels.delta_chunk.adapter import delta_rule_kernel_forward

    with pytest.raises((ValueError, TypeError)) as raised:
        delta_rule_kernel_forward(**_delta_arguments(**changed))
    message = str(raised.value)
    assert message.startswith(named + " ") or message.startswith(named + ","), message
    for inner in ("q", "k", "v", "beta", "initial_state", "gate"):
        assert f" {inner} " not in f" {message} ".replace(",", " "), message


_B, _H, _T = 1, 2, 12
_NAN_PATHS = {
    "dual_form-torch": {"kernel": "torch"},
    "dual_form-fused": {"kernel": "fused_torch_linear"},
    "minibatch_gd": {"update_rule": "minibatch_gd"},
    "momentum": {"update_rule": "momentum", "momentum": torch.full((_B, _H, _T), 0.5)},
    "delta_chunk": {
        "inner_model": "matrix",
        "mini_batch_size": 1,
        "inner_norm": False,
        "inner_residual": False,
        "kernel": "delta_chunk",
    },  # fmt: skip
}


@pytest.mark.parametrize("path", list(_NAN_PATHS))
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_a_non_finite_input_reaches_the_outputs_scan_documents(path, where) -> None:
    # ops.scan's docstring said a NaN or inf input spreads to its whole mini-batch, earlier tokens included:
    # a NaN q reaches its own token's output only (q only reads the weights), and under minibatch_gd (the
    # primal form) a NaN k or v leaves its mini-batch's earlier tokens finite, on these paths
    options = {"mini_batch_size": 4, **_NAN_PATHS[path]}
    generator = torch.Generator().manual_seed(0)
    q, k, v = (0.5 * torch.randn(_B, _H, _T, 8, generator=generator) for _ in range(3))
    inputs = {"q": q, "k": k, "v": v}
    bad = 5
    inputs[where][0, 0, bad] = float("nan")
    dispatches: list = []
    out, _ = innerloop.ops.scan(
        *inputs.values(), torch.full((_B, _H, _T), 0.1), dispatches=dispatches, **options
    )
    if "kernel" in options and options["kernel"] != "torch":
        assert {p for p, _ in dispatches} == {options["kernel"]}, dispatches
    reached = [t for t in range(_T) if not bool(torch.isfinite(out[0, 0, t]).all())]
    assert bool(torch.isfinite(out[0, 1]).all())  # the other head
    size = options["mini_batch_size"]
    from_its_mini_batch = path not in ("minibatch_gd",)
    first = bad - bad % size if from_its_mini_batch else bad
    assert reached == ([bad] if where == "q" else list(range(first, _T))), reached


@pytest.mark.parametrize("rule, first", [("dual_form", 4), ("momentum", 4), ("minibatch_gd", 5)])
def test_a_nan_token_under_non_finite_ignore_reaches_what_the_layer_documents(rule, first) -> None:
    # TTTLayer's non_finite docs (and the README's): its whole mini-batch, earlier tokens included, and
    # all later ones; under minibatch_gd (the primal form) from the token on
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=4, update_rule=rule, non_finite="ignore")
    x = torch.randn(1, 12, 16)
    x[0, 5] = float("nan")
    out, _ = layer(x)
    assert [t for t in range(12) if not bool(torch.isfinite(out[0, t]).all())] == list(range(first, 12))


@pytest.mark.parametrize("low, high", [(1.0, 1.6), (-0.6, 0.0), (-1.5, 1.5)])
@pytest.mark.parametrize("model", ["matrix", "linear", "mlp"])
def test_a_momentum_outside_zero_one_is_computed_as_written(model, low, high) -> None:
    # s54o: ops.scan takes any finite momentum (momentum DeltaNet's mu * beta_t / beta_{t-1} can exceed 1);
    # the range is now documented, and the rule equals the naive token loop there too (measured: within
    # 2e-14 relative, float64, decay on, 13 tokens cut across mini-batches of 4)
    from dataclasses import replace

    from innerloop.plugins.optimizers.momentum import Momentum
    from innerloop.testing import make_problem

    rule = Momentum()
    problem = make_problem(model, "reconstruction", momentum=True, decay=True, tokens=13).for_rule(rule)
    generator = torch.Generator().manual_seed(3)
    gate = low + (high - low) * torch.rand(problem.momentum.shape, generator=generator, dtype=torch.float64)
    problem = replace(problem, momentum=gate)
    (out, state), (expected, expected_state) = problem.run(rule), problem.naive()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name, weight in expected_state.params.items():
        torch.testing.assert_close(state.params[name], weight, rtol=1e-12, atol=1e-12)


class _Python310Flag(enum.Flag):
    """A Flag as Python 3.10 names it: a value of several members has no name (3.11 says ``"R|B"``)."""

    R = 1
    G = 2
    B = 4

    @property
    def name(self):  # type: ignore[override]
        return self._name_ if self._value_ in (1, 2, 4) else None


def test_flag_settings_of_several_members_are_recorded_apart_on_python_3_10() -> None:
    # recorded_setting wrote every unnamed Flag value (each of several members, on Python 3.10) as
    # "Class.None": R|B and G|B recorded alike, so a checkpoint's settings check (and a first-use verdict's
    # key) took one for the other
    from innerloop.registry.settings import recorded_setting

    flag = _Python310Flag
    recorded = [recorded_setting(value) for value in (flag.R | flag.B, flag.G | flag.B, flag.R, flag(0))]
    assert recorded == ["_Python310Flag.R|B", "_Python310Flag.G|B", "_Python310Flag.R", "_Python310Flag.None"]

    class Plain(enum.Flag):  # this Python's own names, which the 3.10 reading matches
        R = 1
        G = 2
        B = 4

    assert recorded_setting(Plain.R | Plain.B).endswith(".<locals>.Plain.R|B")


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_global_registry")
def test_a_plugin_setting_that_changes_at_every_call_is_warned_of_once(monkeypatch) -> None:
    # s54q: a plugin that declares no settings and bumps a public counter as it runs has other settings at
    # every call, so a kernel's first-use check ran again on every block (a probe of the kernel and the
    # torch path each time), silently; documented only in a private docstring. Now, after
    # SETTINGS_CHANGES_BEFORE_WARNING such re-checks of a kernel, a KernelCheckWarning says so once,
    # naming the plugin and the remedy (declare its settings)
    import warnings

    from innerloop.kernels import first_use

    layer = TTTLayer(16, 2, inner_model="linear", mini_batch_size=4, kernel="fused_torch_linear")
    loss = layer.inner_loss
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call in range(first_use.SETTINGS_CHANGES_BEFORE_WARNING + 3):
            monkeypatch.setattr(loss, "calls", call, raising=False)  # what a counter bumped as it runs does
            layer(x)
    said = [str(w.message) for w in caught if issubclass(w.category, first_use.KernelCheckWarning)]
    assert len(said) == 1 and "Reconstruction" in said[0] and "settings()" in said[0], said


def _stack_arguments(**changed) -> dict:
    B, H, T, f = 1, 2, 8, 4
    x = torch.randn(B, H, T, f, generator=torch.Generator().manual_seed(0))
    arguments = dict(
        xq=x, xk=x.clone(), xv=x.clone(), lr=torch.full((B, H, T), 0.1), tau=1 / torch.arange(1.0, 5.0),
        params={"W1": torch.zeros(B, H, f, f), "b1": torch.zeros(B, H, 1, f)}, ln_weight=torch.ones(H, f),
        ln_bias=torch.zeros(H, f), eps=1e-6,
    )  # fmt: skip
    return {**arguments, **changed}


@pytest.mark.parametrize(
    "changed, named",
    [
        ({"xk": torch.zeros(1, 2, 8, 5)}, "xk"),
        ({"xv": torch.zeros(1, 2, 8, 5)}, "xv"),
        ({"lr": torch.zeros(1, 2, 9)}, "lr"),
        ({"params": {"W1": torch.zeros(1, 2, 5, 4), "b1": torch.zeros(1, 2, 1, 4)}}, "W1"),
        ({"params": {"W1": torch.zeros(1, 2, 4, 4), "b1": torch.zeros(1, 2, 1, 5)}}, "b1"),
        ({"tau": torch.ones(3)}, "tau"),
        ({"ln_weight": torch.ones(2, 5)}, "ln_weight"),
        ({"ln_bias": torch.ones(3, 4)}, "ln_bias"),
    ],
    ids=["xk", "xv", "lr", "W1", "b1", "tau", "ln_weight", "ln_bias"],
)
def test_the_fused_torch_forward_names_a_bad_argument(changed, named) -> None:
    # sibling of delta_rule_kernel_forward's: fused_torch_linear's forward, called directly, raised raw torch
    # errors ("shape '[2, 2, 4]' is invalid for input of size 18") naming nothing; cpu_ttt_linear names
    # each argument. Now a ValueError names the kernel, the argument, what it got and what is valid
    from innerloop.registry import get_registry

    spec = next(spec for spec in get_registry().kernels() if spec.name == "fused_torch_linear")
    with pytest.raises(ValueError, match=rf"fused_torch_linear.*\b{named}\b"):
        spec.forward(**_stack_arguments(**changed))
