"""``InnerloopModel``, what ``AutoModel`` loads: the network up to its final norm, with the checks and
the cache of ``InnerloopForCausalLM``, and the same folder (its weights load by the same names)."""

from __future__ import annotations

import pytest
import torch
from hf_testing import MODEL_KINDS, tiny_hf_model
from transformers import AutoModel, AutoModelForCausalLM

from innerloop.hf import InnerloopConfig, InnerloopForCausalLM, InnerloopModel


def base_of(lm: InnerloopForCausalLM) -> InnerloopModel:
    """An InnerloopModel with ``lm``'s config and weights."""
    base = InnerloopModel(lm.config).eval()
    base.load_state_dict(lm.state_dict())
    return base


# CausalLM.features is every mixer's path (the mixers differ in the blocks only): a TTT and an attention one
@pytest.mark.parametrize("kind", ["ttt_linear", "attention"])
def test_the_last_hidden_state_is_what_the_head_reads_and_a_cache_continues_it(kind: str) -> None:
    lm = tiny_hf_model(kind)
    base = base_of(lm)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = base(ids, output_hidden_states=True)
        expected = lm(ids, output_hidden_states=True)
        assert torch.equal(lm.model.lm_head(whole.last_hidden_state), expected.logits)
        assert len(whole.hidden_states) == len(expected.hidden_states) == lm.config.model["num_layers"] + 1
        for mine, theirs in zip(whole.hidden_states, expected.hidden_states, strict=True):
            assert torch.equal(mine, theirs)
        first = base(ids[:, :6])
        second = base(ids[:, 6:], past_key_values=first.cache)
    pieces = torch.cat([first.last_hidden_state, second.last_hidden_state], dim=1)
    torch.testing.assert_close(pieces, whole.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert second.cache.seq_length == 11


def test_one_folder_loads_in_both_classes_through_the_auto_classes(tmp_path) -> None:
    lm = tiny_hf_model("ttt_mlp_mamba_untied")  # an untied head: its weights must load in both
    lm.save_pretrained(tmp_path / "lm")
    base = AutoModel.from_pretrained(tmp_path / "lm").eval()
    assert type(base) is InnerloopModel
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(base.model.lm_head(base(ids).last_hidden_state), lm(ids).logits)
    base.save_pretrained(tmp_path / "base")  # and back: a folder the base model saved is a whole model
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, lm(ids).logits)


def test_the_e2e_model_and_arguments_of_the_head_are_refused_naming_what_to_use(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"does not support the TTT-E2E model .*AutoModelForCausalLM"):
        InnerloopModel(InnerloopConfig(model=MODEL_KINDS["e2e"]))
    tiny_hf_model("e2e").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"does not support the TTT-E2E model"):
        AutoModel.from_pretrained(tmp_path)
    base = base_of(tiny_hf_model("swa"))
    ids = torch.tensor([[1, 2, 3]])
    for name, value in (("labels", ids), ("logits_to_keep", 1)):
        with pytest.raises(
            ValueError, match=rf"InnerloopModel.forward got argument\(s\) it does not use: {name}"
        ):
            base(ids, **{name: value})


@pytest.mark.slow  # transformers' pipelines module and an export: ~1.5 s
def test_the_feature_extraction_pipeline_reads_an_export(tmp_path) -> None:
    from transformers import pipeline

    from innerloop.hf.export import export_model
    from innerloop.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, num_heads=2)).eval()
    folder = export_model(model, tmp_path / "exported")
    features = pipeline("feature-extraction", model=str(folder))("hello world")  # [1, 11, 32] as lists
    with torch.no_grad():
        expected = model.features(torch.tensor([list(b"hello world")]))[0]
    assert torch.equal(torch.tensor(features), expected)
