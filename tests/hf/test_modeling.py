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
    assert tied == MODEL_KINDS[kind].get("tie_embeddings", True)


def test_attn_implementation_sdpa_is_accepted_and_is_what_attention_runs(tmp_path) -> None:
    """The attention mixers run torch's SDPA: ``attn_implementation="sdpa"`` (transformers' default where a
    model allows it) loads, as "eager" does (it changes nothing); before, "sdpa" was refused."""
    from transformers import AutoModelForCausalLM

    model = tiny_hf_model("swa")
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(ids).logits
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    for implementation in ("sdpa", "eager"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected), implementation


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
    assert not InnerloopConfig(model={"mixer": "e2e", "tie_embeddings": False}).tie_word_embeddings


def test_from_pretrained_overrides_merge_into_the_saved_model_section(tmp_path) -> None:
    """transformers' keyword overrides (``from_pretrained(folder, model=..., vocab_size=...)``) are
    set on the loaded config with setattr: a partial ``model`` merges into the saved section (as a
    dict merges into a sub-config), a view disagreeing with it is refused, and any later assignment
    of ``model`` is validated, never stored as given."""
    from transformers import AutoConfig

    saved = {"vocab_size": 50, "hidden_size": 32, "num_heads": 2, "num_layers": 1}
    InnerloopConfig(model=saved).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, model={"ttt": {"inner_model": "mlp"}})
    assert config.model["ttt"]["inner_model"] == "mlp"
    assert {key: config.model[key] for key in saved} == saved
    assert config.model_config.ttt.mini_batch_size == ModelConfig().ttt.mini_batch_size
    with pytest.raises(ValueError, match="unknown config key 'model.d_model'"):
        AutoConfig.from_pretrained(tmp_path, model={"d_model": 64})
    with pytest.raises(
        ValueError, match=r"vocab_size=100 disagrees with model.vocab_size=50.*'vocab_size': 100"
    ):
        AutoConfig.from_pretrained(tmp_path, vocab_size=100)
    assert AutoConfig.from_pretrained(tmp_path, hidden_size=32).hidden_size == 32
    config.model = {"num_layers": 3}  # a mapping changes the keys it names (setattr, config.update)
    assert config.model["num_layers"] == 3 and config.model["hidden_size"] == 32
    config.update({"model": {"ttt": {"mini_batch_size": 4}}})
    assert config.model["ttt"] == {**config.model["ttt"], "inner_model": "mlp", "mini_batch_size": 4}
    assert config.model["vocab_size"] == 50
    config.model = ModelConfig(num_layers=5)  # a ModelConfig is the whole section
    assert config.model == ModelConfig(num_layers=5).to_dict()
    with pytest.raises(ValueError, match="unknown config key 'model.bogus'"):
        config.model = {"bogus": 1}


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


@pytest.mark.parametrize("case", ["every label -100", "only the unshifted first label", "one token"])
def test_no_label_left_to_score_is_a_zero_loss_with_zero_gradients_not_nan(case) -> None:
    # Before: the mean over nothing, NaN, whose backward filled every gradient with NaN.
    model = tiny_hf_model("ttt_linear")
    ids = torch.randint(
        0, 256, (2, 1 if case == "one token" else 6), generator=torch.Generator().manual_seed(0)
    )
    labels = torch.full_like(ids, -100)
    if case != "every label -100":
        labels[:, 0] = ids[:, 0]  # position 0 is never a target: the labels are shifted inside
    output = model(ids, labels=labels)
    assert output.loss.item() == 0.0
    output.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


def test_right_padding_is_accepted_without_a_cache_and_left_padding_reads_each_row_alone() -> None:
    model = tiny_hf_model("ttt_linear")
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    right = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    with torch.no_grad():
        padded = model(ids, attention_mask=right)
        alone = model(ids[1:, :5]).logits
    assert (
        padded.logits[1, :5] - alone[0]
    ).abs().max().item() <= 1e-5  # the padding after them is never seen
    assert padded.cache is None  # the state has read the pads: no cache to continue
    left = torch.tensor([[1] * 8, [0] * 3 + [1] * 5])  # each row read alone (tests/test_review_s47_s47d.py)
    with torch.no_grad():
        left_logits = model(ids, attention_mask=left, use_cache=False).logits
        alone = model(ids[1:, 3:]).logits
    assert (left_logits[1, 3:] - alone[0]).abs().max().item() <= 1e-5


