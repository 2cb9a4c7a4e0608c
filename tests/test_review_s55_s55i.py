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
