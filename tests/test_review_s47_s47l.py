"""transformers' Trainer under gradient accumulation: a step over micro-batches with unequal numbers of
scored tokens moves the weights as one step over their concatenation does (the loss weighted by tokens,
through ``num_items_in_batch``), and forward's ``num_items_in_batch`` argument."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "hf"))  # hf_testing, the tiny models the hf tests share
from hf_testing import tiny_hf_model  # noqa: E402

transformers = pytest.importorskip(
    "transformers", reason="transformers is the hf extra (pip install -e '.[hf]')"
)


def _rows(length: int = 12) -> list[dict[str, torch.Tensor]]:
    """Four rows: the first two scored everywhere, the last two on their last three tokens only, so
    the micro-batches of two rows score 22 and 4 shifted tokens."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index in range(4):
        ids = torch.randint(1, 100, (length,), generator=generator)
        labels = ids.clone()
        if index >= 2:
            labels[: length - 3] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _one_step(kind: str, out: Path, batch_size: int, accumulation: int) -> torch.nn.Module:
    """The tiny model (float64) after one SGD step of transformers' Trainer over ``_rows`` in order."""
    model = tiny_hf_model(kind).double().train()
    arguments = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        train_sampling_strategy="sequential",
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=_rows())
    # train() starts with accelerate's release_memory: a full gc.collect (0.3-0.75 s of CPU in a test
    # process holding torch, Lightning and transformers, for each of this test's four runs) that frees
    # memory and changes no number
    module = transformers.trainer
    free = lambda *objects: [None] * len(objects)  # noqa: E731
    no_gc = mock.patch.object(module, "release_memory", free) if hasattr(module, "release_memory") else None
    with no_gc or contextlib.nullcontext():
        trainer.train()
    return model


@pytest.mark.slow  # ~2 s: two one-step Trainer runs (and importing the Trainer)
@pytest.mark.parametrize("kind", ["ttt_linear", "e2e"])
def test_gradient_accumulation_weighs_micro_batches_by_their_scored_tokens(kind, tmp_path):
    accumulated = _one_step(kind, tmp_path / "accumulated", batch_size=2, accumulation=2)
    whole = _one_step(kind, tmp_path / "whole", batch_size=4, accumulation=1)
    start = tiny_hf_model(kind).double()
    moved = [
        name
        for name, weight in start.state_dict().items()
        if not torch.equal(weight, whole.state_dict()[name])
    ]
    assert moved, "the step moved no weight: the comparison below would show nothing"
    for name, want in whole.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[name], want, rtol=1e-12, atol=1e-12, msg=name)


def _batch(model) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, model.config.vocab_size, (2, 6), generator=generator)
    labels = ids.clone()
    labels[1, :4] = -100
    return {"input_ids": ids, "labels": labels}  # 5 + 2 = 7 shifted tokens scored


@pytest.mark.slow  # ~0.5 s: six forwards of each kind in float64
@pytest.mark.parametrize("kind", ["ttt_linear", "e2e"])
def test_num_items_in_batch_divides_the_sum_of_the_scored_losses(kind):
    model = tiny_hf_model(kind).double()
    batch = _batch(model)
    mean = model(**batch).loss
    for count in (7, torch.tensor(7), torch.tensor(7.0), torch.tensor([7])):
        torch.testing.assert_close(model(**batch, num_items_in_batch=count).loss, mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(model(**batch, num_items_in_batch=20).loss, mean * 7 / 20, rtol=1e-14, atol=0)
    as_tuple = model(**batch, num_items_in_batch=20, return_dict=False)
    torch.testing.assert_close(as_tuple[0], mean * 7 / 20, rtol=1e-14, atol=0)
    assert model(batch["input_ids"], num_items_in_batch=20).loss is None  # no labels: no loss


def test_a_count_of_zero_gives_zero_with_nothing_scored_and_is_refused_otherwise():
    model = tiny_hf_model("ttt_linear").double()
    batch = _batch(model)
    unscored = torch.full_like(batch["labels"], -100)
    loss = model(batch["input_ids"], labels=unscored, num_items_in_batch=0).loss
    assert loss.item() == 0 and loss.requires_grad
    with pytest.raises(ValueError, match=r"num_items_in_batch=0, but the labels score 7 token"):
        model(**batch, num_items_in_batch=0)


@pytest.mark.parametrize(
    "bad, named",
    [
        (7.0, "float 7.0"),
        (True, "bool True"),
        ([7], "list"),
        ("7", "str"),
        (torch.tensor([3, 4]), r"shape \[2\]"),
        (torch.tensor(True), "torch.bool"),
        (-1, "0 or more, got -1"),
        (torch.tensor(float("nan")), "got nan"),
        (torch.tensor(float("inf")), "got inf"),
    ],
)
def test_a_bad_num_items_in_batch_is_refused_naming_it(bad, named):
    model = tiny_hf_model("ttt_linear")
    batch = _batch(model)
    with pytest.raises(ValueError, match=rf"num_items_in_batch.*{named}"):
        model(**batch, num_items_in_batch=bad)
    with pytest.raises(ValueError, match=rf"num_items_in_batch.*{named}"):
        model(batch["input_ids"], num_items_in_batch=bad)  # checked without labels too


def test_unknown_arguments_are_still_refused_and_num_items_in_batch_is_named_as_supported():
    model = tiny_hf_model("ttt_linear")
    with pytest.raises(ValueError, match=r"does not use: reduction;.*num_items_in_batch"):
        model(**_batch(model), reduction="sum")


@pytest.mark.slow  # ~1 s: builds a Trainer (and imports it)
def test_the_trainer_counts_the_tokens_forward_scores(tmp_path):
    model = tiny_hf_model("ttt_linear").double()
    arguments = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=model, args=arguments)
    batch = _batch(model)
    count = trainer._get_num_items_in_batch([batch, batch], torch.device("cpu"))
    assert int(count) == 14  # labels[..., 1:] of both micro-batches: shifted, as forward scores them
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=count)
    torch.testing.assert_close(loss, model(**batch).loss / 2, rtol=1e-6, atol=0)
    # a left-padded row: forward does not score its first token (it follows nothing but pads), the
    # Trainer counts it unless its label is -100 (docs/huggingface.md)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, :2] = 0
    padded = {**batch, "attention_mask": mask, "labels": batch["labels"].clone()}
    padded["labels"][0, :2] = -100
    assert int(trainer._get_num_items_in_batch([padded], torch.device("cpu"))) == 6
    padded["labels"][0, 2] = -100
    assert int(trainer._get_num_items_in_batch([padded], torch.device("cpu"))) == 5
    scored_alone = model(**padded, num_items_in_batch=5).loss
    torch.testing.assert_close(scored_alone, model(**padded).loss, rtol=1e-14, atol=0)


@pytest.mark.slow  # ~1 s: builds a Trainer (and imports it)
def test_the_trainers_label_smoothing_scores_each_logit_against_the_next_label(tmp_path):
    model = tiny_hf_model("ttt_linear").double()
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, label_smoothing_factor=1e-12
    )
    trainer = transformers.Trainer(model=model, args=arguments)
    batch = _batch(model)
    smoothed = trainer.compute_loss(model, dict(batch))  # a factor of 1e-12: the cross-entropy itself
    torch.testing.assert_close(smoothed, model(**batch).loss, rtol=1e-9, atol=0)