def test_padding_where_a_cache_is_returned_or_continued_is_refused_naming_it() -> None:
    model = tiny_hf_model("swa")
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    right = torch.tensor([[1] * 4 + [0] * 2, [1] * 6])
    supported = r"supported: no attention_mask or a mask of ones"
    with pytest.raises(
        ValueError, match=r"right padding \(row 0.*cache asked for \(use_cache=True\).*" + supported
    ):
        model(ids, attention_mask=right, use_cache=True)
    cache = model(ids).cache
    with pytest.raises(ValueError, match=r"right padding \(row 0.*with a cache passed in"):
        model(ids, attention_mask=torch.cat((torch.ones_like(ids), right), dim=1), cache=cache)
    hole = torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6])
    with pytest.raises(ValueError, match=r"a hole \(row 0: \[1, 1, 0, 1, 1, 1\]: zeros between its tokens\)"):
        model(ids, attention_mask=hole, use_cache=False)
    with pytest.raises(ValueError, match=r"an empty row \(row 1.*cache asked for"):
        model(ids, attention_mask=torch.tensor([[1] * 6, [0] * 6]), use_cache=True)
    assert model(ids, attention_mask=torch.ones_like(ids)).cache.seq_length == 6  # ones: as no mask


def test_a_row_of_padding_alone_in_a_scored_batch_is_right_padding() -> None:
    """An empty text in a padded batch (DataCollatorForLanguageModeling pads it into a row of pads alone,
    as wikitext's blank lines give in transformers' Trainer) is right padding of no token: scored (GPT-2
    scores it), where it was refused as an empty row (review s45b); refused where right padding is."""
    shape = {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 16, "mixer": "swa"}
    model = InnerloopForCausalLM(InnerloopConfig(model=shape)).eval()  # one block: the fast loop's cost
    ids = torch.tensor([[104, 105, 33, 10, 98], [256] * 5])  # the second: an empty text, padded with eos
    mask = torch.tensor([[1] * 5, [0] * 5])
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, labels=labels)
        alone = model(ids[:1], labels=labels[:1])
    assert batch.cache is None  # the state has read the pads
    assert (batch.logits[0] - alone.logits[0]).abs().max() <= 1e-6
    assert abs(batch.loss.item() - alone.loss.item()) <= 1e-6  # the empty row scores nothing
    with pytest.raises(ValueError, match=r"an empty row \(row 1.*cache asked for \(use_cache=True\)"):
        model(ids, attention_mask=mask, use_cache=True)
    with pytest.raises(ValueError, match=r"generate\(\) got an attention_mask with an empty row"):
        model.generate(ids, attention_mask=mask, max_new_tokens=1, pad_token_id=0)
    with pytest.raises(ValueError, match=r"left padding \(row 0\) and an empty row \(row 1"):
        model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [0] * 5]))


def test_bad_inputs_are_named() -> None:
    model = tiny_hf_model("swa")
    with pytest.raises(
        ValueError, match=r"inputs_embeds must be a floating tensor \[batch, length >= 1, hidden"
    ):
        model(inputs_embeds=torch.zeros(1, 2, 31))  # taken at hidden_size 32 (tests/test_review_s47_s47d.py)
    with pytest.raises(ValueError, match="cache must be the InnerloopCache"):
        model(torch.tensor([[1]]), cache=object())
    with pytest.raises(
        ValueError, match=r"token id 256, outside the model's vocabulary of 256 tokens \(0..255\)"
    ):
        model(torch.tensor([[1, 256]]))  # the byte tokenizer's <|endoftext|>
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))


