"""Review s36c: the plugin testing kit (``innerloop.testing``) on deliberately broken plugins.

Each test builds a plugin broken in one way and calls the kit's check that must fail it, directly on a
tiny problem (not the whole ``check_*``, which runs every shape and loss: seconds per call), and reads
the message: it must say what is wrong, not only that two numbers differ."""

from __future__ import annotations

import pytest
import torch

import innerloop
from innerloop.core.protocol import HalfSquaredError, InnerLoss, InnerModel, LossPairs
from innerloop.plugins.losses.next_token import NextToken
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.models.matrix import MatrixModel
from innerloop.plugins.optimizers.minibatch_gd import MiniBatchGD
from innerloop.registry import isolated_registry
from innerloop.registry.kinds import PluginError
from innerloop.testing import check_inner_model, make_problem, run_in_chunks
from innerloop.testing.checks import (
    RaisedWithoutGradError,
    StateWrittenError,
    check_forward_head_independent,
    check_forward_leaves_inputs,
    check_init_params_uses_generator,
    check_inner_loss_in_float32,
    check_inner_model_in_float32,
    check_loss_gradient,
    check_pairs_deterministic,
    check_pairs_head_independent,
    check_update_rule_without_grad,
)


class _HalvesPendingInPlace(MiniBatchGD):
    """minibatch_gd that, after its step, halves the pending sums of the state it was given, in place:
    invisible on a sequence's first state (pending sums of zero), wrong on every carried one."""

    name = "halves_pending_in_place"

    def forward(self, state, task, views, lr, tau, **options):
        result = super().forward(state, task, views, lr, tau, **options)
        with torch.no_grad():
            for pending in state.pending.values():
                pending.mul_(0.5)
        return result


def test_run_in_chunks_refuses_a_rule_that_writes_into_a_carried_state():
    """Only the first chunk's state was compared before and after the call; its pending sums are zeros,
    so a rule that scales them in place (a decay applied in place, say) passed check_update_rule."""
    problem = make_problem("linear", "reconstruction", batch=1, heads=1, head_dim=3, tokens=4)
    rule = _HalvesPendingInPlace()
    with pytest.raises(
        AssertionError,
        match=r"halves_pending_in_place: the rule, given the state carried to token 1, wrote into the state.*pending\['W1'\]",
    ):
        run_in_chunks(rule, problem, [1])


def test_a_write_into_a_carried_state_without_grad_is_named_as_such():
    """Under no_grad the write is named as a write into the state (with the case), not as 'forward
    raised' (RaisedWithoutGradError, the message for a rule that cannot run without autograd)."""
    problem = make_problem("linear", "reconstruction", batch=1, heads=1, head_dim=3, tokens=4)
    with pytest.raises(
        StateWrittenError, match=r"under torch.no_grad\(\).*cut at \[1\]: the rule, given the state carried"
    ) as caught:
        check_update_rule_without_grad(_HalvesPendingInPlace(), problem, cut_points=[1])
    assert not isinstance(caught.value, RaisedWithoutGradError)


class _WritesItsCarry(NextToken):
    """next_token that also copies its new carry into the carry it was given (a cache updated in place)."""

    name = "s36c_writes_its_carry"

    def pairs(self, views, carry):
        out = super().pairs(views, carry)
        if carry["previous_key"].shape == out.carry["previous_key"].shape:
            carry["previous_key"].copy_(out.carry["previous_key"])
            carry["has_previous"].fill_(1.0)
        return out


class _WritesItsWeights(LinearModel):
    """linear that nudges its bias in place on every forward."""

    name = "s36c_writes_its_weights"

    def forward(self, params, x):
        out = super().forward(params, x)
        with torch.no_grad():
            params["b1"].add_(1e-3)
        return out


class _WritesItsTarget(HalfSquaredError):
    """A closed-form gradient computed in the target's memory (outside autograd)."""

    name = "s36c_writes_its_target"

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=views.value - views.key)

    def token_loss_grad(self, prediction, target):
        return target.mul_(-1).add_(prediction) if not target.requires_grad else prediction - target


