"""A config field a language model reads only when it is built, changed on the built model, is refused at
the next forward and before the model is saved (innerloop checkpoint or Hugging Face folder).

Ignored, the model went on computing with the old value while the config, which checkpoints and exports
record, said the new one: ``model.config.rope_theta = 10.0`` left the logits as they were, and the saved
model read back differed by 0.46. Fields the model reads at no point (``init_std`` after the first draw,
``ttt.kernel``, another mixer's section, ``window`` of a mixer without one) stay free to change.
"""

from __future__ import annotations

import pytest
import torch

from innerloop.models.config import ModelConfig, built_fields_of_causal_lm
from innerloop.models.factory import build_model
from innerloop.train.module import save_model_checkpoint

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


def _model(**fields):
    torch.manual_seed(0)
    return build_model(ModelConfig(hidden_size=16, num_heads=2, intermediate_size=32, num_layers=1, **fields))


@pytest.mark.parametrize(
    ("mixer", "field", "value"),
    [
        ("ttt", "rope_theta", 10.0),
        ("ttt", "ttt.inner_loss", "next_token"),
        ("ttt", "ttt.mini_batch_size", 8),
        ("ttt", "norm_eps", 1e-3),
        ("swa", "window", 4),
        ("attention", "rope_theta", 10.0),
        ("deltanet", "family.base_lr", 0.5),
        ("titans", "family.mini_batch_size", 4),
    ],
)
def test_a_changed_built_field_is_refused_at_the_next_forward_and_save(tmp_path, mixer, field, value) -> None:
    model = _model(mixer=mixer)
    section, _, name = field.rpartition(".")
    setattr(getattr(model.config, section) if section else model.config, name, value)
    with pytest.raises(ValueError, match=rf"model\.{field} was .* when this model was built and is now"):
        model(IDS)
    with pytest.raises(ValueError, match=rf"model\.{field} was"):
        save_model_checkpoint(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize(
    ("mixer", "field", "value"),
    [
        ("ttt", "init_std", 0.5),  # its weights' first draw only
        (
            "ttt",
            "ttt.kernel",
            "torch",
        ),  # a layer moves to another path by itself (run_kernels_that_work_here)
        ("ttt", "window", 4),  # swa's
        ("ttt", "family.base_lr", 0.5),  # another mixer's section
        ("ttt", "e2e.chunk_size", 8),
        ("deltanet", "rope_theta", 10.0),  # the family's members rotate nothing
        ("deltanet", "ttt.mini_batch_size", 8),
    ],
)
def test_a_field_the_model_never_reads_again_stays_free(mixer, field, value) -> None:
    model = _model(mixer=mixer)
    assert field not in built_fields_of_causal_lm(model.config)
    before = model(IDS)[0]
    section, _, name = field.rpartition(".")
    setattr(getattr(model.config, section) if section else model.config, name, value)
    torch.testing.assert_close(model(IDS)[0], before, rtol=0, atol=0)


def test_the_hugging_face_model_refuses_an_edit_of_its_model_config_and_resizes_as_before(tmp_path) -> None:
    from innerloop.hf import InnerloopForCausalLM
    from innerloop.hf.configuration import InnerloopConfig

    model = InnerloopForCausalLM(InnerloopConfig(model={"hidden_size": 16, "num_heads": 2, "num_layers": 1}))
    model.config.model = {**model.config.model, "rope_theta": 10.0}  # what config.json would then say
    with pytest.raises(ValueError, match=r"model\.rope_theta was 10000\.0 when this model was built"):
        model(IDS)
    with pytest.raises(ValueError, match=r"model\.rope_theta"):
        model.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf" / "config.json").exists()
    model.config.model = {**model.config.model, "rope_theta": 10000.0}
    model.resize_token_embeddings(300)  # rebuilds the embedding and head: vocab_size may change so
    assert model(torch.tensor([[299, 1]])).logits.shape == (1, 2, 300)


def test_an_edit_of_the_hugging_face_config_model_reaches_the_model_and_the_saved_one(tmp_path) -> None:
    """An E2E model reads its ``e2e`` options at every call: set through the Hugging Face config's
    ``model`` they were ignored by the model in memory while save_pretrained wrote them (the model read
    back computed another function); an edit of the inner model's config was not written. Either edit
    now reaches the other side; both at once are refused."""
    from innerloop.hf import InnerloopForCausalLM
    from innerloop.hf.configuration import InnerloopConfig

    model = {"mixer": "e2e", "hidden_size": 16, "num_heads": 2, "num_layers": 4, "e2e": {"chunk_size": 4}}
    torch.manual_seed(0)
    hf = InnerloopForCausalLM(InnerloopConfig(model=model)).eval()
    ids = torch.arange(12).reshape(1, 12) % 7
    before = hf(ids).logits
    hf.config.model = {**hf.config.model, "e2e": {**hf.config.model["e2e"], "inner_lr": 5.0}}
    after = hf(ids).logits
    assert hf.model.config.e2e.inner_lr == 5.0 and not torch.equal(before, after)
    hf.save_pretrained(tmp_path / "hf")
    torch.testing.assert_close(
        InnerloopForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits, after
    )
    hf.model.config.e2e.inner_lr = 2.0  # the inner model's config: config.model follows at the next call
    hf(ids)
    assert hf.config.model["e2e"]["inner_lr"] == 2.0
    hf.model.config.e2e.inner_lr = 3.0
    hf.config.model = {**hf.config.model, "e2e": {**hf.config.model["e2e"], "inner_lr": 4.0}}
    with pytest.raises(ValueError, match=r"config\.model and model\.config .* were both changed"):
        hf(ids)


def test_a_config_edited_to_build_another_model_leaves_the_first_alone() -> None:
    """A sweep edits one config between builds; the first model held the caller's object itself, so it
    then refused to run ("model.num_layers was 2 when this model was built and is now 3"), and before
    the check it recorded a config it was not. Each model keeps its own copy."""
    config = ModelConfig(hidden_size=16, num_heads=2, intermediate_size=32, num_layers=1)
    first = build_model(config)
    config.num_layers, config.rope_theta = 2, 10.0
    second = build_model(config)
    assert first.config.num_layers == 1 and second.config.num_layers == 2
    assert first(IDS)[0].shape == second(IDS)[0].shape == (1, 8, 256)
    e2e = ModelConfig(mixer="e2e", hidden_size=16, num_heads=2, intermediate_size=32, num_layers=4)
    model = build_model(e2e)
    e2e.window = 8
    model.eval()(IDS)  # its own window (eval: no training forward, no one-chunk warning)
    assert model.config.window == 64
