"""Checkpoint integrity: every damaged, hostile or mismatched file is one CheckpointError line that names
the file and the problem (never a NaN later, a RecursionError or a raw state-dict error)."""

from __future__ import annotations

import json
import re
import struct
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import innerloop
from innerloop.config import load_config
from innerloop.train import LanguageModelModule, train
from innerloop.train.checkpoint import (
    CheckpointError,
    UnverifiedCheckpointWarning,
    checkpoint_digest,
    load_checkpoint,
    load_training_checkpoint,
    save_checkpoint,
)
from innerloop.train.module import load_model, load_module

SMALL = {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 32}


def _module_checkpoint(path: Path, **model) -> Path:
    """A checkpoint of a small LanguageModelModule (hyperparameters and weights), as training writes."""
    module = LanguageModelModule(model={**SMALL, **model})
    tree = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "global_step": 7,
        "pytorch-lightning_version": L.__version__,
        "loops": {},
        "optimizer_states": [],
    }
    return save_checkpoint(tree, path)


def _read_raw(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor], sign: bool) -> None:
    """Write a hand-made checkpoint; ``sign``: with a checksum that matches (a hostile file, not a
    damaged one), else with the metadata's checksum left as it is."""
    if sign:
        metadata = {**metadata, "innerloop.sha256": checkpoint_digest(metadata["innerloop.tree"], tensors)}
    save_file(tensors, str(path), metadata=metadata)


def _error(path: Path, load=load_checkpoint) -> str:
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and repr(str(path)) in message
    return message


def test_a_flipped_tensor_byte_is_reported_as_corruption(tmp_path) -> None:
    path = _module_checkpoint(tmp_path / "last.safetensors")
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    assert len(data) > 8 + header_len + 100  # the flipped byte is in the tensor data, not the header
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "is corrupt: its checksum" in _error(path)
    assert "is corrupt: its checksum" in _error(path, load_model)


def test_an_edited_value_in_the_metadata_tree_is_reported_as_corruption(tmp_path) -> None:
    path = _module_checkpoint(tmp_path / "last.safetensors")
    metadata, tensors = _read_raw(path)
    tree = json.loads(metadata["innerloop.tree"])
    tree["global_step"] = 8
    _rewrite(path, {**metadata, "innerloop.tree": json.dumps(tree)}, tensors, sign=False)
    assert "is corrupt: its checksum" in _error(path)


@pytest.mark.parametrize("depth", [100_000, 100])
def test_a_deeply_nested_tree_is_refused_without_recursion_error(tmp_path, depth) -> None:
    path = tmp_path / "deep.safetensors"
    tree = '{"a": ' + "[" * depth + "]" * depth + "}"
    meta = {"format": "innerloop-checkpoint", "format_version": "2", "innerloop.tree": tree}
    _rewrite(path, meta, {"t0": torch.zeros(1)}, sign=True)
    assert "malformed metadata tree" in _error(path)


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ('{"w": {"__tensor__": "t9"}}', "refers to a tensor 't9' that the file does not hold"),
        ('{"w": {"__tensor__": []}}', "refers to a tensor []"),
        ('{"w": {"__dict__": 5}}', "malformed dict"),
        ('{"w": {"__dict__": [[[1], 2]]}}', "dict key of type list"),
        ('{"w": {"__tuple__": {}}}', "malformed tuple"),
        ("[1, 2]", "is a list, not a dict"),
        ("{not json", "malformed metadata tree"),
    ],
)
def test_a_malformed_tree_is_one_clear_error(tmp_path, tree, message) -> None:
    path = tmp_path / "bad.safetensors"
    meta = {"format": "innerloop-checkpoint", "format_version": "2", "innerloop.tree": tree}
    _rewrite(path, meta, {"t0": torch.zeros(1)}, sign=True)
    assert message in _error(path)