WRITTEN = r"wrote into .*which it was given"


def test_a_loss_that_writes_into_its_carry_is_named_by_the_kit_and_at_registration():
    """It failed before as 'pairs' derivatives differ from finite differences' (the kit) or 'sequence 0's
    pairs depend on the other sequences' (registration, after the registrar's own first call had already
    written into the carry it then checked with)."""
    views = make_problem("linear", "next_token", batch=2, heads=1, head_dim=3, tokens=3).views
    carry = _WritesItsCarry().init_carry(2, 1, 3, views.key)
    with pytest.raises(AssertionError, match=r"pairs\(\) " + WRITTEN + r".*TTTState, which is immutable"):
        check_pairs_deterministic(_WritesItsCarry(), views, carry)
    with (
        isolated_registry(),
        pytest.raises(PluginError, match=r"carry\['previous_key'\].*which it was given"),
    ):
        innerloop.register_inner_loss(_WritesItsCarry())


def test_a_model_that_writes_into_its_weights_is_named_by_the_kit_and_at_registration():
    params = LinearModel().init_params(1, 3)
    with pytest.raises(AssertionError, match=r"forward wrote into params\['b1'\], which it was given"):
        check_forward_leaves_inputs(_WritesItsWeights(), params, torch.randn(1, 2, 3))
    with isolated_registry(), pytest.raises(PluginError, match=r"forward wrote into params\['b1'\]"):
        innerloop.register_inner_model(_WritesItsWeights())


def test_a_closed_form_gradient_that_writes_into_the_target_is_named():
    """Before, torch's own 'a leaf Variable that requires grad is being used in an in-place operation'
    surfaced from inside the kit."""
    target = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    with pytest.raises(AssertionError, match=r"token_loss_grad wrote into the target, which it was given"):
        check_loss_gradient(_WritesItsTarget(), target + 1.0, target)


class _MixesHeads(InnerLoss):
    """Reconstruction whose token_loss adds a tenth of the mean error over the heads of the call (with a
    consistent closed-form gradient, so that token_loss_grad equals autograd of token_loss)."""

    name = "s36c_mixes_heads"
    dim = -3

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=views.value - views.key)

    def _error(self, prediction, target):
        error = prediction - target
        if error.dim() >= -self.dim:
            error = error + 0.1 * error.mean(dim=self.dim, keepdim=True)
        return error

    def token_loss(self, prediction, target):
        return 0.5 * self._error(prediction, target).pow(2).sum(-1)

    def token_loss_grad(self, prediction, target):
        with torch.enable_grad():
            leaf = prediction if prediction.requires_grad else prediction.detach().requires_grad_(True)
            return torch.autograd.grad(self.token_loss(leaf, target).sum(), leaf, create_graph=True)[0]


class _MixesTokens(_MixesHeads):
    name = "s36c_mixes_tokens"
    dim = -2


# the losses' closed form is autograd's, which cannot run under inference_mode: registration warns of it
# (047db466) before it refuses them for what this test is about
@pytest.mark.filterwarnings(
    "ignore:inner loss 's36c_mixes_.*cannot run without autograd:innerloop.PluginWarning"
)
@pytest.mark.parametrize(("loss", "what"), [(_MixesHeads(), "3 heads"), (_MixesTokens(), "3 tokens")])
def test_a_token_loss_that_mixes_heads_or_tokens_is_named(loss, what):
    """It passed check_loss_gradient (its closed form is autograd's) and failed later as 'minibatch_gd vs
    the naive token loop' (check_inner_loss) or 'dual_form vs ...': a built-in rule blamed."""
    target = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    prediction = target + torch.randn(target.shape, dtype=torch.float64)
    pattern = rf"token_loss of {what} in one call vs each of the \w+ alone \(a token's loss must read"
    with pytest.raises(AssertionError, match=pattern):
        check_loss_gradient(loss, prediction, target)
    with isolated_registry(), pytest.raises(PluginError, match=pattern.replace("3", r"\d")):
        innerloop.register_inner_loss(loss)


