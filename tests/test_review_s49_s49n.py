"""Review s49n: activation (gradient) checkpointing of the language models' blocks (CausalLM's
gradient_checkpointing_enable, trainer.gradient_checkpointing): the same loss and gradients, the carried
states included, less memory kept for the backward; nothing changes outside training; bad values and the
TTT-E2E model refused by name."""

from __future__ import annotations

import pytest
import torch

from innerloop.models import CausalLM, build_model

TINY = {"hidden_size": 32, "num_heads": 2, "num_layers": 2, "intermediate_size": 48, "window": 8}
KINDS: dict[str, dict] = {
    "ttt_linear": {**TINY, "ttt": {"mini_batch_size": 4}},
    "ttt_mlp": {**TINY, "backbone": "mamba", "ttt": {"inner_model": "mlp", "mini_batch_size": 4}},
    "attention": {**TINY, "mixer": "attention"},
    "swa": {**TINY, "mixer": "swa"},
    "linear_attention": {**TINY, "mixer": "linear_attention"},
    "deltanet": {**TINY, "mixer": "deltanet"},
    "gated_deltanet": {**TINY, "mixer": "gated_deltanet"},
    "titans": {**TINY, "mixer": "titans"},
}
"""A model of every mixer kind (the family's four, TTT's linear and MLP inner models)."""


def _model(kind: str, dtype: torch.dtype = torch.float64) -> CausalLM:
    torch.manual_seed(0)
    return build_model({**KINDS[kind], "vocab_size": 64}).to(dtype).train()


def _loss_and_grads(model: CausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Two calls, the state carried (not detached) from the first to the second; every gradient."""
    model.zero_grad(set_to_none=True)
    first, state = model(ids[:, :8])
    second, _ = model(ids[:, 8:], state)
    loss = first.logsumexp(-1).mean() + second.logsumexp(-1).pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


class _CountBlockRuns:
    """Counts the forwards of a model's blocks (a checkpointed block runs again in the backward; torch
    runs no forward hooks then, so each block instance's ``forward`` is wrapped)."""

    def __init__(self, model: CausalLM) -> None:
        self.runs = 0
        for block in model.blocks:
            block.forward = self._counting(block.forward)

    def _counting(self, forward):  # noqa: ANN001, ANN202
        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.runs += 1
            return forward(*args, **kwargs)

        return counted


@pytest.mark.slow  # two forwards and backwards of a tiny model per kind: 0.1-2 s on a quiet CPU
@pytest.mark.parametrize("kind", list(KINDS))
def test_checkpointed_blocks_give_the_same_loss_and_every_gradient_in_float64(kind: str) -> None:
    model = _model(kind)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    counter = _CountBlockRuns(model)
    model.gradient_checkpointing_enable()  # checkpointed first: a fresh process's first call too
    loss_checkpointed, grads_checkpointed = _loss_and_grads(model, ids)
    assert counter.runs == 2 * 2 * 2  # 2 blocks x 2 calls, each run again in the backward
    model.gradient_checkpointing_disable()
    loss, grads = _loss_and_grads(model, ids)
    assert counter.runs == 8 + 4
    torch.testing.assert_close(loss_checkpointed, loss, rtol=0, atol=1e-12)
    names = [name for name, _ in model.named_parameters()]
    assert len(grads) == len(names)
    for name, got, want in zip(names, grads_checkpointed, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=name)


@pytest.mark.slow  # as above, in float32, every other block
def test_checkpointing_every_other_block_in_float32_is_within_rounding() -> None:
    model = _model("ttt_linear", torch.float32)
    model.config.num_layers  # noqa: B018 (two blocks: the first checkpointed, the second not)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    counter = _CountBlockRuns(model)
    model.gradient_checkpointing_enable(every_n_layers=2)
    loss_checkpointed, grads_checkpointed = _loss_and_grads(model, ids)
    assert counter.runs == 2 * 2 + 2  # block 0 run again in each call's backward, block 1 not
    model.gradient_checkpointing_disable()
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss_checkpointed, loss, rtol=1e-6, atol=0)
    for got, want in zip(grads_checkpointed, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # 0.03 s, or up to 1 s as a process's first sliding-window model
def test_nothing_is_checkpointed_in_eval_or_without_gradients() -> None:
    model = _model("swa")
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, 64, (1, 8))
    counter = _CountBlockRuns(model)
    with torch.no_grad():
        model(ids)[0].sum()
    model.eval()
    model(ids)[0].sum().backward()
    assert counter.runs == 4  # each block once per call: no recomputation
    assert model.gradient_checkpointing  # still on: training mode checkpoints again


@pytest.mark.slow  # two forwards and backwards of 64 tokens: about 0.4 s
def test_checkpointing_saves_fewer_tensor_bytes_for_the_backward() -> None:
    """What the backward keeps, counted by saved-tensor hooks (the docs' numbers: docs/training.md)."""
    model = _model("swa", torch.float32)
    ids = torch.randint(0, 64, (2, 64))
    kept = {}
    for on in (False, True):
        model.gradient_checkpointing = on
        nbytes = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal nbytes
            nbytes += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids)[0].sum().backward()
        kept[on] = nbytes
    assert kept[True] < kept[False] / 2, kept