def test_a_truncated_file_and_a_file_of_another_kind_are_named(tmp_path) -> None:
    path = _module_checkpoint(tmp_path / "last.safetensors")
    path.write_bytes(path.read_bytes()[:-10])
    assert "is not a readable innerloop checkpoint" in _error(path)
    text = tmp_path / "notes.safetensors"
    text.write_text("just some text, not a checkpoint\n" * 10)
    assert "is not a readable innerloop checkpoint" in _error(text)


def test_a_directory_is_named_with_the_file_to_give(tmp_path) -> None:
    assert f"is a directory; give the checkpoint file in it (e.g. '{tmp_path}/last.safetensors')" in _error(
        tmp_path
    )


def test_a_newer_format_version_asks_for_an_upgrade(tmp_path) -> None:
    path = _module_checkpoint(tmp_path / "last.safetensors")
    metadata, tensors = _read_raw(path)
    _rewrite(path, {**metadata, "format_version": "3"}, tensors, sign=True)
    message = _error(path)
    assert "format version '3'" in message and "newer innerloop: upgrade innerloop" in message


def test_a_version_2_checkpoint_without_its_checksum_is_refused(tmp_path) -> None:
    path = _module_checkpoint(tmp_path / "last.safetensors")
    metadata, tensors = _read_raw(path)
    del metadata["innerloop.sha256"]
    _rewrite(path, metadata, tensors, sign=False)
    assert "no checksum (innerloop.sha256)" in _error(path)


def test_an_old_version_1_checkpoint_loads_with_a_warning(tmp_path) -> None:
    """Version 1 (before checksums) is accepted, unverified, with a warning: old runs stay usable."""
    path = _module_checkpoint(tmp_path / "last.safetensors")
    metadata, tensors = _read_raw(path)
    del metadata["innerloop.sha256"]
    _rewrite(path, {**metadata, "format_version": "1"}, tensors, sign=False)
    with pytest.warns(UnverifiedCheckpointWarning, match="no checksum"):
        model = load_model(path)
    assert model.config.hidden_size == 16
    with warnings.catch_warnings(record=True) as again:  # once per file (an eval reads it three times)
        warnings.simplefilter("always")
        load_model(path)
        load_checkpoint(path)
    assert not [w for w in again if issubclass(w.category, UnverifiedCheckpointWarning)]


def test_a_saved_checkpoint_verifies_without_a_warning(tmp_path) -> None:
    path = _module_checkpoint(tmp_path / "last.safetensors")
    assert _read_raw(path)[0]["format_version"] == "2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(path)["global_step"] == 7


def _edit_weights(path: Path, edit) -> None:
    """Apply ``edit(state_dict)`` to the checkpoint and save it again (validly signed)."""
    tree = load_checkpoint(path)
    edit(tree["state_dict"])
    save_checkpoint(tree, path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("model.lm_head.weight"), r"1 missing weight\(s\) \['model.lm_head.weight'\]"),
        (lambda sd: sd.update(extra=torch.zeros(1)), r"1 unexpected weight\(s\) \['extra'\]"),
        (
            lambda sd: sd.update({"model.lm_head.weight": torch.zeros(256, 8)}),
            r"'model.lm_head.weight' is \[256, 8\], expected \[256, 16\]",
        ),
        (
            lambda sd: sd.update({"model.lm_head.weight": torch.zeros(256, 16, dtype=torch.float64)}),
            r"'model.lm_head.weight' is torch.float64, expected torch.float32",
        ),
        (  # tied to the embedding: loaded, the head would silently replace it (review s22 e2e)
            lambda sd: sd.update({"model.lm_head.weight": sd["model.lm_head.weight"] + 0.5}),
            r"'model.embed.weight' and 'model.lm_head.weight' differ \(by up to 0.5\), but the model ties them",
        ),
    ],
)
def test_weights_that_do_not_fit_the_model_are_one_line(tmp_path, edit, message) -> None:
    path = _module_checkpoint(tmp_path / "last.safetensors")
    _edit_weights(path, edit)
    error = _error(path, load_model)
    assert "does not fit the model its hyperparameters describe (mixer='ttt'" in error
    assert re.search(message, error)