def _off_in_float32(t: torch.Tensor) -> float:
    """1.01 for a float32 tensor, else 1: right in float64, 1% off in float32."""
    return 1.01 if t.dtype == torch.float32 else 1.0


class _LinearOffInFloat32(InnerModel):
    name = "s36c_linear_off_in_float32"

    def param_shapes(self, head_dim):
        return {"W1": (head_dim, head_dim)}

    def init_params(self, num_heads, head_dim, generator=None):
        return {"W1": torch.randn(num_heads, head_dim, head_dim, generator=generator) * 0.02}

    def forward(self, params, x):
        return _off_in_float32(x) * (x @ params["W1"])


class _PairsOffInFloat32(HalfSquaredError):
    name = "s36c_pairs_off_in_float32"

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=_off_in_float32(views.value) * views.value - views.key)


class _LossOffInFloat32(HalfSquaredError):
    name = "s36c_loss_off_in_float32"

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=views.value - views.key)

    def token_loss(self, prediction, target):
        return _off_in_float32(prediction) * super().token_loss(prediction, target)

    def token_loss_grad(self, prediction, target):
        return _off_in_float32(prediction) * (prediction - target)


IN_FLOAT32 = r"in float32 vs in float64 on the same float32-rounded inputs .*relative error 1\.\d+e-02"


def test_a_model_wrong_in_float32_only_is_caught():
    """check_inner_model ran the model in float64 only; check_update_rule's float32 check allows 100x its
    reference's own float32 error, and that reference runs the same wrong model: it passed."""
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    with pytest.raises(AssertionError, match=r"s36c_linear_off_in_float32: forward " + IN_FLOAT32):
        check_inner_model_in_float32(_LinearOffInFloat32(), _LinearOffInFloat32().init_params(2, 3), x)
    with isolated_registry(), pytest.raises(PluginError, match=r"forward " + IN_FLOAT32):
        innerloop.register_inner_model(_LinearOffInFloat32())


@pytest.mark.parametrize(
    ("loss", "part"), [(_PairsOffInFloat32(), "pairs"), (_LossOffInFloat32(), "token_loss")]
)
def test_a_loss_wrong_in_float32_only_is_caught(loss, part):
    problem = make_problem("linear", "reconstruction", batch=2, heads=2, head_dim=3, tokens=3)
    prediction = torch.randn(problem.views.key.shape, dtype=torch.float64)
    with pytest.raises(
        AssertionError, match=rf"{loss.name}: {part} " + IN_FLOAT32.replace("1\\.\\d+e-02", "")
    ):
        check_inner_loss_in_float32(loss, problem.views, {}, prediction)


def test_registration_refuses_a_loss_wrong_in_float32_only():
    """(The pairs' case: a closed-form token_loss_grad is checked at registration against finite
    differences first, 0.3 s.)"""
    with isolated_registry(), pytest.raises(PluginError, match=r"pairs in float32 vs in float64"):
        innerloop.register_inner_loss(_PairsOffInFloat32())


class _InitFromTheGlobalRNG(_LinearOffInFloat32):
    """Draws its initial weights from torch's global RNG, not the generator it is given."""

    name = "s36c_init_from_the_global_rng"

    def init_params(self, num_heads, head_dim, generator=None):
        return {"W1": torch.randn(num_heads, head_dim, head_dim) * 0.02}


class _InitFromNumpy(_LinearOffInFloat32):
    name = "s36c_init_from_numpy"

    def init_params(self, num_heads, head_dim, generator=None):
        import numpy as np

        return {"W1": torch.from_numpy(np.random.randn(num_heads, head_dim, head_dim) * 0.02)}


