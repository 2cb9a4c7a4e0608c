"""Review s29d: a third-party plugin author's journey (a loss, a model, an update rule and kernels of
their own, registered, checked with innerloop.testing, trained, saved, exported, compiled), and the
mistakes such an author makes. Each test is one finding (the commit that fixes it names it)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import innerloop
from innerloop.core.protocol import UpdateRule
from innerloop.registry import PluginError, get_registry, isolated_registry
from innerloop.testing import check_update_rule


class WritesStateWithoutGrad(UpdateRule):
    """Right values, but without autograd (evaluation, generation) it writes its new weights into the
    state it was given, to save an allocation: a TTTState is immutable."""

    name = "s29d_writes_state_without_grad"

    def forward(self, state, task, views, lr, tau):
        out, new = get_registry().update_rule("minibatch_gd").forward(state, task, views, lr, tau)
        if not torch.is_grad_enabled():
            for group in ("params", "pending"):
                for key, value in getattr(state, group).items():
                    value.copy_(getattr(new, group)[key])
            new = dataclasses.replace(new, params=state.params, pending=state.pending)
        return out, new


WRITES_INTO_STATE = (
    r"s29d_writes_state_without_grad .*under torch.no_grad\(\).*wrote into the state it was given"
)


@pytest.mark.slow  # check_update_rule over every problem: ~0.4 s
def test_check_update_rule_names_a_write_into_the_state_without_grad() -> None:
    """The write was caught only as 'relative error 4.4e-01 > 1e-10' (the next run started from the
    overwritten state), where the same write with autograd on is named as what it is."""
    with pytest.raises(AssertionError, match=WRITES_INTO_STATE):
        check_update_rule(WritesStateWithoutGrad(), "linear", "reconstruction", gradients=False)


def test_registration_names_a_write_into_the_state_without_grad() -> None:
    with isolated_registry(), pytest.raises(PluginError, match=WRITES_INTO_STATE):
        innerloop.register_update_rule(WritesStateWithoutGrad())


def _stack_model(activation):  # two affine layers with ``activation`` between them
    from innerloop.core.protocol import AffineLayer, StackModel

    class TwoLayers(StackModel):
        name = "s29d_two_layers"
        stack = (AffineLayer("W1", "b1", activation), AffineLayer("W2", "b2", None))

        def param_shapes(self, f):
            return {"W1": (f, 3), "b1": (1, 3), "W2": (3, f), "b2": (1, f)}

        def init_params(self, heads, f, generator=None):
            shapes = self.param_shapes(f).items()
            return {k: 0.3 * torch.randn(heads, *s, generator=generator) for k, s in shapes}

    return TwoLayers()


def test_cpu_kernel_says_which_activations_it_computes() -> None:
    """A plugin's own tanh-GELU, named 'gelu_tanh', was refused with "activations ['gelu_tanh'] are not
    among those the kernel computes ('identity', 'gelu_tanh')": it contradicts itself and leaves the
    author nothing to fix (the kernel computes innerloop's own functions only, matched by identity)."""
    from innerloop.core.protocol import Activation
    from innerloop.kernels import cpu
    from innerloop.kernels.dispatch import KernelUnavailableError

    def own_gelu(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(z, approximate="tanh")

    def own_derivative(z: torch.Tensor) -> torch.Tensor:  # a right closed form, not innerloop's function
        inner = 0.7978845608028654 * (z + 0.044715 * z**3)
        tanh = torch.tanh(inner)
        return 0.5 * (1 + tanh) + 0.5 * z * (1 - tanh**2) * 0.7978845608028654 * (1 + 3 * 0.044715 * z**2)

    own = Activation("gelu_tanh", own_gelu, own_derivative)
    model = _stack_model(own)
    with isolated_registry():
        innerloop.register_inner_model(model)
        innerloop.register_kernel(cpu.kernel_spec(model.name, model.stack))
        layer = innerloop.TTTLayer(
            8, 2, inner_model=model.name, mini_batch_size=2, kernel=f"cpu_ttt_{model.name}"
        )
        with torch.no_grad(), pytest.raises(KernelUnavailableError) as raised:
            layer(torch.randn(1, 4, 8))
    message = str(raised.value)
    assert "matched by its functions, not its name" in message, message
    assert "innerloop.GELU_TANH" in message, message


class _OneSquareWeight:
    """Parameters of the inner models below: one ``W [f, f]``."""

    def param_shapes(self, f):
        return {"W": (f, f)}

    def init_params(self, heads, f, generator=None):
        return {"W": 0.3 * torch.randn(heads, f, f, generator=generator)}


class MixesTokens(_OneSquareWeight):
    """g(x)_t = sum_{s <= t} x_s W: each output reads the earlier tokens of the call (a cumsum over N)."""

    name = "s29d_mixes_tokens"

    def forward(self, params, x):
        return (x @ params["W"]).cumsum(dim=-2)


def _mixes_tokens():
    from innerloop.core.protocol import InnerModel

    return type("MixesTokens", (MixesTokens, InnerModel), {})()


def test_registration_refuses_an_inner_model_that_mixes_tokens() -> None:
    """Accepted: the update rules call a non-stack model one token at a time, so a layer ran it as a
    per-token function, while InnerTask.predict on a chunk (the inner-loss diagnostics a training run
    logs) ran it on every token of the chunk at once and logged other numbers."""
    with isolated_registry(), pytest.raises(PluginError, match=r"s29d_mixes_tokens.*other tokens"):
        innerloop.register_inner_model(_mixes_tokens())


def test_check_inner_model_refuses_an_inner_model_that_mixes_tokens() -> None:
    from innerloop.testing import check_inner_model

    with pytest.raises(AssertionError, match=r"s29d_mixes_tokens.*other tokens"):
        check_inner_model(_mixes_tokens(), batch=2, heads=2, head_dim=4, tokens=6, mini_batch_size=2)


def _tiny_compiled_hugging_face_model() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """A tiny TTT model as Hugging Face's class, its compiled twin (eager backend), and token ids."""
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    torch.manual_seed(0)
    config = InnerloopConfig(
        model={"hidden_size": 32, "num_heads": 2, "num_layers": 1, "intermediate_size": 48}
    )
    model = InnerloopForCausalLM(config).eval()
    return model, torch.compile(model, backend="eager"), torch.randint(0, 256, (2, 8))


@pytest.mark.slow  # 1.7 s: a torch.compile of a whole model
def test_a_compiled_hugging_face_model_breaks_its_graph_only_where_innerloop_means_to() -> None:
    """The Hugging Face model's token id check read the ids' range with int(tensor) outside
    run_eagerly: compiling an exported model printed Dynamo's "Graph break from `Tensor.item()`" warning
    and broke the graph there, where the language model's own check runs eagerly by design."""
    from torch._dynamo.utils import counters

    model, compiled, ids = _tiny_compiled_hugging_face_model()
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        logits = compiled(ids).logits
        torch.testing.assert_close(logits, model(ids).logits)
        with pytest.raises(ValueError, match="token id 256"):
            compiled(torch.tensor([[1, 256]]))
    breaks = list(counters["graph_break"])
    assert breaks and all("innerloop: " in reason for reason in breaks), breaks


@pytest.mark.slow  # reason: dynamo traces a tiny Hugging Face model (~1-2 s)
def test_a_compiled_hugging_face_model_reads_a_mask_eagerly() -> None:
    """Likewise the attention mask's values (right padding, scored without a cache)."""
    from torch._dynamo.utils import counters

    model, compiled, ids = _tiny_compiled_hugging_face_model()
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        got = compiled(ids, attention_mask=mask, labels=ids, use_cache=False)
        want = model(ids, attention_mask=mask, labels=ids, use_cache=False)
    torch.testing.assert_close(got.loss, want.loss)
    breaks = list(counters["graph_break"])
    assert breaks and all("innerloop: " in reason for reason in breaks), breaks


class RightAtFourFeaturesOnly(_OneSquareWeight):
    """A forward that keeps the first 4 features (a head dim hard-coded): right at the registrar's head
    dim of 4, of another shape at any other."""

    name = "s29d_four_features"

    def forward(self, params, x):
        return (x @ params["W"])[..., :4]


def test_a_layer_names_an_inner_model_of_the_wrong_shape_at_its_head_dim() -> None:
    """It registered (the registrar runs head dim 4) and a layer of head dim 8 failed on its first call
    with torch's "The size of tensor a (8) must match the size of tensor b (4)", naming nothing."""
    from innerloop.core.protocol import InnerModel

    model = type("RightAtFour", (RightAtFourFeaturesOnly, InnerModel), {})()
    with isolated_registry():
        innerloop.register_inner_model(model)
        with pytest.raises(ValueError, match=r"s29d_four_features.*head_dim 8.*\[1, 2, 8\].*\[1, 2, 4\]"):
            innerloop.TTTLayer(16, 2, inner_model=model.name, update_rule="minibatch_gd")


def test_a_kernel_for_a_name_no_plugin_provides_is_warned_of() -> None:
    """A plugin's kernel registered for a misspelt inner model would never be chosen, without a word
    (the s29d review's leftover): the registry's build warns of it, naming the kernel, its plugin, the
    unknown name and the registered ones; a kernel for a registered model is not warned of."""
    import types
    import warnings

    import innerloop
    from innerloop.kernels import fused_torch
    from innerloop.plugins.models.mlp import MLPModel
    from innerloop.registry.manager import PluginLoadWarning, build_registry, warn_of_kernels_that_cannot_run

    stack = MLPModel().stack
    plugin = types.ModuleType("s29d_kernels")

    @innerloop.hookimpl
    def register_kernels(register):
        register(fused_torch.kernel_spec("s29d_mpl", stack))  # a typo of a model's name

    plugin.register_kernels = register_kernels
    registry = build_registry(include_external=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_of_kernels_that_cannot_run(registry)
    assert not caught, [str(w.message) for w in caught]  # the built-ins' kernels all can run
    with pytest.warns(PluginLoadWarning, match="provides yet, so it can never run"):  # in-process: at once
        registry.add_plugin(plugin, origin="s29d_kernels")
    with pytest.warns(PluginLoadWarning) as caught:
        warn_of_kernels_that_cannot_run(registry)
    (message,) = [str(w.message) for w in caught]
    assert "kernel 'fused_torch_s29d_mpl' (s29d_kernels) is registered for inner_model='s29d_mpl'" in message
    assert "can never run; registered inner_models: ['linear', 'matrix', 'mlp']" in message