@pytest.mark.slow  # two profiled training steps: about 1 s
def test_checkpointing_lowers_the_peak_memory_of_a_training_step() -> None:
    """The profiler's peak of the tensors a step allocates (docs/training.md states larger models'); not
    timed."""
    from innerloop.testing.memory import peak_cpu_allocation

    model = _model("ttt_linear", torch.float32)
    ids = torch.randint(0, 64, (2, 64))
    model(ids[:, :8])[0].sum().backward()  # first use (kernel checks) before measuring
    peaks = {}
    for on in (False, True):
        model.gradient_checkpointing = on
        model.zero_grad(set_to_none=True)
        peaks[on] = peak_cpu_allocation(lambda: model(ids)[0].logsumexp(-1).sum().backward())
    assert peaks[True] < 0.6 * peaks[False], peaks


def _layers(model: CausalLM) -> list:
    from innerloop.core.layer import TTTLayer

    return [m for m in model.modules() if isinstance(m, TTTLayer)]


@pytest.mark.slow  # two forwards and backwards of a tiny TTT model: ~0.5 s
def test_call_options_changed_between_forward_and_backward_do_not_change_the_recomputation() -> None:
    """The training loop lets NaN through during its forward (non_finite='ignore') and puts 'raise' back
    before the backward: the recomputation ran the other checks and torch refused it (CheckpointError,
    'Recomputed values ... have different metadata'; `innerloop train` with
    trainer.gradient_checkpointing=true failed at its first step). A base_lr changed before the backward
    gave other gradients, silently. The recomputation runs with the options of the forward."""
    model = _model("ttt_linear")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    loss = model(ids)[0].logsumexp(-1).mean()
    loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    for layer in _layers(model):
        layer.non_finite = "ignore"
    loss = model(ids)[0].logsumexp(-1).mean()
    for layer in _layers(model):
        layer.non_finite, layer.base_lr = "raise", 3 * layer.base_lr
    loss.backward()
    for got, expected in zip([p.grad for p in model.parameters()], want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert all(layer.non_finite == "raise" for layer in _layers(model))  # put back after the recomputation


def test_a_wrong_option_value_is_refused_by_name() -> None:
    model = _model("swa")
    with pytest.raises(TypeError, match=r"gradient_checkpointing='yes' \(str\) must be True or False"):
        model.gradient_checkpointing = "yes"
    with pytest.raises(ValueError, match=r"every_n_layers must be a positive integer, got 0"):
        model.gradient_checkpointing_enable(every_n_layers=0)
    reentrant = torch.utils.checkpoint.checkpoint
    from functools import partial

    with pytest.raises(ValueError, match=r"checkpoint_function has use_reentrant=True"):
        model.gradient_checkpointing_enable(checkpoint_function=partial(reentrant, use_reentrant=True))
    with pytest.raises(TypeError, match=r"checkpoint_function must be callable"):
        model.gradient_checkpointing_enable(checkpoint_function="checkpoint")
    with pytest.raises(ValueError, match=r"checkpoint_function has use_reentrant=None \(torch's default"):
        model.gradient_checkpointing_enable(checkpoint_function=reentrant)  # torch's default: reentrant
    with pytest.raises(
        ValueError, match=r"gradient_checkpointing_kwargs has \['use_reentrnt'\], not options"
    ):
        model.gradient_checkpointing_enable({"use_reentrnt": False})  # would reach the block's forward
    with pytest.raises(ValueError, match=r"gradient_checkpointing_kwargs has use_reentrant=True"):
        model.gradient_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(TypeError, match=r"gradient_checkpointing_kwargs must be a dict"):
        model.gradient_checkpointing_enable(["use_reentrant"])
    with pytest.raises(ValueError, match=r"not both"):
        model.gradient_checkpointing_enable({}, checkpoint_function=partial(reentrant, use_reentrant=False))
    assert not model.gradient_checkpointing
    model.gradient_checkpointing_enable({"determinism_check": "none"})  # as Hugging Face's models take them
    assert model._gradient_checkpointing_func.keywords == {
        "use_reentrant": False,
        "determinism_check": "none",
    }


def test_the_e2e_model_refuses_checkpointing_saying_why() -> None:
    torch.manual_seed(0)
    model = build_model({**TINY, "mixer": "e2e", "num_layers": 4, "e2e": {"chunk_size": 4}, "vocab_size": 64})
    with pytest.raises(NotImplementedError, match=r"TTT-E2E model does not support activation"):
        model.gradient_checkpointing_enable()
    assert model.gradient_checkpointing is False


@pytest.mark.slow  # loads three configs (and imports the config layer): ~3 s
def test_the_run_key_is_a_bool_turns_checkpointing_on_and_is_refused_for_e2e(tmp_path) -> None:
    from innerloop.config import ConfigError, load_config
    from innerloop.train.run import build_module

    out = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"'trainer.gradient_checkpointing'.*'yes' is not true or false"):
        load_config("tiny", ["trainer.gradient_checkpointing=yes"], out_dir=out)
    with pytest.raises(
        ConfigError, match=r"trainer.gradient_checkpointing=true is not supported with model.mixer='e2e'"
    ):
        load_config("e2e-tiny", ["trainer.gradient_checkpointing=true"], out_dir=out)
    run, _ = load_config("tiny", ["trainer.gradient_checkpointing=true", "model.num_layers=1"], out_dir=out)
    assert build_module(run).model.gradient_checkpointing
    run.trainer.gradient_checkpointing = "no"  # a run built in Python: checked too
    from innerloop.config import validate_run_config

    with pytest.raises(
        ConfigError, match=r"trainer.gradient_checkpointing='no' \(str\) must be true or false"
    ):
        validate_run_config(run)
