"""An export computes what the innerloop model computes in every dtype, stops where innerloop's
generate stops, and takes a compiled model; absurd tokenizer sizes are refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_testing import MODEL_KINDS

import innerloop  # noqa: F401 (registers the Auto classes)
from innerloop.data.tokenizer import MAX_TRAINED_VOCAB, TokenizerError, train_bpe
from innerloop.hf.export import export_model
from innerloop.models import ModelConfig, build_model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["ttt_linear", "ttt_mlp_mamba_untied"])
def test_a_low_precision_ttt_model_exports_with_its_own_numbers(kind, dtype, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(MODEL_KINDS[kind])).to(dtype).eval()
    loaded = AutoModelForCausalLM.from_pretrained(export_model(model, tmp_path / "exported"))
    # the tables as the model holds them: in float32, the scan's dtype, in a bfloat16 or float16 model
    assert (
        loaded.model.blocks[0].mixer.token_idx.dtype == model.blocks[0].mixer.token_idx.dtype == torch.float32
    )
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids)[0])


def test_an_export_with_a_bpe_tokenizer_stops_generating_at_its_end_of_text(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = train_bpe(["some words to learn a few merges from, again and again"] * 30, 300)
    config = {**MODEL_KINDS["ttt_linear"], "vocab_size": tokenizer.vocab_size}
    torch.manual_seed(0)
    out = export_model(build_model(ModelConfig.from_dict(config)), tmp_path / "exported", tokenizer=tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.eos_token_id == loaded.generation_config.eos_token_id == tokenizer.eos_id


@pytest.mark.slow  # reason: ~0.7 s: wraps a model in torch.compile, exports and reloads it
def test_a_compiled_model_exports_as_the_model_it_wraps(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(MODEL_KINDS["ttt_linear"])).eval()
    loaded = AutoModelForCausalLM.from_pretrained(export_model(torch.compile(model), tmp_path / "exported"))
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids)[0]).abs().max().item() <= 1e-5


def test_a_tokenizer_vocabulary_past_what_the_trainer_can_hold_is_refused() -> None:
    with pytest.raises(TokenizerError, match=rf"vocab_size=5000000000 must be <= {MAX_TRAINED_VOCAB}"):
        train_bpe(["text"], 5_000_000_000)


def _edited(folder: Path, edit) -> Path:
    config = json.loads((folder / "config.json").read_text())
    edit(config["model"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_export_runs_on_the_best_path_wherever_it_is_loaded(tmp_path: Path) -> None:
    config = {
        **MODEL_KINDS["ttt_linear"],
        "ttt": {**MODEL_KINDS["ttt_linear"].get("ttt", {}), "kernel": "torch"},
    }
    out = export_model(build_model(ModelConfig.from_dict(config)), tmp_path / "exported")
    assert json.loads((out / "config.json").read_text())["model"]["ttt"]["kernel"] == "auto"


def test_a_key_missing_from_config_json_is_named_in_a_warning(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = export_model(build_model(ModelConfig.from_dict(MODEL_KINDS["swa"])), tmp_path / "exported")
    _edited(out, lambda model: model.pop("window"))
    with pytest.warns(
        UserWarning, match=r"config.json's 'model' section lacks model\.window: loaded with today's"
    ):
        AutoModelForCausalLM.from_pretrained(out)


def test_an_export_written_before_the_inner_wrapping_was_an_option_loads_quietly(tmp_path: Path) -> None:
    """model.ttt.inner_norm / inner_residual were added with the paper's wrapping as their default:
    an older config.json without them describes that model, so they are filled without a warning."""
    import warnings

    from transformers import AutoModelForCausalLM

    model = build_model(ModelConfig.from_dict(MODEL_KINDS["ttt_linear"])).eval()
    out = _edited(
        export_model(model, tmp_path / "exported"),
        lambda m: [m["ttt"].pop(k) for k in ("inner_norm", "inner_residual")],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = AutoModelForCausalLM.from_pretrained(out)
    assert (loaded.config.model["ttt"]["inner_norm"], loaded.config.model["ttt"]["inner_residual"]) == (
        True,
        True,
    )


def test_an_older_exports_family_key_its_member_never_read_loads_with_a_warning(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = build_model(ModelConfig.from_dict({**MODEL_KINDS["ttt_linear"], "mixer": "deltanet"})).eval()
    out = _edited(export_model(model, tmp_path / "exported"), lambda m: m["family"].update(mini_batch_size=4))
    with pytest.warns(
        UserWarning, match=r"records model\.family\.mini_batch_size=4, which mixer 'deltanet' does not read"
    ):
        loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids)[0]).abs().max().item() <= 1e-5


def test_a_tokenizer_whose_ids_pass_the_vocabulary_is_refused_though_it_has_few_entries(
    tmp_path: Path,
) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    sparse = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1, "b": 5000}, unk_token="[UNK]"))
    sparse.pre_tokenizer = pre_tokenizers.Whitespace()
    sparse.save(str(tmp_path / "tokenizer.json"))
    model = build_model(ModelConfig.from_dict(MODEL_KINDS["ttt_linear"]))
    with pytest.raises(
        ValueError, match=r"the tokenizer has ids up to 5000 .* the model's vocabulary has 256"
    ):
        export_model(model, tmp_path / "exported", tokenizer=str(tmp_path / "tokenizer.json"))


@pytest.mark.parametrize(
    ("key", "value"), [("eos_token_id", "x"), ("eos_token_id", 999), ("pad_token_id", 300)]
)
def test_a_special_token_id_that_is_no_token_of_the_model_is_refused_at_load(
    tmp_path: Path, key, value
) -> None:
    from transformers import AutoModelForCausalLM

    out = export_model(build_model(ModelConfig.from_dict(MODEL_KINDS["swa"])), tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    config[key] = value
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{key}={value!r} must be a token id in \[0, 256\)"):
        AutoModelForCausalLM.from_pretrained(out)
