"""``model.padding_id``: an embedding row that starts at zero and takes no gradient from its lookup, as
the reference models' ``nn.Embedding(padding_idx=pad_token_id)`` (their converted checkpoints carry it:
tests/interop/test_reference_models.py). The same in CausalLM and E2ELM, checked as a token id, kept by
the Hugging Face export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from innerloop.hf.export import export_model
from innerloop.models import ModelConfig, build_model

SMALL = {"vocab_size": 32, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 24}
E2E_SMALL = {**SMALL, "mixer": "e2e", "window": 8, "e2e": {"chunk_size": 4}}


@pytest.mark.parametrize("options", [SMALL, E2E_SMALL], ids=["ttt", "e2e"])
def test_the_padding_row_starts_at_zero_and_takes_no_gradient_from_its_lookup(options) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({**options, "padding_id": 3, "tie_embeddings": False}))
    assert model.embed.weight[3].abs().max() == 0 and model.embed.weight[4].abs().max() > 0
    ids = torch.tensor([[3, 1, 3, 2, 3, 4, 5, 3]])
    logits = model(ids)[0]
    grad = torch.autograd.grad(logits.square().sum(), model.embed.weight)[0]
    assert grad[3].abs().max() == 0 and grad[1].abs().max() > 0  # untied: the lookup is the row's only use


@pytest.mark.parametrize(
    ("value", "message"), [(32, r"in \[0, 32\)"), (-1, r"in \[0, 32\)"), (True, "an integer")]
)
def test_a_padding_id_that_is_not_a_token_id_is_refused_naming_it(value, message) -> None:
    with pytest.raises(ValueError, match=rf"model\.padding_id.*{message}"):
        build_model(ModelConfig.from_dict({**SMALL, "padding_id": value}))


@pytest.mark.slow  # ~0.5 s: an export and a transformers load; moved out of the fast loop, at its one-minute limit
def test_the_hugging_face_export_keeps_the_padding_row(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({**SMALL, "padding_id": 3})).eval()
    loaded = AutoModelForCausalLM.from_pretrained(export_model(model, tmp_path / "exported", tokenizer=None))
    assert loaded.model.embed.padding_idx == 3


def test_resizing_the_vocabulary_keeps_the_padding_row_and_refuses_to_drop_it(tmp_path: Path) -> None:
    # review s18 (regressions): the resized embedding was built without padding_idx, so the row trained
    # until the next save and load
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({**SMALL, "padding_id": 3, "tie_embeddings": False})).eval()
    loaded = AutoModelForCausalLM.from_pretrained(export_model(model, tmp_path / "exported", tokenizer=None))
    loaded.resize_token_embeddings(40)
    assert loaded.model.embed.padding_idx == 3
    logits = loaded(torch.tensor([[3, 1, 3, 2, 3, 39]])).logits
    grad = torch.autograd.grad(logits.square().sum(), loaded.model.embed.weight)[0]
    assert grad[3].abs().max() == 0 and grad[39].abs().max() > 0
    for size in (2, 3):  # 3 tokens: ids 0-2, no row 3
        with pytest.raises(
            ValueError, match=rf"new_num_tokens={size} .* drops the padding row model\.padding_id=3"
        ):
            loaded.resize_token_embeddings(size)
    assert loaded.model.embed.num_embeddings == 40  # nothing changed
    loaded.resize_token_embeddings(4)  # the padding row the last one: kept
    assert loaded.model.embed.padding_idx == 3