def test_a_float64_models_loss_is_float64_and_low_precision_is_upcast() -> None:
    model = tiny_hf_model("ttt_linear").double()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, 4] = -100
    with torch.no_grad():
        output = model(ids, labels=labels)
    expected = F.cross_entropy(
        output.logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert output.loss.dtype == torch.float64
    assert (output.loss - expected).abs().item() <= 1e-12
    with torch.no_grad():
        low = model.to(torch.bfloat16)(ids, labels=labels).loss
    assert low.dtype == torch.float32


def test_labels_of_a_wrong_dtype_shape_or_id_are_named() -> None:
    model = tiny_hf_model("swa")
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids, labels=ids.int()).loss, model(ids, labels=ids).loss)  # int32 as int64
    expected = r"labels must be integer token ids shaped like the \[batch, length\] of input_ids \[2, 8\]"
    with pytest.raises(ValueError, match=expected + r".*got shape \[2, 7\] of torch.int64"):
        model(ids, labels=ids[:, :-1])
    with pytest.raises(ValueError, match=expected + r".*got shape \[2, 8\] of torch.float32"):
        model(ids, labels=ids.float())
    with pytest.raises(ValueError, match=r"labels holds token id 300, outside the model's vocabulary of 256"):
        model(ids, labels=torch.full_like(ids, 300))


@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings_keeps_everything_in_step(tied: bool, tmp_path) -> None:
    config = InnerloopConfig(
        model={"hidden_size": 16, "num_heads": 2, "num_layers": 1, "mixer": "swa", "tie_embeddings": tied}
    )
    torch.manual_seed(0)
    model = InnerloopForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    embed = model.resize_token_embeddings(300)
    assert embed is model.get_input_embeddings() and embed.weight.shape == (300, 16)
    assert model.get_output_embeddings().weight.shape == (300, 16)
    assert (model.model.lm_head.weight is model.model.embed.weight) == tied
    assert model.config.vocab_size == model.config.model["vocab_size"] == model.model.config.vocab_size == 300
    with torch.no_grad():
        after = model(torch.cat((ids, torch.tensor([[299]])), dim=1)).logits
    assert after.shape == (1, 7, 300)
    assert torch.equal(after[:, :6, :256], before)  # the old tokens' logits are unchanged
    model.save_pretrained(tmp_path)
    loaded = InnerloopForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(torch.tensor([[299, 3]])).logits, model(torch.tensor([[299, 3]])).logits)
    assert model.resize_token_embeddings(250, pad_to_multiple_of=64).weight.shape == (256, 16)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # back to 256: the same model


def test_resize_token_embeddings_refusals_change_nothing() -> None:
    model = tiny_hf_model("e2e")
    weight = model.model.embed.weight
    with pytest.raises(ValueError, match=r"not supported for the TTT-E2E model.*stays model.vocab_size=256"):
        model.resize_token_embeddings(300)
    swa = tiny_hf_model("swa")
    with pytest.raises(ValueError, match=r"new_num_tokens must be an integer >= 1 or None, got 0"):
        swa.resize_token_embeddings(0)
    with pytest.raises(ValueError, match=r"set_input_embeddings: the new module's weight is \[300, 32\]"):
        swa.set_input_embeddings(torch.nn.Embedding(300, 32))
    assert model.model.embed.weight is weight and model.config.vocab_size == swa.config.vocab_size == 256
    assert swa.model.embed.weight.shape == (256, 32)


def test_a_config_json_whose_shapes_do_not_fit_the_weights_is_named(tmp_path) -> None:
    tiny_hf_model("ttt_linear").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    original = json.loads(path.read_text())
    model = {**original["model"], "ttt": {**original["model"]["ttt"], "mini_batch_size": 8}}
    path.write_text(json.dumps({**original, "model": model}))
    with pytest.raises(
        ValueError,
        match=r"mismatched_keys: model.blocks.0.mixer.learnable_token_idx \[4\] in the folder, \[8\]",
    ):
        InnerloopForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("section", ["missing", "null"])
def test_a_config_json_without_its_model_section_is_named(section: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    tiny_hf_model("swa").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    if section == "missing":
        del config["model"]
    else:
        config["model"] = None
    path.write_text(json.dumps(config))
    for load in (InnerloopForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=r"config.json has no 'model' section"):
            load(tmp_path)


def test_a_folder_of_another_model_type_is_named(tmp_path) -> None:
    # Only the config: transformers would build a default Llama (7B) for a real one.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match=r"config.json has model_type='llama', not 'innerloop'"):
        InnerloopForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type='llama'"):
        InnerloopConfig.from_pretrained(tmp_path)
