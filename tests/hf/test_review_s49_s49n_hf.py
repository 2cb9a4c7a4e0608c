"""Review s49n: activation (gradient) checkpointing through transformers' protocol
(gradient_checkpointing_enable / activation_checkpointing_enable, their kwargs and every_n_layers,
TrainingArguments(gradient_checkpointing=True)): the same loss and gradients as without; a reentrant
checkpoint and the TTT-E2E model refused, saying why."""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_testing import tiny_hf_model

transformers = pytest.importorskip(
    "transformers", reason="transformers is the hf extra (pip install -e '.[hf]')"
)


def _loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    first = model(input_ids=ids[:, :6], labels=ids[:, :6], use_cache=True)
    second = model(input_ids=ids[:, 6:], labels=ids[:, 6:], past_key_values=first.past_key_values)
    (first.loss + second.loss).backward()
    return (first.loss + second.loss).detach(), [p.grad.clone() for p in model.parameters()]


def _enable(model, **kwargs) -> None:
    with (
        warnings.catch_warnings()
    ):  # transformers 5.25 deprecates the name for activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(**kwargs)


@pytest.mark.slow  # four forwards and backwards of a tiny model: ~1 s
@pytest.mark.parametrize("kind", ["ttt_linear", "swa"])
# transformers renames its gradient_checkpointing API (v6), which this test calls by its current name
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing.* is deprecated:FutureWarning")
def test_hf_checkpointing_gives_the_same_loss_and_gradients_with_the_cache_carried(kind: str) -> None:
    model = tiny_hf_model(kind).double().train()
    ids = torch.randint(1, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    _enable(model)
    assert model.model.gradient_checkpointing and model.is_activation_checkpointing
    loss_checkpointed, grads_checkpointed = _loss_and_grads(model, ids)
    model.gradient_checkpointing_disable()
    assert not model.model.gradient_checkpointing and not model.is_activation_checkpointing
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss_checkpointed, loss, rtol=0, atol=1e-12)
    for got, want in zip(grads_checkpointed, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    model.activation_checkpointing_enable(every_n_layers=2)
    assert model.model._checkpoint_every == 2
    loss_every_other, _ = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss_every_other, loss, rtol=0, atol=1e-12)


def test_a_reentrant_checkpoint_is_refused_by_name() -> None:
    """A reentrant checkpoint loses the carried states' gradients (measured: the swa model's gradients off
    by 2.5, TTT-Linear's by 78): refused, and checkpointing stays off."""
    model = tiny_hf_model("swa")
    with pytest.raises(ValueError, match=r"gradient_checkpointing_kwargs has use_reentrant=True"):
        _enable(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert not model.model.gradient_checkpointing


def test_the_e2e_model_refuses_checkpointing_as_transformers_refuses_a_model_without_it() -> None:
    model = tiny_hf_model("e2e")
    with pytest.raises(ValueError, match=r"does not support activation checkpointing for model.mixer='e2e'"):
        model.activation_checkpointing_enable()
    assert not model.is_activation_checkpointing


def _train(model, out, checkpointing: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 100, (16,), generator=generator)} for _ in range(2)]
    for row in data:
        row["labels"] = row["input_ids"]
    arguments = transformers.TrainingArguments(
        output_dir=str(out), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, save_strategy="no", gradient_checkpointing=checkpointing,
    )  # fmt: skip
    transformers.Trainer(model=model, args=arguments, train_dataset=data).train()


@pytest.mark.slow  # two Trainer runs of 1 step: ~2 s once the Trainer is imported
# transformers renames its gradient_checkpointing API (v6), which this test calls by its current name
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing.* is deprecated:FutureWarning")
def test_trainer_with_gradient_checkpointing_trains_the_same_weights(tmp_path) -> None:
    plain, checkpointed = tiny_hf_model("ttt_linear").train(), tiny_hf_model("ttt_linear").train()
    _train(plain, tmp_path / "plain", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _train(checkpointed, tmp_path / "checkpointed", True)
    assert checkpointed.model.gradient_checkpointing
    for (name, got), want in zip(checkpointed.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(plain.model.embed.weight, tiny_hf_model("ttt_linear").model.embed.weight)
