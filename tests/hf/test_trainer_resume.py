"""transformers' Trainer resumes an innerloop model from its own checkpoint: the weights go on as in an
uninterrupted run, and nothing is reported missing (a tied LM head is saved once, as the embedding)."""

from __future__ import annotations

import logging

import pytest
import torch
from hf_testing import tiny_hf_model

transformers = pytest.importorskip(
    "transformers", reason="transformers is the hf extra (pip install -e '.[hf]')"
)


def _train(kind: str, out, resume_from=None) -> torch.nn.Module:
    model = tiny_hf_model(kind).train()
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 100, (16,), generator=generator)} for _ in range(4)]
    for row in data:
        row["labels"] = row["input_ids"]
    arguments = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=2,
        save_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    transformers.Trainer(model=model, args=arguments, train_dataset=data).train(
        resume_from_checkpoint=resume_from
    )
    return model


@pytest.mark.slow  # ~3 s: two short Trainer runs (and importing the Trainer)
@pytest.mark.parametrize("kind", ["ttt_linear"])  # tied: the untied head is saved as itself
def test_a_trainer_resumes_an_innerloop_model_with_no_key_missing(kind, tmp_path, caplog):
    whole = _train(kind, tmp_path / "whole")
    logger = logging.getLogger("transformers")
    logger.addHandler(caplog.handler)  # transformers' loggers do not propagate to the root's
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            resumed = _train(kind, tmp_path / "resumed", resume_from=str(tmp_path / "whole" / "checkpoint-1"))
    finally:
        logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "keys" in r.getMessage()], caplog.text
    for (name, got), want in zip(resumed.state_dict().items(), whole.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    tied = resumed.config.tie_word_embeddings
    assert (resumed.model.lm_head.weight is resumed.model.embed.weight) == tied
