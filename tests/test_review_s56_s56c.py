"""Review s56c: the update rules and the core public API called directly (outside a layer or
``innerloop.ops.scan``) and subclassed: which rules reach kernels (``no_kernel_reason``), the delta
rule kernel's mini-batch size, and the refusals of bad input to a rule's ``forward``."""

from __future__ import annotations

import pytest
import torch

import innerloop
from innerloop import TTTLayer
from innerloop.core.protocol import no_kernel_reason
from innerloop.kernels.reference import reference_kernel
from innerloop.kernels.spec import KernelSpec
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.plugins.optimizers.minibatch_gd import ON_TORCH_ONLY, MiniBatchGD
from innerloop.plugins.optimizers.momentum import Momentum


class _KernelGD(MiniBatchGD):
    """A user's subclass of minibatch_gd whose forward DOES send its blocks to kernels (the dual form's)."""

    name = "s56c_kernel_gd"
    forward = DualForm.forward
    _segment = DualForm._segment
    check_model = DualForm.check_model


class _QuietGD(MiniBatchGD):
    """A subclass that keeps minibatch_gd's forward (its blocks still never reach a kernel)."""

    name = "s56c_quiet_gd"


class _RestatedGD(MiniBatchGD):
    """A subclass with a forward of its own that still runs on torch only, and says so."""

    name = "s56c_restated_gd"
    no_kernel_reason = "s56c: on torch only"

    def forward(self, *args, **kwargs):  # type: ignore[override]
        return super().forward(*args, **kwargs)


def test_no_kernel_reason_follows_the_forward_that_runs_the_blocks() -> None:
    # no_kernel_reason was a class attribute read as is: a subclass of minibatch_gd (or momentum) whose
    # forward sends its blocks to kernels inherited the refusal, and a layer naming its kernel was refused.
    assert no_kernel_reason(MiniBatchGD()) == ON_TORCH_ONLY
    assert no_kernel_reason(_QuietGD()) == ON_TORCH_ONLY
    assert no_kernel_reason(_KernelGD()) is None
    assert no_kernel_reason(_RestatedGD()) == "s56c: on torch only"
    assert no_kernel_reason(DualForm()) is None
    assert no_kernel_reason(Momentum()) is not None


@pytest.mark.slow  # a layer's first call checks the user kernel against the torch path: 3 s here
@pytest.mark.usefixtures("fresh_global_registry")
def test_a_subclass_that_sends_blocks_to_kernels_may_name_one(monkeypatch) -> None:
    import innerloop.registry.manager as manager

    # the registrar's naive-loop check of an external rule takes 17 s here; this one runs dual_form's own
    # forward (checked by the suite), so the check is left out: what is tested is the kernel's naming
    innerloop.get_registry()
    monkeypatch.setattr(manager, "validate_plugin", lambda kind, obj, external: obj.name)
    innerloop.register_update_rule(_KernelGD())
    forward, _ = reference_kernel(LinearModel(), Reconstruction())
    spec = KernelSpec(
        name="s56c_kernel",
        inner_model="linear",
        inner_loss="reconstruction",
        update_rule=_KernelGD.name,
        forward=forward,
        verify=lambda inputs: None,
    )
    innerloop.register_kernel(spec)
    torch.manual_seed(0)
    layer = TTTLayer(
        8, 2, inner_model="linear", update_rule=_KernelGD.name, mini_batch_size=2, kernel=spec.name
    )
    torch_layer = TTTLayer(8, 2, inner_model="linear", update_rule=_KernelGD.name, mini_batch_size=2)
    torch_layer.load_state_dict(layer.state_dict())
    x = torch.randn(1, 4, 8)
    torch.testing.assert_close(layer(x)[0], torch_layer(x)[0])
    assert layer.last_dispatch[0] == spec.name, layer.dispatches


_DELTA_RULE = {"inner_model": "matrix", "inner_norm": False, "inner_residual": False}
_DELTA_K = r"delta_chunk: the delta rule is the dual form with mini_batch_size=1, got 4"


def test_the_delta_rule_kernel_named_at_another_mini_batch_size_is_refused_at_construction() -> None:
    # delta_chunk runs mini_batch_size=1 only: a layer naming it at K = 4 was built, and failed at its
    # first call (KernelUnavailableError); the information is there at construction (and at kernel=).
    with pytest.raises(ValueError, match=rf"kernel='delta_chunk'.*{_DELTA_K}"):
        TTTLayer(16, 2, mini_batch_size=4, kernel="delta_chunk", **_DELTA_RULE)
    layer = TTTLayer(16, 2, mini_batch_size=4, **_DELTA_RULE)
    with pytest.raises(ValueError, match=_DELTA_K):
        layer.kernel = "delta_chunk"
    x = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match=_DELTA_K):
        innerloop.ops.scan(
            x, x, x, torch.zeros(1, 2, 4), mini_batch_size=4, kernel="delta_chunk", **_DELTA_RULE
        )
    assert TTTLayer(16, 2, mini_batch_size=1, kernel="delta_chunk", **_DELTA_RULE).kernel == "delta_chunk"
