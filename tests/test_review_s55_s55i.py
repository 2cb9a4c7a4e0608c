"""Review s55i: the kernel refusal for rules that never reach a kernel (s55c) against checkpoints saved
before it, the hot-path cost of the kernels' input checks, the CPU TTT-MLP scan's shared tanh (f87c642)
at pre-activations past the derivative's clamp, and trainer.max_time's leading-0 days (s55e)."""

from __future__ import annotations

import pytest

import innerloop
from innerloop import TTTLayer
from innerloop.kernels.reference import reference_kernel
from innerloop.kernels.spec import KernelSpec
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel


def _register_gd_kernel() -> str:
    """A kernel registered for (linear, reconstruction, minibatch_gd): before s55c a layer naming it was
    built (and ran on torch), so checkpoints naming it exist."""
    forward, _ = reference_kernel(LinearModel(), Reconstruction())
    name = "s55i_user_minibatch_gd"
    innerloop.register_kernel(
        KernelSpec(
            name=name,
            inner_model="linear",
            inner_loss="reconstruction",
            update_rule="minibatch_gd",
            forward=forward,
            verify=lambda inputs: None,
        )
    )
    return name


@pytest.mark.slow  # a tiny model built twice and loaded (~1.9 s on the 2-core AMD EPYC)
@pytest.mark.usefixtures("fresh_global_registry")
def test_a_checkpoint_naming_a_kernel_for_a_rule_that_runs_no_kernel_loads_on_auto_saying_so(
    tmp_path,
) -> None:
    # s55c refuses kernel=<name> at construction for minibatch_gd / momentum. A checkpoint saved before it
    # with model.ttt.kernel naming a kernel registered for minibatch_gd loaded and ran (on torch: the
    # kernel was never asked); it stopped loading ("holds a model this innerloop cannot rebuild"). A
    # kernel changes speed, not the model: it loads on kernel='auto', saying why (as a kernel that
    # cannot run here or that no plugin registers does).
    from innerloop.checkpoints import MODEL_PREFIX, load_model, save_checkpoint
    from innerloop.models import CausalLM, ModelConfig

    name = _register_gd_kernel()
    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2)
    config.ttt.inner_model, config.ttt.update_rule, config.ttt.mini_batch_size = "linear", "minibatch_gd", 4
    weights = {MODEL_PREFIX + key: value for key, value in CausalLM(config).state_dict().items()}
    saved = config.to_dict()
    saved["ttt"]["kernel"] = name  # as saved before s55c
    path = save_checkpoint(
        {"hyper_parameters": {"model": saved}, "state_dict": weights}, tmp_path / "last.safetensors"
    )
    with pytest.warns(UserWarning, match=rf"model.ttt.kernel={name!r}.*minibatch_gd is the primal form"):
        model = load_model(path)
    layers = [m for m in model.modules() if isinstance(m, TTTLayer)]
    assert layers and all(layer.kernel == "auto" for layer in layers)


@pytest.mark.slow  # 4 calls of a small layer, each first-use check run again (~0.5 s unloaded)
@pytest.mark.usefixtures("fresh_global_registry")
def test_a_declared_setting_changed_on_purpose_is_not_told_to_declare_its_settings(monkeypatch) -> None:
    # s55c's warning after SETTINGS_CHANGES_BEFORE_WARNING first-use re-checks says to declare the
    # plugin's settings (settings() or dataclass fields), the remedy for an undeclared public counter. It
    # counted every settings change, so a plugin that declares its settings and has one changed on purpose
    # (a sweep, an annealed weight: each change rightly probed again) was told to do what it does.
    import warnings

    import torch

    from innerloop.kernels import first_use

    monkeypatch.setattr(first_use, "SETTINGS_CHANGES_BEFORE_WARNING", 2)  # fewer calls, the same count
    layer = TTTLayer(16, 2, inner_model="linear", mini_batch_size=4, kernel="fused_torch_linear")
    loss = layer.inner_loss
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call in range(4):
            monkeypatch.setattr(loss, "settings", lambda value=call: {"weight": value}, raising=False)
            layer(x)
    said = [str(w.message) for w in caught if issubclass(w.category, first_use.KernelCheckWarning)]
    assert not said, said
    with warnings.catch_warnings(record=True) as caught:  # an undeclared public counter is still warned of
        warnings.simplefilter("always")
        monkeypatch.delattr(loss, "settings")
        for call in range(4):
            monkeypatch.setattr(loss, "calls", call, raising=False)
            layer(x)
    said = [str(w.message) for w in caught if issubclass(w.category, first_use.KernelCheckWarning)]
    assert len(said) == 1 and "Reconstruction" in said[0], said


