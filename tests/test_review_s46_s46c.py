"""Review s46c: issue 10 ("the house") graded from a third-party plugin author's seat.

Walked as a user who writes plugins outside the repository (a package installed with an entry point
in the ``innerloop`` group, and objects registered at run time): an inner loss (a scaled reconstruction
loss with its closed-form gradient), two inner models (a ``StackModel`` tanh MLP of hidden 2f, whose
fused and CPU kernels the plugin registers as CONTRIBUTING.md says, and a non-stack elementwise model),
and an update rule built on ``innerloop.core.scan``'s helpers. The findings, each a regression test:

- ``check_kernel`` failed innerloop's own fused kernel registered, as CONTRIBUTING.md says, for the
  plugin's tanh MLP: every float64 case passed at 1e-10, and the float32 case (which ``check_kernel``
  runs by default) failed on a gradient at 1.37e-4 against the fixed 1e-4, where the torch path's own
  float32 error against its float64 copy is 1.2e-4 (the problem amplifies rounding ~10x more than the
  built-in TTT-MLP's: 1.1e-5). The float64 cases had been given an allowance for such problems (s45d);
  the float32 case now allows 10x the torch path's own float32 error, and says so
  (``test_check_kernel_s_float32_case_allows_what_the_problem_s_own_rounding_explains``).
- An update rule plugin that returned its new state's weights in another dtype than it was given (a
  ``.bfloat16()`` or ``.double()`` at a call's shape that registration does not try) passed the layer's
  check of what a rule returns (shapes and position only): the layer returned the lossy bfloat16 state
  without a word, and the user's next call with it was refused as "state tensor params.W1 is
  torch.bfloat16 ... pass the state the layer returned", which the user had done. Its pending sums (and
  momentum, decay products) alike, and outputs in another dtype (bfloat16: rounded silently before the
  post-norm). ``check_rule_returns`` now names the rule, the tensor and both dtypes (``test_an_update_rule_returning_another_dtype_is_named``).
- An inner loss plugin whose ``pairs`` returned a carry entry in another dtype than it received
  (``torch.tensor(1.0)``, float32 in a float64 layer) ran, and the next call with the state the layer
  returned was refused as the user's cast; a carry entry that changes shape was named as the loss's
  already. The dtype and device now are too, at the call (``test_an_inner_loss_whose_carry_changes_dtype_is_named``).
- An inner model plugin whose ``forward`` returned float64 for float32 input (a float64 constant) was
  registered, and a float32 layer with it and ``minibatch_gd`` was refused as the built-in rule's fault
  once the rule's returns were checked for dtype (above); one returning float32 for float64 input was
  refused at registration with gradcheck's "Double did not match Float". Registration (float32 and
  float64) and a layer's build check (float32, outside the caller's autocast) now name the model and
  both dtypes (``test_an_inner_model_that_changes_its_input_s_dtype_is_named``).
- Registration checked an inner loss's ``token_loss_grad`` dtype for a float32 prediction only: a loss
  returning its gradient in float32 for a float64 prediction was registered, and a float64 layer with it
  computed at float32's precision without a word (``check_inner_loss`` refuses it). Registration now
  checks float64 too (``test_an_inner_loss_whose_gradient_is_float32_in_a_float64_layer_is_refused``).
- An update rule's ``check_model`` answering a bool (``return model.stack is not None``) was taken as a
  refusal of every model: a rule wrong by half was registered without its conformance check (it accepted
  "no built-in model"), and every layer with it was refused as "cannot run inner_model='linear': True".
  Registration, layers and innerloop.testing now ask ``core.scan.model_refusal``, which names such an
  answer, and a ``check_model`` raising at a layer's build carries the plugin note the scan's errors have
  (``test_check_model_answering_a_bool_is_refused_and_its_error_names_the_rule``).
- A TTT-E2E model update rule's ``step`` returning a new fast weight in bfloat16 at a call's batch or
  model that registration does not try ran on without a word (the next chunks scored with the rounded
  weight); one dropping or reshaping a weight failed with a bare ``KeyError`` or a torch shape error at the
  next chunk. ``E2ELM`` now checks what ``step`` returns, as the layer checks an update rule's returns
  (``test_a_model_update_rule_whose_step_changes_the_fast_weights_is_named``).

Checked and found right (no test here): the plugins load from an entry point (a ``.dist-info`` on
``PYTHONPATH``) and at run time, list in ``innerloop plugins`` with their origins, and train through
``innerloop train --config tiny model.ttt.inner_model=... model.ttt.inner_loss=... model.ttt.update_rule=...``
and through ``LanguageModelModule`` with a Lightning Trainer; ``generate``, ``export`` and ``load_model`` use
them; without the plugin (and with ``INNERLOOP_DISABLE_EXTERNAL_PLUGINS=1``) ``load_model``, ``generate``
and ``AutoModelForCausalLM`` on the export refuse in one line naming the missing plugins and their
distribution; the fused kernel registered for the plugin's tanh MLP runs on a fresh instance, a deepcopy
and a pickled layer (identity, as the built-ins'), and the CPU kernel refuses tanh saying why;
``check_inner_model``, ``check_inner_loss``, ``check_update_rule`` (by instance and by name, a plugin model
given) and the hypothesis strategies (``problems(inner_models=...)``, ``layer_configs`` with plugin names)
pass; a loss or kernel name clashing with a built-in, a kernel named ``torch``/``auto``, a plugin registered
twice, an entry point taking a built-in's name, wrong shapes, NaN gradients, NaN outputs or states at run
time and plugin exceptions are refused or noted naming the plugin; TTT-E2E plugins swap by name.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import innerloop
from innerloop.core.protocol import Activation, AffineLayer
from innerloop.core.scan import RuleOutputError, check_rule_returns, run_scan
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.testing import make_problem

TANH = Activation("tanh", torch.tanh, lambda z: 1 - torch.tanh(z) ** 2)


class _TanhMLP(innerloop.StackModel):
    """A plugin's inner model: ``tanh(x W1 + b1) W2 + b2``, hidden width 2f."""

    name = "s46c_tanh_mlp"

    @property
    def stack(self) -> tuple:
        return (AffineLayer("W1", "b1", TANH), AffineLayer("W2", "b2", None))

    def param_shapes(self, f: int) -> dict:
        return {"W1": (f, 2 * f), "b1": (1, 2 * f), "W2": (2 * f, f), "b2": (1, f)}

    def init_params(self, num_heads: int, f: int, generator=None) -> dict:
        return {
            "W1": torch.randn(num_heads, f, 2 * f, generator=generator) * 0.02,
            "b1": torch.zeros(num_heads, 1, 2 * f),
            "W2": torch.randn(num_heads, 2 * f, f, generator=generator) * 0.02,
            "b2": torch.zeros(num_heads, 1, f),
        }