def test_an_attention_checkpoint_resumed_into_a_ttt_run_is_one_clear_error(tmp_path) -> None:
    run, cfg = load_config(
        "tiny",
        [*(f"model.{k}={v}" for k, v in SMALL.items()), "model.ttt.mini_batch_size=8", "data.seq_len=16",
         "data.batch_size=2", "data.val_batches=1", "trainer.max_steps=2", "trainer.progress_bar=false",
         f"out_dir={tmp_path}"],
    )  # fmt: skip
    ckpt = _module_checkpoint(tmp_path / "last.safetensors", mixer="attention")
    with pytest.raises(CheckpointError) as info:
        train(run, cfg, resume=True)
    message = str(info.value)
    assert "\n" not in message and repr(str(ckpt)) in message
    # the resume check compares the checkpoint's model config with the run's before any weight is read
    assert (
        "holds another model than this run's" in message and "model.mixer ('attention' -> 'ttt')" in message
    )


def test_resuming_from_a_checkpoint_that_is_not_a_training_one_is_one_clear_error(tmp_path) -> None:
    run, cfg = load_config("tiny", ["trainer.progress_bar=false", f"out_dir={tmp_path}"])
    ckpt = save_checkpoint({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "last.safetensors")
    with pytest.raises(CheckpointError) as info:
        train(run, cfg, resume=True)
    assert str(info.value).startswith(f"{str(ckpt)!r} is not a training checkpoint (it has no [")


@pytest.mark.parametrize("key", ["model.lm_head.weight", "model.embed.weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_on_load(tmp_path, key, bad) -> None:
    """A validly signed checkpoint with a NaN or infinity in any weight (tied ones included: the twin
    must not silently overwrite it) is one line naming the file and the tensor, for eval, generate and
    resume alike (all read through load_checkpoint)."""
    path = _module_checkpoint(tmp_path / "last.safetensors")

    def poison(state_dict):
        state_dict[key] = state_dict[key].clone()
        state_dict[key][0, 1] = bad

    _edit_weights(path, poison)  # saved with a checksum that matches
    for load in (load_checkpoint, load_model, load_training_checkpoint):
        error = _error(path, load)
        assert f"non-finite weights: {key!r} holds 1 NaN/infinite value(s)" in error


@pytest.mark.parametrize("load", [load_model, load_module])
def test_a_newer_innerloops_checkpoint_says_which_innerloop_wrote_it(tmp_path, load) -> None:
    path = _module_checkpoint(tmp_path / "last.safetensors")
    metadata, tensors = _read_raw(path)
    assert metadata["innerloop_version"] == innerloop.__version__  # recorded when saved
    tree = json.loads(metadata["innerloop.tree"])
    tree["hyper_parameters"]["model"]["future_option"] = 1  # a hyperparameter this innerloop lacks
    _rewrite(
        path,
        {**metadata, "innerloop.tree": json.dumps(tree), "innerloop_version": "9.0.0"},
        tensors,
        sign=True,
    )
    message = _error(path, load)
    assert f"cannot rebuild (it was written by innerloop 9.0.0; this is {innerloop.__version__})" in message
    assert "future_option" in message


@pytest.mark.parametrize("load", [load_model, load_module])
def test_a_family_key_its_member_never_read_loads_at_its_default_with_a_warning(tmp_path, load) -> None:
    """Such a key had no effect when the run trained; since the config refuses it, a checkpoint that
    records one could not be loaded at all."""
    path = _module_checkpoint(tmp_path / "last.safetensors", mixer="deltanet")
    metadata, tensors = _read_raw(path)
    tree = json.loads(metadata["innerloop.tree"])
    tree["hyper_parameters"]["model"]["family"] = {"mini_batch_size": 8}  # DeltaNet takes one step per token
    _rewrite(path, {**metadata, "innerloop.tree": json.dumps(tree)}, tensors, sign=True)
    with pytest.warns(
        UserWarning, match=r"records model.family.mini_batch_size=8, which mixer 'deltanet' does not read"
    ):
        loaded = load(path)
    assert loaded is not None