def _deep_gelu_inputs(dtype, weight_scale: float, extremes: tuple[float, ...]) -> list:
    """A 3-layer tanh-GELU stack (f 16 -> 31 -> 17 -> 16: widths off the 16-wide register blocks) at
    K = 16, its first weight scaled so pre-activations pass the derivative's clamp (|z| > 100), some
    entries set to ``extremes`` (|z| ~ 1e13: z^3 overflows float32; a subnormal)."""
    import torch

    generator = torch.Generator().manual_seed(5)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    B, H, T, f, widths = 1, 2, 32, 16, [16, 31, 17, 16]
    params = {}
    for i in range(3):
        scale = (weight_scale if i == 0 else 1.0) * widths[i] ** -0.5
        params[f"W{i}"] = draw(B, H, widths[i], widths[i + 1], scale=scale)
        params[f"b{i}"] = draw(B, H, 1, widths[i + 1], scale=0.1)
    for value, where in zip(extremes, [(0, 0, 0, 0), (0, 0, 1, 1), (0, 1, 2, 0)], strict=False):
        params["W0"][where] = value
    lr = (torch.rand(B, H, T, generator=generator, dtype=torch.float64) / f).to(dtype)
    tau = (1.0 / torch.arange(1, 17, dtype=torch.float64)).to(dtype)
    x = [draw(B, H, T, f) for _ in range(3)]
    return [*x, lr, tau, params, 1 + 0.1 * draw(H, f), 0.1 * draw(H, f)]


def _outputs_and_gradients(forward, inputs: list) -> list:
    import torch

    leaves = [
        {k: v.clone().requires_grad_(True) for k, v in t.items()}
        if isinstance(t, dict)
        else t.clone().requires_grad_(True)
        for t in inputs
    ]
    out, new_params = forward(*leaves, 1e-6)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ((out * weights.to(out.dtype)).sum() + sum(v.sum() for v in new_params.values())).backward()
    grads = [g for t in leaves for g in ([v.grad for v in t.values()] if isinstance(t, dict) else [t.grad])]
    return [out.detach(), *(v.detach() for v in new_params.values()), *grads]


@pytest.mark.slow  # a 3-layer stack, forward and backward, on the CPU kernel and fused torch, 4 times (~1 s)
@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize(("weight_scale", "extremes"), [(1e4, ()), (1.0, (1e13, -1e13, 1e-40))])
def test_the_cpu_mlp_scans_shared_tanh_past_the_clamp_equals_fused_torch(dtype_name, weight_scale, extremes):
    # Holds (s55i, f87c642): one float32 tanh serves act, act' and act'' (act'' zero past |z| = 100, as
    # autograd through the reference's clamped derivative); pre-activations past the clamp, x^3 past
    # float32's range and a subnormal, with widths 31 and 17 (the 16 x 16 transposes' vector blocks and
    # scalar remainder) and K = 16: outputs, new weights and every gradient as fused torch's
    import torch

    from innerloop.core.functional import relative_error
    from innerloop.core.protocol import GELU_TANH, AffineLayer
    from innerloop.kernels.cpu.stack import make_forward
    from innerloop.kernels.fused_torch import make_fused_forward
    from innerloop.testing import FLOAT64_TOLERANCE, KERNEL_CHECK_TOLERANCES

    dtype = getattr(torch, dtype_name)
    stack = tuple(AffineLayer(f"W{i}", f"b{i}", GELU_TANH if i < 2 else None) for i in range(3))
    inputs = _deep_gelu_inputs(dtype, weight_scale, extremes)
    ours = _outputs_and_gradients(make_forward(stack), inputs)
    theirs = _outputs_and_gradients(make_fused_forward(stack), inputs)
    tolerance = FLOAT64_TOLERANCE if dtype == torch.float64 else KERNEL_CHECK_TOLERANCES[torch.float32]
    for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(a.isfinite(), b.isfinite()), index
        assert relative_error(a[a.isfinite()], b[b.isfinite()]) < tolerance, index
