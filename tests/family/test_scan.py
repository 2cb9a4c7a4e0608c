"""``innerloop.ops.scan``: the layer's path as an op. Errors name the argument; the layer is built on it
(same numbers, same dispatch); its ``initial`` and result round-trip with ``TTTState``; gradients
flow to every tensor argument (float64 gradcheck)."""

from __future__ import annotations

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.functional import relative_error
from innerloop.ops import scan

B, H, T, F = 2, 2, 7, 4


def tensors(
    seed: int = 0, tokens: int = T, batch: int = B, heads: int = H, dim: int = F
) -> dict[str, torch.Tensor]:
    B, H, F = batch, heads, dim  # noqa: N806 (the shapes' usual names)
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    def uniform(*shape: int, high: float = 1.0) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, dtype=torch.float64) * high

    return {
        "q": randn(B, H, tokens, F),
        "k": randn(B, H, tokens, F),
        "v": randn(B, H, tokens, F),
        "lr": uniform(B, H, tokens, high=0.5),
        "decay": uniform(B, H, tokens, high=0.4),
        "momentum": uniform(B, H, tokens),
        "token_scale": 1.0 + 0.1 * randn(3),
        "norm_weight": 1.0 + 0.1 * randn(H, F),
        "norm_bias": 0.1 * randn(H, F),
    }


BAD_ARGUMENTS = [
    ({"q": torch.zeros(B, H, T)}, ValueError, r"q must have shape \[B, H, T, f\]"),
    ({"q": torch.zeros(B, H, T, F, dtype=torch.int64)}, TypeError, "q must be a floating-point tensor"),
    ({"k": torch.zeros(B, H, T, F + 2, dtype=torch.float64)}, ValueError, r"k must have shape"),
    ({"v": torch.zeros(B, H, T, F)}, TypeError, "v is torch.float32 but q is torch.float64"),
    ({"lr": torch.zeros(B, H, T + 1, dtype=torch.float64)}, ValueError, r"lr must have shape \[B, H, T\]"),
    ({"lr": 0.1}, TypeError, "lr must be a torch.Tensor"),
    ({"decay": torch.zeros(B, T, dtype=torch.float64)}, ValueError, "decay must have shape"),
    ({"momentum": torch.zeros(B, H, T)}, TypeError, "momentum is torch.float32"),
    ({"mini_batch_size": 0}, ValueError, "mini_batch_size must be a positive integer"),
    ({"mini_batch_size": True}, ValueError, "mini_batch_size must be a positive integer"),
    ({"token_scale": torch.ones(4, dtype=torch.float64)}, ValueError, r"token_scale must have shape"),
    ({"inner_norm": 1}, TypeError, "inner_norm must be True or False"),
    (
        {"inner_norm": False, "norm_weight": torch.ones(H, F, dtype=torch.float64)},
        ValueError,
        "norm_weight is given",
    ),
    (
        {"norm_bias": torch.ones(H + 1, F, dtype=torch.float64)},
        ValueError,
        r"norm_bias must have shape \[H, f\]",
    ),
    ({"inner_model": "nope"}, ValueError, "unknown inner model 'nope'"),
    ({"update_rule": "minibatch_gd", "momentum": "@momentum"}, ValueError, "momentum: momentum is given"),
    ({"update_rule": "momentum", "token_scale": "@token_scale"}, ValueError, "token_scale must be None"),
    ({"initial": {"W1": torch.zeros(H, F, F, dtype=torch.float64)}}, ValueError, r"initial lacks \['b1'\]"),
    (
        {"initial": {"W": torch.zeros(H, F, F, dtype=torch.float64)}},
        ValueError,
        r"initial\['W'\] is not a weight",
    ),
    (
        {"initial": {"W1": torch.zeros(H, F, F + 1, dtype=torch.float64)}},
        ValueError,
        r"initial\['W1'\] must have",
    ),
    ({"initial": [1]}, TypeError, "initial must be a dict"),
    ({"kernel": "nope"}, ValueError, "kernel='nope' is not a kernel"),
]


@pytest.mark.parametrize(("change", "error", "match"), BAD_ARGUMENTS)
def test_bad_arguments_are_named(change, error, match):
    given = tensors()
    arguments = {"q": given["q"], "k": given["k"], "v": given["v"], "lr": given["lr"], "mini_batch_size": 3}
    for key, value in change.items():  # "@name" stands for the valid tensor of that name
        arguments[key] = given[value[1:]] if isinstance(value, str) and value.startswith("@") else value
    with pytest.raises(error, match=match):
        scan(**arguments)