def test_a_model_that_ignores_the_generator_it_is_given_is_caught():
    """It passed: the kit's problems (make_problem) then differ from run to run, a failure cannot be
    reproduced from its seed."""
    with pytest.raises(
        AssertionError, match=r"must draw from g only: torch's global RNG moved during the call"
    ):
        check_init_params_uses_generator(_InitFromTheGlobalRNG(), 2, 3)
    with pytest.raises(AssertionError, match=r"must draw from g only: \['W1'\] differed"):
        check_init_params_uses_generator(_InitFromNumpy(), 2, 3)
    with pytest.raises(AssertionError, match=r"init_params\(3, 5, generator=g\) must draw from g only"):
        check_inner_model(_InitFromTheGlobalRNG())  # at check_inner_model's first shape, before the others
    state = torch.get_rng_state()
    check_init_params_uses_generator(LinearModel(), 2, 3)  # the built-ins draw from it
    check_init_params_uses_generator(MatrixModel(), 2, 3)  # a fixed init (zeros) is not refused
    assert torch.equal(torch.get_rng_state(), state)  # the caller's global RNG put back


@pytest.mark.slow  # ~0.8 s: check_kernel runs every float64 case of one head dim before the float32 one
def test_check_kernel_runs_a_float32_case_by_default():
    """A kernel right in float64 and wrong in float32 from its third mini-batch on (what dispatch's
    first-use check, which sees two, accepts) passed check_kernel's default float64 run; layers run in
    float32. (The pure-torch reference kernel, the cheapest to run every case with.)"""
    from plugin_testing import register_linear_dual_form_kernel

    from innerloop.kernels.reference import reference_kernel
    from innerloop.plugins.losses.reconstruction import Reconstruction
    from innerloop.testing import check_kernel

    reference, _ = reference_kernel(LinearModel(), Reconstruction())

    def forward(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
        if xq.dtype == torch.float32:
            lr = lr.clone()
            lr[:, :, 2 * tau.shape[0] :] *= 0.5
        return reference(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)

    with isolated_registry():
        register_linear_dual_form_kernel("s36c_late_in_float32", forward, priority=100)
        pattern = r"s36c_late_in_float32'\): head_dim 4 \(TTTLayer, in float32\), 71 tokens .*grad: output"
        with pytest.raises(AssertionError, match=pattern):
            check_kernel("s36c_late_in_float32", head_dims=(4,))


class _NudgedByTheNextHead(HalfSquaredError):
    """Reconstruction whose targets take a thousandth of the next head's value view."""

    name = "s36c_nudged_by_the_next_head"

    def pairs(self, views, carry):
        value = views.value + 1e-3 * views.value.roll(1, dims=1)
        return LossPairs(inputs=views.key, targets=value - views.key)


def test_a_loss_whose_pairs_mix_heads_is_caught():
    """It passed check_inner_loss and registration: the batch, token and chunk checks keep the heads
    together."""
    views = make_problem("linear", "reconstruction", batch=1, heads=2, head_dim=3, tokens=4).views
    pattern = r"head 0's pairs when the other heads' views change \(first chunk.*\(targets\)"
    with pytest.raises(AssertionError, match=pattern):
        check_pairs_head_independent(_NudgedByTheNextHead(), views, {})
    with (
        isolated_registry(),
        pytest.raises(PluginError, match=r"pairs when the other heads' views change"),
    ):
        innerloop.register_inner_loss(_NudgedByTheNextHead())


class _NudgedByTheNextHeadsOutput(_LinearOffInFloat32):
    """A bias-free linear map plus a thousandth of the next head's output."""

    name = "s36c_nudged_by_the_next_heads_output"

    def forward(self, params, x):
        out = x @ params["W1"]
        return out + 1e-3 * out.roll(1, dims=-3) if out.dim() >= 3 else out


def test_a_model_that_mixes_heads_is_named():
    """It failed as 'minibatch_gd vs the naive token loop' (the primal rule runs one head at a time): a
    built-in rule blamed."""
    model = _NudgedByTheNextHeadsOutput()
    pattern = r"forward of head 0 in a call of 2 heads vs the head alone"
    with pytest.raises(AssertionError, match=pattern):
        check_forward_head_independent(model, model.init_params(2, 3), torch.randn(2, 4, 3))
    with isolated_registry(), pytest.raises(PluginError, match=pattern):
        innerloop.register_inner_model(model)


class _HalvesItsLrInPlace(MiniBatchGD):
    """minibatch_gd on the given lr, which it halves in place after reading it (its outputs are right)."""

    name = "s36c_halves_its_lr_in_place"

    def forward(self, state, task, views, lr, tau, **options):
        result = super().forward(state, task, views, lr.clone(), tau, **options)
        with torch.no_grad():
            lr.mul_(0.5)
        return result


def test_a_rule_that_writes_into_its_inputs_is_named():
    """It failed as 'vs the naive token loop, cut at [...]: relative error' (the second run read the
    halved lr), the write itself unnamed; the layer's outer gradients flow through that lr."""
    problem = make_problem("linear", "reconstruction", batch=1, heads=1, head_dim=3, tokens=4)
    with pytest.raises(
        StateWrittenError, match=r"s36c_halves_its_lr_in_place: the rule wrote into lr, which it was given"
    ):
        run_in_chunks(_HalvesItsLrInPlace(), problem, [2])


def _e2e_plugins():
    from innerloop.plugins.e2e import NextTokenChunkLoss, ScoreFirstSGD

    class ClipsByTheBatchsNorm(ScoreFirstSGD):
        """Clips the gradient of the whole batch to the norm (clip_grad_norm_'s way), not each sequence's."""

        name = "s36c_clips_by_the_batchs_norm"

        def step(self, fast, losses, lr, max_grad_norm, create_graph):
            names = list(fast)
            grads = torch.autograd.grad(
                losses.sum(), [fast[k] for k in names], create_graph=create_graph, retain_graph=True
            )
            if max_grad_norm > 0:
                norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
                grads = [g * (max_grad_norm / norm).clamp(max=1.0) for g in grads]
            return {k: fast[k] - lr * g for k, g in zip(names, grads, strict=True)}

    class MeanOverTheBatch(NextTokenChunkLoss):
        name = "s36c_mean_over_the_batch"

        def chunk_loss(self, logits, input_ids):
            losses = super().chunk_loss(logits, input_ids)
            return losses.mean().expand_as(losses)

    return ClipsByTheBatchsNorm(), MeanOverTheBatch(), ScoreFirstSGD(), NextTokenChunkLoss()


def test_e2e_plugins_that_mix_the_sequences_of_a_batch_are_refused():
    """Both registered (the smoke test checks shapes, dtypes and the graph only), and a TTT-E2E model
    streamed each sequence with updates that depended on the others of its batch."""
    from innerloop.testing.checks import (
        check_model_inner_loss_batch_independent,
        check_model_update_rule_batch_independent,
    )

    clips, mean, sgd, next_token = _e2e_plugins()
    check_model_update_rule_batch_independent(sgd)  # the built-ins pass
    check_model_inner_loss_batch_independent(next_token)
    with pytest.raises(
        AssertionError, match=r"sequence 0 in a batch of 3 vs the sequence alone \(max_grad_norm=1.0"
    ):
        check_model_update_rule_batch_independent(clips)
    with (
        isolated_registry(),
        pytest.raises(PluginError, match=r"model update rule .* in a batch of 3 vs the sequence alone"),
    ):
        innerloop.register_model_update_rule(clips)
    with (
        isolated_registry(),
        pytest.raises(PluginError, match=r"chunk_loss of sequence 0 in a batch of 3 vs the sequence alone"),
    ):
        innerloop.register_model_inner_loss(mean)


class _ReferenceHalvesTheLr(MiniBatchGD):
    """minibatch_gd declaring the naive loop as its reference, which then halves the lr it was given."""

    name = "s36c_reference_halves_the_lr"

    def reference(self, state, task, views, lr, tau, **options):
        from innerloop.testing import naive_token_loop

        result = naive_token_loop(state, task, views, lr, tau, **options)
        with torch.no_grad():
            lr.mul_(0.5)
        return result


def test_a_declared_reference_that_writes_into_its_inputs_is_named():
    """The rule's own runs were checked for writes, not its declared reference: the rule was then compared,
    in the next case, with numbers computed from a halved lr."""
    problem = make_problem("linear", "reconstruction", batch=1, heads=1, head_dim=3, tokens=4)
    with pytest.raises(
        StateWrittenError, match=r"its declared reference .*wrote into lr, which it was given"
    ):
        problem.expected(_ReferenceHalvesTheLr())
