"""InnerloopConfig and InnerloopForCausalLM: innerloop's logits, the save/load round trip, config
checks on load, the loss, the attention mask."""

from __future__ import annotations

import json

import pytest
import torch
from hf_testing import MODEL_KINDS, tiny_hf_model
from torch.nn import functional as F

import innerloop  # noqa: F401 (registers the Auto classes)
from innerloop.hf import InnerloopConfig, InnerloopForCausalLM
from innerloop.models import ModelConfig, build_model


def test_logits_are_innerloops_own_and_survive_a_round_trip(kind, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_hf_model(kind)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(1))
    own = build_model(ModelConfig.from_dict(MODEL_KINDS[kind])).eval()
    own.load_state_dict(model.model.state_dict())
    with torch.no_grad():
        expected, _ = own(ids)
        logits = model(ids).logits
    assert (logits - expected).abs().max().item() <= 1e-5
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is InnerloopForCausalLM and loaded.config.model == model.config.model
    with torch.no_grad():
        reloaded = loaded(ids).logits
    assert (reloaded - expected).abs().max().item() <= 1e-5
    tied = loaded.model.lm_head.weight is loaded.model.embed.weight
    assert tied == (MODEL_KINDS[kind].get("tie_embeddings", True) or kind == "e2e")


def test_non_persistent_buffers_are_rebuilt_on_load(tmp_path) -> None:
    """transformers leaves non-persistent buffers (the TTT layer's RoPE table) empty after a meta-device
    build: from_pretrained fills them from a fresh network."""
    model = tiny_hf_model("ttt_linear")
    model.save_pretrained(tmp_path)
    loaded = InnerloopForCausalLM.from_pretrained(tmp_path)
    expected = dict(model.named_buffers())
    for name, buffer in loaded.named_buffers():
        assert torch.equal(buffer, expected[name]), name


def test_config_json_is_checked_on_load(tmp_path) -> None:
    from transformers import AutoConfig

    tiny_hf_model("ttt_linear").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    original = json.loads(path.read_text())
    cases = {
        "model.hidden_size=33 must be divisible by model.num_heads=2": {"hidden_size": 33},
        "unknown config key 'model.hidden'": {"hidden": 32},
        "model.ttt.inner_model='lstm' is not a registered inner_model": {"ttt": {"inner_model": "lstm"}},
        "model.tie_embeddings='false' (str) must be true or false": {"tie_embeddings": "false"},
    }
    for message, change in cases.items():
        model = json.loads(json.dumps(original["model"]))
        for key, value in change.items():
            model[key] = {**model[key], **value} if isinstance(value, dict) else value
        path.write_text(json.dumps({**original, "model": model}))
        with pytest.raises(
            ValueError,
            match=r"config.json 'model' section\): " + message.replace("(", r"\(").replace(")", r"\)"),
        ):
            AutoConfig.from_pretrained(tmp_path)
    path.write_text(json.dumps({**original, "model": 5}))
    with pytest.raises(
        ValueError, match="InnerloopConfig.model must be innerloop's model config as a mapping"
    ):
        AutoConfig.from_pretrained(tmp_path)


def test_derived_attributes_follow_the_model_section() -> None:
    config = InnerloopConfig(model={"vocab_size": 300, "hidden_size": 32, "num_heads": 2, "num_layers": 3})
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        300,
        32,
        3,
        2,
    )
    with pytest.raises(ValueError, match="vocab_size=512 disagrees with model.vocab_size=256"):
        InnerloopConfig(model={}, vocab_size=512)
    with pytest.raises(ValueError, match="tie_word_embeddings=False disagrees"):
        InnerloopConfig(model={}, tie_word_embeddings=False)
    assert InnerloopConfig(model={"mixer": "e2e", "tie_embeddings": False}).tie_word_embeddings


def test_a_folder_missing_weights_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    tiny_hf_model("swa").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = "model.blocks.1.mixer.o_proj.weight"
    assert dropped in weights
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"does not hold the weights .*missing_keys.*{dropped}"):
        InnerloopForCausalLM.from_pretrained(tmp_path)


def test_the_loss_is_the_next_token_cross_entropy() -> None:
    model = tiny_hf_model("ttt_linear")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, 4] = -100
    output = model(ids, labels=labels)
    logits = output.logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(output.loss, expected)
    output.loss.backward()  # trainable through transformers' API
    assert model.model.embed.weight.grad is not None


def test_right_padding_is_accepted_and_left_padding_refused() -> None:
    model = tiny_hf_model("ttt_linear")
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    right = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    with torch.no_grad():
        padded = model(ids, attention_mask=right).logits
        alone = model(ids[1:, :5]).logits
    assert (padded[1, :5] - alone[0]).abs().max().item() <= 1e-5  # the padding after them is never seen
    left = torch.tensor([[1] * 8, [0] * 3 + [1] * 5])
    with pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=left)


def test_bad_inputs_are_named() -> None:
    model = tiny_hf_model("swa")
    with pytest.raises(ValueError, match="inputs_embeds is not supported"):
        model(inputs_embeds=torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match="cache must be the InnerloopCache"):
        model(torch.tensor([[1]]), cache=object())
    with pytest.raises(
        ValueError, match=r"token id 256, outside the model's vocabulary of 256 tokens \(0..255\)"
    ):
        model(torch.tensor([[1, 256]]))  # the byte tokenizer's <|endoftext|>
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