@pytest.mark.parametrize(
    ("rule", "match"),
    [
        ("dual_form", r"initial\['momentum.W'\] is a momentum"),  # the default rule takes no momentum
        # a state from a momentum call continued without the gate would drop the carried S silently
        # (and no longer equal the whole sequence): refused, naming the entries and what to pass
        ("momentum", r"initial carries \['momentum.W'\] but momentum=None"),
    ],
)
def test_a_carried_momentum_needs_the_momentum_rule_and_this_calls_momentum(rule, match):
    given = tensors()
    zeros = torch.zeros(H, F, F, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        scan(
            given["q"],
            given["k"],
            given["v"],
            given["lr"],
            inner_model="matrix",
            update_rule=rule,
            initial={"W": zeros, "momentum.W": zeros},
        )


def layer_and_input(update_rule: str, seed: int = 0) -> tuple[TTTLayer, torch.Tensor]:
    torch.manual_seed(seed)
    layer = TTTLayer(H * F, H, update_rule=update_rule, mini_batch_size=3, kernel="auto").double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer, torch.randn(B, T, H * F, dtype=torch.float64)


@pytest.mark.parametrize("update_rule", ["dual_form", "minibatch_gd", "momentum"])
def test_the_layer_is_scan_with_its_projections(update_rule):
    """TTTLayer's output is o_proj(post_norm(scan(its views)))), with the same fast-path decisions."""
    layer, x = layer_and_input(update_rule)
    with torch.no_grad():
        y, _ = layer(x)
        state = layer.init_state(B)
        views, lr, tau, _ = layer._read(x, state)
        dispatches: list[tuple[str, str]] = []
        out, _ = scan(
            views.query,
            views.key,
            views.value,
            lr,
            update_rule=update_rule,
            mini_batch_size=3,
            token_scale=tau if update_rule != "momentum" else None,
            norm_weight=layer.ttt_norm_weight,
            norm_bias=layer.ttt_norm_bias,
            initial={k: v for k, v in layer.initial_params.items()},
            dispatches=dispatches,
        )
    expected = layer.o_proj(layer.post_norm(out.transpose(1, 2).reshape(B, T, H * F)))
    assert relative_error(y, expected) <= 1e-12
    assert dispatches == layer.dispatches


def test_scan_state_round_trips_with_the_layer_state():
    """A layer's state at a boundary -> scan's initial -> scan's result -> the layer's state: the layer
    continues from the weights scan returns exactly as from its own state."""
    layer, x = layer_and_input("dual_form")
    with torch.no_grad():
        _, state = layer(x[:, :6])  # two whole mini-batches
        weights = state.scan_weights()
        assert state.with_weights(weights).tensors().keys() == state.tensors().keys()
        views, lr, tau, _ = layer._read(x[:, 6:], state)
        _, after = scan(
            views.query, views.key, views.value, lr, mini_batch_size=3, token_scale=tau,
            norm_weight=layer.ttt_norm_weight, norm_bias=layer.ttt_norm_bias, initial=weights,
        )  # fmt: skip
        _, layer_after = layer(x[:, 6:], state)
        for name, value in layer_after.scan_weights(tau).items():
            assert relative_error(after[name], value) <= 1e-12
        continued, _ = layer(x[:, 6:], state.with_weights(weights))
        expected, _ = layer(x[:, 6:], state)
        assert torch.equal(continued, expected)


def test_with_weights_refuses_a_state_inside_a_mini_batch():
    layer, x = layer_and_input("dual_form")
    with torch.no_grad():
        _, state = layer(x[:, :4])
    with pytest.raises(ValueError, match="inside a mini-batch"):
        state.with_weights(state.scan_weights())


@pytest.mark.parametrize(
    ("inner_model", "update_rule", "options"),
    [
        ("linear", "dual_form", ("decay", "token_scale", "norm_weight", "norm_bias")),
        ("mlp", "dual_form", ("decay", "token_scale")),
        ("linear", "minibatch_gd", ("decay",)),
        ("matrix", "momentum", ("decay", "momentum", "norm_weight", "norm_bias")),
    ],
)
def test_gradcheck_in_every_tensor_argument(inner_model, update_rule, options):
    heads, dim = 1, 2  # tiny: gradcheck perturbs every element
    given = tensors(seed=1, tokens=5, batch=1, heads=heads, dim=dim)
    names = ["q", "k", "v", "lr", *options]
    shapes = {"linear": {"W1": (heads, dim, dim), "b1": (heads, 1, dim)}, "matrix": {"W": (heads, dim, dim)}}
    shapes["mlp"] = {"W1": (heads, dim, 4 * dim), "b1": (heads, 1, 4 * dim), "W2": (heads, 4 * dim, dim)}
    shapes["mlp"]["b2"] = (heads, 1, dim)
    generator = torch.Generator().manual_seed(2)
    initial = {
        k: 0.3 * torch.randn(s, generator=generator, dtype=torch.float64)
        for k, s in shapes[inner_model].items()
    }
    if update_rule == "momentum":
        initial.update({f"momentum.{k}": 0.1 * torch.randn_like(v) for k, v in list(initial.items())})
    leaves = [given[n].clone().requires_grad_(True) for n in names]
    initial_leaves = [v.clone().requires_grad_(True) for v in initial.values()]

    def run(*args):
        arguments = dict(zip(names, args[: len(names)], strict=True))
        start = dict(zip(initial, args[len(names) :], strict=True))
        out, weights = scan(
            **arguments, inner_model=inner_model, update_rule=update_rule, mini_batch_size=3, initial=start
        )
        return (out, *weights.values())

    assert torch.autograd.gradcheck(
        run, [*leaves, *initial_leaves], eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True
    )


def test_kernels_refuse_decay_and_momentum_with_the_reason():
    """The built-in fast paths do not forget: a decaying block runs on torch, each refusal recorded;
    forcing one is an error naming decay; no kernel takes the momentum rule's state."""
    from innerloop.core.protocol import InnerTask
    from innerloop.core.scan import ChunkInputs
    from innerloop.kernels.dispatch import KernelUnavailableError, kernel_inputs, select_kernel
    from innerloop.registry import get_registry

    given = tensors()
    plain = {"q": given["q"], "k": given["k"], "v": given["v"], "lr": given["lr"], "mini_batch_size": 3}
    dispatches: list[tuple[str, str]] = []
    with torch.no_grad():
        scan(**plain, decay=given["decay"], dispatches=dispatches)
    assert dispatches and all(path == "torch" for path, _ in dispatches)
    assert "fused_torch_linear: does not support decay (forgetting)" in dispatches[0][1]
    with pytest.raises(KernelUnavailableError, match="does not support decay"), torch.no_grad():
        scan(**plain, decay=given["decay"], kernel="fused_torch_linear")

    registry = get_registry()
    model, loss = registry.inner_model("linear"), registry.inner_loss("reconstruction")
    task = InnerTask(model, loss, 3, given["norm_weight"], given["norm_bias"])
    chunk = ChunkInputs(
        given["q"][:, :, :6], given["k"][:, :, :6], given["v"][:, :, :6], given["lr"][:, :, :6]
    )
    params = {
        "W1": torch.zeros(B, H, F, F, dtype=torch.float64),
        "b1": torch.zeros(B, H, 1, F, dtype=torch.float64),
    }
    kernel, reason = select_kernel(
        registry.update_rule("dual_form"), task, kernel_inputs(task, chunk, params, momentum=True)
    )
    assert kernel is None and "no kernel contract carries the momentum rule's state" in reason


def test_the_momentum_of_some_weights_only_is_named():
    # it failed deep in the dual segment with a bare KeyError for the weight without a momentum
    given = tensors()
    zeros, ones = torch.zeros(H, F, F, dtype=torch.float64), torch.ones(H, F, F, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"initial has the momentum of \['W1'\] but lacks \['momentum.b1'\]"):
        scan(
            given["q"],
            given["k"],
            given["v"],
            given["lr"],
            update_rule="momentum",
            momentum=torch.full_like(given["lr"], 0.5),
            initial={"W1": zeros, "b1": torch.zeros(H, 1, F, dtype=torch.float64), "momentum.W1": ones},
        )


def test_a_first_use_inside_torch_compile_builds_the_registry_and_runs_the_scan_eagerly() -> None:
    """The registry's first build (its conformance checks differentiate twice) and the kernels' first-use
    probes ran under dynamo when ``innerloop.ops.scan`` was first called inside a compiled function:
    dynamo cannot trace a double backward, so the built-in ``linear`` model was refused by name. Both now
    run eagerly, as TTTLayer's scan does, and the compiled call equals the eager one."""
    import torch._dynamo

    from innerloop.registry import isolated_registry

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    lr = torch.full((1, 2, 16), 0.1)

    def read(q, k, v, lr):
        return scan(q, k, v, lr, inner_model="mlp")[0] * 2

    torch._dynamo.reset()
    with isolated_registry():  # nothing built yet, no kernel verdicts: the first use is the compiled one
        compiled = torch.compile(read, backend="eager")(q, k, v, lr)
    assert torch.equal(compiled, read(q, k, v, lr))


@pytest.mark.slow  # builds a registry inside torch.compile: ~0.5 s
def test_the_registry_built_first_inside_torch_compile_keeps_its_built_ins() -> None:
    """Any first use of the registry inside a compiled function (a layer built there, a plugin looked up)
    builds it eagerly: traced, the registrar's checks refused the built-in inner models."""
    import torch._dynamo

    from innerloop.registry import get_registry, isolated_registry

    def look_up(x):
        get_registry()
        return x + 1

    torch._dynamo.reset()
    with isolated_registry():
        torch.compile(look_up, backend="eager")(torch.zeros(2))
        assert get_registry().inner_model("mlp").name == "mlp"
