"""Review s17 (hostile inputs), the Hugging Face side: ``logits_to_keep`` out of range (H1), input_ids
of the wrong kind (M1), an exported folder changed after the export or holding integer weights (L2), a
stored config missing a key that sizes the weights (L3), and attention-mask values other than 0 and 1
(L6). Each wrong input gets one error naming it; nothing silently gives other numbers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy
import pytest
import torch
from safetensors.torch import load_file, save_file

from innerloop.checkpoints import CheckpointError, load_model, save_checkpoint
from innerloop.hf import InnerloopConfig, InnerloopForCausalLM
from innerloop.hf.export import MANIFEST, export_model
from innerloop.hf.modeling import EXPORT_RECORD
from innerloop.models import ModelConfig, build_model

SMALL = {"hidden_size": 32, "num_heads": 2, "num_layers": 1, "intermediate_size": 64}


@pytest.fixture(scope="module")
def model() -> InnerloopForCausalLM:
    torch.manual_seed(0)
    return InnerloopForCausalLM(InnerloopConfig(model=SMALL)).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


# -- H1: logits_to_keep is checked against input_ids [B, T] --------------------------------------------


@pytest.mark.parametrize(
    ("logits_to_keep", "said"),
    [
        (torch.tensor([[0], [50]]), "position 50, outside the 9 positions"),  # once wrapped to row 1
        (torch.tensor([[0], [9]]), "position 9, outside the 9 positions"),
        (torch.tensor([-20]), "position -20"),
        (torch.tensor([-10]), "position -10"),  # a 1-D tensor indexes: -9 .. 8
        (torch.tensor([[-1], [0]]), "position -1"),  # a 2-D one holds positions: 0 .. 8
        (torch.tensor([3, 12]), "position 12"),
        (
            torch.tensor([[1], [2], [3]]),
            r"an integer tensor of shape \[3, 1\], whose first dimension is not the batch, 2",
        ),
        (torch.ones(2, 3, dtype=torch.bool), r"a bool mask of shape \[2, 3\]"),
        (torch.ones(4, dtype=torch.bool), r"a bool mask of shape \[4\]"),
        (torch.tensor([1.0]), r"a tensor of shape \[1\] and torch.float32"),
        (torch.zeros(2, 1, 1, dtype=torch.long), r"a tensor of shape \[2, 1, 1\] and torch.int64"),
        (-1, r"-1 \(int\)"),
        ([3], r"\[3\] \(list\)"),
    ],
)
def test_a_logits_to_keep_outside_the_ids_is_refused(model, ids, logits_to_keep, said):
    with pytest.raises(
        ValueError,
        match=rf"logits_to_keep must be an int >= 0 .*-9\.\.8.*0\.\.8.*\(input_ids \[2, 9\]\), got {said}",
    ):
        model(ids, logits_to_keep=logits_to_keep)


def test_logits_to_keep_inside_the_ids_keeps_those_logits(model, ids):
    with torch.no_grad():
        full = model(ids).logits  # [2, 9, V]
        rows = model(ids, logits_to_keep=torch.tensor([[0, 8], [5, 3]])).logits
        every_row = model(ids, logits_to_keep=torch.tensor([8, 2])).logits
        from_the_end = model(
            ids, logits_to_keep=torch.tensor([-1, -9])
        ).logits  # 1-D indexes, as transformers
        mask = torch.zeros(2, 9, dtype=torch.bool)
        mask[0, 1], mask[1, 7] = True, True
        masked = model(ids, logits_to_keep=mask).logits
        last_of_all = model(ids, logits_to_keep=20).logits  # k past the length keeps all, as in transformers
    torch.testing.assert_close(rows, torch.stack([full[0, [0, 8]], full[1, [5, 3]]]), rtol=0, atol=0)
    torch.testing.assert_close(every_row, full[:, [8, 2]], rtol=0, atol=0)
    torch.testing.assert_close(from_the_end, full[:, [8, 0]], rtol=0, atol=0)
    torch.testing.assert_close(masked, full[mask], rtol=0, atol=0)
    torch.testing.assert_close(last_of_all, full, rtol=0, atol=0)


def test_logits_to_keep_counts_the_new_tokens_after_a_cache(model, ids):
    cache = model(ids[:, :5]).cache
    with torch.no_grad():
        kept = model(ids[:, 5:], cache=cache, logits_to_keep=torch.tensor([3])).logits
    assert kept.shape == (2, 1, 256)
    with pytest.raises(ValueError, match=r"got position 4, outside the 4 positions"):
        model(ids[:, 5:], cache=cache, logits_to_keep=torch.tensor([4]))


# -- M1: input_ids of the wrong kind are named first ---------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "said"),
    [
        (lambda ids: ids[0], ValueError, r"input_ids must be \[batch, length >= 1\], got shape \(9,\)"),
        (
            lambda ids: ids[None],
            ValueError,
            r"input_ids must be \[batch, length >= 1\], got shape \(1, 2, 9\)",
        ),
        (lambda ids: ids.tolist(), TypeError, "input_ids must be a torch.Tensor of token ids .* got list"),
        (lambda ids: ids.numpy(), TypeError, "input_ids must be a torch.Tensor of token ids .* got ndarray"),
        (lambda ids: ids.float(), TypeError, "input_ids must hold integer token ids"),
    ],
)
def test_input_ids_of_the_wrong_kind_are_named(model, ids, make, error, said):
    with pytest.raises(error, match=said):
        model(make(ids))
    with pytest.raises(error, match=said):  # before the mask's shape is compared with them
        model(make(ids), attention_mask=torch.ones(9, dtype=torch.long))
    with pytest.raises(error, match=said):
        model.generate(make(ids), max_new_tokens=2, do_sample=False)


# -- L6: attention_mask holds 0 and 1 only ---------------------------------------------------------------


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, float("nan")])
def test_an_attention_mask_value_other_than_0_or_1_is_refused(model, ids, value):
    mask = torch.ones(2, 9)
    mask[1, 4] = value
    shown = "nan" if value != value else repr(value)
    with pytest.raises(ValueError, match=rf"attention_mask holds the value {shown} \(torch.float32\)"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match=rf"generate\(\): attention_mask holds the value {shown}"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


def test_an_integer_mask_of_2_is_refused(model, ids):
    with pytest.raises(ValueError, match=r"attention_mask holds the value 2 \(torch.int64\)"):
        model(ids, attention_mask=torch.full((2, 9), 2))


def test_masks_of_0_and_1_in_any_dtype_are_accepted(model, ids):
    right = torch.ones(2, 9, dtype=torch.bool)
    right[1, 7:] = False  # right padding: accepted for scoring
    with torch.no_grad():
        expected = model(ids, attention_mask=right).logits
        for dtype in (torch.int64, torch.int32, torch.float32):
            torch.testing.assert_close(model(ids, attention_mask=right.to(dtype)).logits, expected)


@pytest.mark.parametrize("name", ["use_cache", "return_dict"])
def test_a_flag_that_is_not_a_bool_is_refused(model, ids, name):
    with pytest.raises(ValueError, match=rf"{name} must be True, False or None, got 'yes' \(str\)"):
        model(ids, **{name: "yes"})
    with pytest.raises(ValueError, match=rf"{name} must be True, False or None, got 2 \(int\)"):
        model(ids, **{name: 2})


@pytest.mark.parametrize(
    "flag", [numpy.bool_(True), 1, numpy.int64(0)], ids=["numpy_bool", "one", "numpy_zero"]
)
def test_a_flag_that_is_plainly_true_or_false_is_taken(model, ids, flag):
    with torch.no_grad():
        output = model(ids, use_cache=flag, return_dict=True)
    assert (output.cache is not None) == bool(flag)


def test_token_type_ids_that_are_not_a_tensor_are_refused(model, ids):
    with pytest.raises(ValueError, match="token_type_ids must be a tensor of segment ids .* got list"):
        model(ids, token_type_ids=[[0, 1]])


# -- L2: an exported folder changed since, integer weights, a damaged weights file -----------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    network = build_model(ModelConfig(**SMALL)).eval()
    return Path(export_model(network, tmp_path_factory.mktemp("export") / "out"))


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for file in folder.iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


def _flip_a_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # in the last tensor's data: still a valid safetensors file
    path.write_bytes(bytes(data))


def test_the_record_is_the_exports(exported):
    assert EXPORT_RECORD == MANIFEST
    InnerloopForCausalLM.from_pretrained(exported)  # an untouched export loads


def test_a_weights_file_changed_after_the_export_is_refused(exported, tmp_path):
    folder = _copy(exported, tmp_path / "flipped")
    _flip_a_data_byte(folder / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"model\.safetensors' was changed after `innerloop export` wrote it"
    ):
        InnerloopForCausalLM.from_pretrained(folder)


def test_files_other_than_the_weights_may_be_edited(exported, tmp_path):
    folder = _copy(exported, tmp_path / "edited")
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": 7}))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "use_cache": False}))
    assert InnerloopForCausalLM.from_pretrained(folder).config.use_cache is False


def test_a_folder_without_the_record_loads_as_before(exported, tmp_path):
    folder = _copy(exported, tmp_path / "no_record")
    (folder / EXPORT_RECORD).unlink()
    _flip_a_data_byte(folder / "model.safetensors")  # nothing to compare it with
    InnerloopForCausalLM.from_pretrained(folder)


def test_weights_saved_over_an_export_load(exported, tmp_path):
    folder = _copy(exported, tmp_path / "fine_tuned")
    model = InnerloopForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)  # "fine-tuned"
    model.save_pretrained(folder)
    listed = json.loads((folder / EXPORT_RECORD).read_text())["files"]
    assert "model.safetensors" not in listed  # no longer the export's: --overwrite keeps it, as before
    assert "tokenizer.json" in listed
    again = InnerloopForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(again.model.norm.weight, model.model.norm.weight, rtol=0, atol=0)


def test_an_integer_weight_is_refused(exported, tmp_path):
    folder = _copy(exported, tmp_path / "int_weight")
    (folder / EXPORT_RECORD).unlink()  # refused for what it holds, not because it changed
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.int32)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' is stored as I32, not a floating dtype"):
        InnerloopForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("keep", [-2000, 8, 0])
def test_a_truncated_weights_file_is_named(exported, tmp_path, keep):
    folder = _copy(exported, tmp_path / "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:keep])
    with pytest.raises(
        ValueError, match=r"model\.safetensors' is not a readable safetensors file .*truncated"
    ):
        InnerloopForCausalLM.from_pretrained(folder)


# -- L3: a stored config missing a key that sizes the weights --------------------------------------------


def test_a_config_json_missing_the_width_names_it(exported, tmp_path):
    folder = _copy(exported, tmp_path / "no_width")
    config = json.loads((folder / "config.json").read_text())
    del config["model"]["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loading warning names it too
        with pytest.raises(ValueError, match=r"lacks model\.hidden_size \(given the default 64\)"):
            InnerloopForCausalLM.from_pretrained(folder)


def test_a_config_json_missing_a_key_with_a_safe_default_loads(exported, tmp_path):
    folder = _copy(exported, tmp_path / "older")
    (folder / EXPORT_RECORD).unlink()  # as a folder saved by an older version
    config = json.loads((folder / "config.json").read_text())
    del config["model"]["init_std"]  # e.g. a key added after the folder was written
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"lacks model\.init_std"):
        InnerloopForCausalLM.from_pretrained(folder)


def _checkpoint(tmp_path: Path, drop: str) -> Path:
    torch.manual_seed(0)
    network = build_model(ModelConfig(**SMALL))
    hparams = ModelConfig(**SMALL).to_dict()
    del hparams[drop]
    state = {f"model.{key}": value for key, value in network.state_dict().items()}
    return save_checkpoint(
        {"hyper_parameters": {"model": hparams}, "state_dict": state}, tmp_path / "c.safetensors"
    )


def test_checkpoint_hparams_missing_the_width_name_it(tmp_path):
    path = _checkpoint(tmp_path, "hidden_size")
    with pytest.raises(
        CheckpointError, match=r"does not fit .*lacks model\.hidden_size \(given the default 64\)"
    ):
        load_model(path)


def test_checkpoint_hparams_missing_a_key_with_a_safe_default_load(tmp_path):
    assert isinstance(load_model(_checkpoint(tmp_path, "init_std")), torch.nn.Module)