@pytest.mark.slow  # a registry of its own, then a layer pair over 71 tokens in float32 with gradients: ~1-2 s
def test_check_kernel_s_float32_case_allows_what_the_problem_s_own_rounding_explains() -> None:
    """``check_kernel("fused_torch_s46c_tanh_mlp")``'s float32 case (seed 0, head dim 4: 71 tokens from a
    carried state, in one call, with gradients) failed at 1.37e-4 > 1e-4 on the gradient of
    ``learnable_ttt_lr_weight``, the torch path's own float32 error being 1.2e-4; a kernel 1% off is
    still refused, the allowance named."""
    from innerloop.kernels import fused_torch
    from innerloop.registry import isolated_registry
    from innerloop.testing import kernel_checks

    with isolated_registry():
        model = _TanhMLP()
        innerloop.register_inner_model(model)
        innerloop.register_kernel(fused_torch.kernel_spec(model.name, model.stack))
        spec = kernel_checks._kernel_spec(f"fused_torch_{model.name}")
        config = kernel_checks._layer_config(spec, None, None, None, {})
        report = kernel_checks.KernelCheckReport(spec.name)
        checker = kernel_checks._Checker(spec, config, 4, torch.float32, torch.device("cpu"), 0, 1e-4, report)
        k = checker.mini_batch_size
        case = kernel_checks.KernelCase(4, 17 * k + k // 2 + 1, True, (), "grad", in_float32=True)
        drawn = checker.generator.get_state()
        checker.run(case)
        assert report.ran == [str(case)]
        checker.generator.set_state(drawn)  # the same input again, a reference 1% off
        checker.reference.o_proj.weight.data.mul_(1.01)
        with pytest.raises(
            AssertionError, match=r"\(allowed: 1.0e-04, or 10x the torch path's own float32 error"
        ):
            checker.run(case)


class _CastingRule(innerloop.UpdateRule):
    """``dual_form``'s numbers with the outputs (``what="outputs"``), the new weights (``"weights"``) or
    pending sums (``"pending"``) cast to ``dtype``: a plugin that does so only at some call's shape passes registration."""

    def __init__(self, what: str, dtype: torch.dtype) -> None:
        self.name, self.what, self.dtype = f"s46c_cast_{what}", what, dtype
        self.inner = DualForm()

    def forward(self, state, task, views, lr, tau):
        out, new = self.inner.forward(state, task, views, lr, tau)
        if self.what == "outputs":
            return out.to(self.dtype), new
        group = "params" if self.what == "weights" else self.what
        return out, replace(new, **{group: {k: v.to(self.dtype) for k, v in getattr(new, group).items()}})


@pytest.mark.parametrize(
    ("what", "dtype", "message"),
    [
        (
            "weights",
            torch.bfloat16,
            r"the state's params\['W1'\] in torch.bfloat16 on cpu, expected torch.float32 on cpu",
        ),
        (
            "weights",
            torch.float64,
            r"the state's params\['W1'\] in torch.float64 on cpu, expected torch.float32 on cpu",
        ),
        (
            "pending",
            torch.bfloat16,
            r"the state's pending\['W1'\] in torch.bfloat16 on cpu, expected the weights' torch.float32 on cpu",
        ),
        (
            "outputs",
            torch.bfloat16,
            r"outputs in torch.bfloat16 on cpu, expected the query's torch.float32 on cpu",
        ),
    ],
)
def test_an_update_rule_returning_another_dtype_is_named(what, dtype, message) -> None:
    """Before, ``run_scan`` returned such a rule's results as they came: the bfloat16 state reached the
    user, whose next call was refused as if the user had cast it."""
    # 5 tokens in mini-batches of 4: the state ends inside one, with pending sums
    problem = make_problem(LinearModel(), Reconstruction(), dtype=torch.float32, tokens=5)
    problem = replace(problem, task=replace(problem.task, kernel="torch"))  # no registry: a cheap test
    rule = _CastingRule(what, dtype)
    with pytest.raises(RuleOutputError, match=rf"update rule 's46c_cast_{what}': .*{message}"):
        run_scan(rule, problem.state, problem.task, problem.views, problem.lr, problem.tau)
    arguments = (problem.state, problem.task, problem.views, problem.lr, problem.tau)
    out, _ = check_rule_returns(rule, rule.inner.forward(*arguments), problem.state, problem.views)
    assert out.dtype == torch.float32  # the rule's own dtype passes


class _CountingLoss(innerloop.HalfSquaredError):
    """Reconstruction with a carry of one number, which ``pairs`` returns as ``torch.tensor(1.0)``: float32
    whatever the views' dtype (``init_carry`` makes it in the layer's)."""

    name = "s46c_counting"

    def init_carry(self, batch_size, num_heads, head_dim, like):
        return {"seen": like.new_zeros(())}

    def pairs(self, views, carry):
        return innerloop.LossPairs(views.key, views.value, carry={"seen": torch.tensor(1.0)})


def test_an_inner_loss_whose_carry_changes_dtype_is_named() -> None:
    """Before, a float64 run kept the float32 carry in the state it returned, and the next call with that
    state was refused as "state tensor loss_carry.seen is torch.float32 but the layer keeps its state in
    torch.float64: pass the state the layer returned", which the user had done (a carry entry that
    changes shape was named so already); in float32 the same loss runs."""
    problem = make_problem(LinearModel(), _CountingLoss(), dtype=torch.float64, tokens=5)
    problem = replace(problem, task=replace(problem.task, kernel="torch"))  # no registry: a cheap test
    arguments = (problem.state, problem.task, problem.views, problem.lr, problem.tau)
    with pytest.raises(
        TypeError, match=r"'s46c_counting'.*carry\['seen'\] in torch.float32 on cpu.*torch.float64"
    ):
        run_scan(DualForm(), *arguments)
    low = make_problem(LinearModel(), _CountingLoss(), dtype=torch.float32, tokens=5)
    low = replace(low, task=replace(low.task, kernel="torch"))
    assert run_scan(DualForm(), low.state, low.task, low.views, low.lr, low.tau)[1].loss_carry["seen"] == 1


class _CastingModel(innerloop.InnerModel):
    """``tanh(x w) + b`` returned in ``dtype`` whatever the input's (a plugin's float64 constant, or a
    ``.float()``, in its forward)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.name, self.dtype = f"s46c_to_{str(dtype).removeprefix('torch.')}", dtype

    def param_shapes(self, f):
        return {"w": (1, f), "b": (1, f)}

    def init_params(self, num_heads, f, generator=None):
        return {"w": torch.randn(num_heads, 1, f, generator=generator), "b": torch.zeros(num_heads, 1, f)}

    def forward(self, params, x):
        return (torch.tanh(x * params["w"]) + params["b"]).to(self.dtype)


@pytest.mark.parametrize(("dtype", "given"), [(torch.float64, "float32"), (torch.float32, "float64")])
def test_an_inner_model_that_changes_its_input_s_dtype_is_named(dtype, given) -> None:
    """A model returning float64 for float32 input was registered, and a float32 layer with it and
    ``minibatch_gd`` was refused as the built-in rule's fault ("update rule 'minibatch_gd': forward
    returned outputs in torch.float64"); one returning float32 for float64 input was refused at
    registration with gradcheck's "Double did not match Float". Registration, and a layer given the
    instance, now name the model and both dtypes."""
    from innerloop.core.layer import _check_model_shape
    from innerloop.registry.kinds import KIND_BY_NAME, PluginError

    model = _CastingModel(dtype)
    message = rf"inner model '{model.name}'.*forward returns {dtype} for {given} input"
    with pytest.raises(PluginError, match=message):
        KIND_BY_NAME["inner_model"].validate(model)
    if dtype == torch.float64:  # a layer checks its model in float32
        with pytest.raises(
            ValueError, match=rf"inner_model '{model.name}'.*forward returns {dtype} for {given} input"
        ):
            _check_model_shape(model, 8)


def test_a_layer_built_under_autocast_checks_its_model_outside_it() -> None:
    """The build's float32 check of the model ran under the caller's autocast: ``x @ W`` (the built-in
    ``matrix`` model) came back bfloat16 there, and the new dtype check refused a built-in."""
    from innerloop.core.layer import _check_model_shape
    from innerloop.plugins.models.matrix import MatrixModel

    with torch.autocast("cpu", dtype=torch.bfloat16):
        _check_model_shape(MatrixModel(), 8)


class _Float32Gradient(innerloop.InnerLoss):
    """Reconstruction whose closed-form gradient is returned in float32 whatever the prediction's dtype."""

    name = "s46c_float32_gradient"

    def pairs(self, views, carry):
        return innerloop.LossPairs(views.key, views.value)

    def token_loss(self, prediction, target):
        return 0.5 * (prediction - target).pow(2).sum(-1)

    def token_loss_grad(self, prediction, target):
        return (prediction - target).float()


def test_an_inner_loss_whose_gradient_is_float32_in_a_float64_layer_is_refused() -> None:
    """Registration checked ``token_loss_grad``'s dtype for a float32 prediction only: this loss was
    registered, and a float64 layer with it and ``dual_form`` computed at float32's precision without a
    word (6e-8 off the built-in reconstruction loss's outputs, which it equals; float64's 1e-16)."""
    from innerloop.registry.kinds import KIND_BY_NAME, PluginError

    with pytest.raises(
        PluginError, match=r"token_loss_grad returned torch.float32 for a torch.float64 prediction"
    ):
        KIND_BY_NAME["inner_loss"].validate(_Float32Gradient())


class _BoolCheckModel(innerloop.UpdateRule):
    """``dual_form`` 1.5 times over (wrong numbers), whose ``check_model`` answers a bool (or raises, for
    the model named ``raise_for``) instead of None or a reason."""

    name = "s46c_bool_check_model"

    def __init__(self, raise_for: str = "") -> None:
        self.raise_for, self.inner = raise_for, DualForm()

    def check_model(self, model):
        if model.name == self.raise_for:
            raise KeyError("s46c: no such model")
        return model.stack is not None

    def forward(self, state, task, views, lr, tau):
        out, new = self.inner.forward(state, task, views, lr, tau)
        return 1.5 * out, new


def test_check_model_answering_a_bool_is_refused_and_its_error_names_the_rule() -> None:
    """A ``check_model`` answering True or False was taken as a refusal of every built-in model: the rule
    above, wrong by half, was registered without its conformance check, and every layer with it was
    refused as "cannot run inner_model='linear': True". A ``check_model`` that raised at a layer's build
    gave the bare ``KeyError`` with no note naming the plugin (registration named it)."""
    from innerloop.core.scan import CheckModelAnswerError, model_refusal
    from innerloop.registry.kinds import KIND_BY_NAME, PluginError
    from innerloop.registry.manager import validate_plugin

    with pytest.raises(
        PluginError, match=r"check_model must return None .* got bool True for inner model 'linear'"
    ):  # registration's checks
        validate_plugin(KIND_BY_NAME["update_rule"], _BoolCheckModel(), external=True)
    # a layer asks model_refusal (a registered rule that answers a bool for a plugin's model only)
    with pytest.raises(CheckModelAnswerError, match=r"'s46c_bool_check_model': check_model must return None"):
        model_refusal(_BoolCheckModel(), LinearModel())
    with pytest.raises(KeyError) as raised:
        model_refusal(_BoolCheckModel(raise_for="linear"), LinearModel())
    assert "raised in the plugin update rule 's46c_bool_check_model'" in " ".join(raised.value.__notes__)


@pytest.mark.slow  # builds the registry when run alone (~0.8 s), then a 2-block E2E model on 9 tokens
@pytest.mark.parametrize(
    ("how", "message"),
    [
        (
            "bfloat16",
            r"'blocks.1.prime.down_proj.weight': torch.bfloat16 \[2, 16, 24\] on cpu, given torch.float32 \[2, 16, 24\]",
        ),
        ("missing", r"'blocks.1.prime.down_proj.weight': missing, given torch.float32 \[2, 16, 24\]"),
        (
            "shape",
            r"'blocks.1.prime.down_proj.weight': torch.float32 \[2, 16, 23\] on cpu, given torch.float32 \[2, 16, 24\]",
        ),
    ],
)
def test_a_model_update_rule_whose_step_changes_the_fast_weights_is_named(how, message) -> None:
    """A TTT-E2E update rule's ``step`` returning its new fast weights in bfloat16 at a call's batch or
    shape that registration does not try ran on without a word (the next chunks scored with rounded
    weights); one dropping a weight or changing its shape failed with a bare ``KeyError`` or a torch
    shape error at the next chunk. The model now names the rule, the weight and what it was given."""
    from innerloop.models import build_model
    from innerloop.plugins.e2e import ScoreFirstSGD

    class Changing(ScoreFirstSGD):
        name = "s46c_changing"

        def step(self, fast, losses, lr, max_grad_norm, create_graph):
            new = super().step(fast, losses, lr, max_grad_norm, create_graph)
            key = sorted(new)[0]  # blocks.1.prime.down_proj.weight
            if how == "bfloat16":
                return {k: v.bfloat16() if k == key else v for k, v in new.items()}
            if how == "missing":
                return {k: v for k, v in new.items() if k != key}
            return {k: v[..., :-1] if k == key else v for k, v in new.items()}

    torch.manual_seed(0)
    config = {"mixer": "e2e", "vocab_size": 11, "hidden_size": 16, "num_layers": 2, "num_heads": 2}
    model = build_model({**config, "intermediate_size": 24, "window": 8, "e2e": {"chunk_size": 4}})
    model.update_rule = Changing()
    with pytest.raises(ValueError, match=rf"model update rule 's46c_changing'.*{message}"):
        model(torch.randint(0, 11, (2, 9)))
