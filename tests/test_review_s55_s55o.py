"""Review s55o: official TTT-E2E checkpoints (innerloop.interop.ttt_e2e) that are damaged.

A chunk of a saved array that is missing (an interrupted copy of a checkpoint, a lost OCDBT key)
read as zarr's fill value, 0: the converter built a model with zeroed weights and said nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from innerloop.interop.ttt_e2e import OfficialConfigError, load_model, read_orbax_weights, weights_folder

DATA = Path(__file__).resolve().parent / "data" / "e2e"
WEIGHT = "language_model.model.h.blocks.feed_forward.w1.weight"

tensorstore = pytest.importorskip(
    "tensorstore", reason="the e2e extra (tensorstore) is part of the test extra"
)


def copied_checkpoint(tmp_path: Path) -> Path:
    """A writable copy of the official checkpoint's ``model_weights`` (OCDBT) under ``tmp_path/0``."""
    folder = tmp_path / "0" / "model_weights"
    shutil.copytree(DATA / "checkpoint" / "0" / "model_weights", folder)
    for path in folder.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    return folder


def plain_zarr_checkpoint(tmp_path: Path, fill_flag: bool | None) -> Path:
    """Two of the official weights saved as orbax's plain zarr layout (one folder per array, no OCDBT),
    with ``store_array_data_equal_to_fill_value`` set to ``fill_flag`` (absent for None)."""
    folder = tmp_path / "0" / "model_weights"
    folder.mkdir(parents=True)
    tree = {}
    weights = load_file(DATA / "weights.safetensors")
    for name in (WEIGHT, "language_model.model.wte.weight"):
        value, keys = weights[name], name.split(".")
        tree[str(tuple(keys))] = {
            "key_metadata": [{"key": key, "key_type": 2} for key in keys],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False},
        }
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(folder / name)}}
        store = tensorstore.open(spec, create=True, dtype="float32", shape=list(value.shape)).result()
        store.write(value).result()
    metadata: dict = {"tree_metadata": tree, "use_zarr3": False}
    if fill_flag is not None:
        metadata["store_array_data_equal_to_fill_value"] = fill_flag
    (folder / "_METADATA").write_text(json.dumps(metadata), encoding="utf-8")
    return folder


def test_a_missing_chunk_of_an_ocdbt_checkpoint_is_refused_naming_the_array_and_folder(tmp_path) -> None:
    folder = copied_checkpoint(tmp_path)
    store = tensorstore.KvStore.open({"driver": "ocdbt", "base": folder.resolve().as_uri()}).result()
    chunks = [
        key for key in store.list().result() if key.startswith(f"{WEIGHT}/".encode()) and b"/." not in key
    ]
    assert chunks  # the array's data, apart from its .zarray
    for key in chunks:
        store.delete_range(tensorstore.KvStore.KeyRange(key, key + b"\0")).result()
    with pytest.raises(
        OfficialConfigError, match=rf"checkpoint array {WEIGHT} in '.*model_weights' .*is missing"
    ):
        read_orbax_weights(tmp_path)


def test_a_missing_chunk_file_of_a_plain_zarr_checkpoint_is_refused(tmp_path) -> None:
    folder = plain_zarr_checkpoint(tmp_path, fill_flag=True)
    np.testing.assert_array_equal(
        read_orbax_weights(tmp_path)[WEIGHT], load_file(DATA / "weights.safetensors")[WEIGHT]
    )
    for chunk in (folder / WEIGHT).iterdir():
        if not chunk.name.startswith("."):
            chunk.unlink()
    with pytest.raises(
        OfficialConfigError, match=rf"checkpoint array {WEIGHT} in .* cannot be read: .*is missing"
    ):
        read_orbax_weights(tmp_path)


@pytest.mark.parametrize("fill_flag", [False, None])
def test_an_unwritten_chunk_is_the_fill_value_where_orbax_says_it_skips_them(tmp_path, fill_flag) -> None:
    """An orbax that does not store chunks equal to the fill value (its metadata says so, or predates
    the flag) leaves an all-zero chunk unwritten: it reads as zeros, as orbax reads it."""
    folder = plain_zarr_checkpoint(tmp_path, fill_flag=fill_flag)
    for chunk in (folder / WEIGHT).iterdir():
        if not chunk.name.startswith("."):
            chunk.unlink()
    assert not read_orbax_weights(tmp_path)[WEIGHT].any()


def test_load_model_names_the_checkpoint_folder_with_the_tensor_it_refuses(tmp_path) -> None:
    """A tensor refused after it was read (non-finite, another shape) was named, but not the checkpoint it
    came from: with several checkpoints (steps, sizes) the error did not say which one to replace."""
    folder = copied_checkpoint(tmp_path)
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "ocdbt", "base": folder.resolve().as_uri(), "path": WEIGHT},
    }
    store = tensorstore.open(spec, open=True, read=True, write=True).result()
    store[0, 0, 0] = np.nan
    where = re.escape(repr(str(folder.resolve())))
    with pytest.raises(
        OfficialConfigError, match=rf"^checkpoint {where}: checkpoint tensor {WEIGHT} has non-finite"
    ):
        load_model(tmp_path, DATA / "config.json")
    config = json.loads((DATA / "config.json").read_text(encoding="utf-8"))
    config["model"]["intermediate_size"] = 96
    with pytest.raises(OfficialConfigError, match=rf"^checkpoint {where}: checkpoint tensor .* has shape"):
        load_model(tmp_path, config)


def test_a_latest_step_without_model_weights_is_refused_not_passed_over_for_an_older_one(tmp_path) -> None:
    """A latest step whose model_weights folder has no _METADATA was refused ("an unfinished save?"), but
    one with no model_weights folder at all (a partly copied checkpoint: its opt_state arrived first) was
    passed over, and the step before it loaded in its place without a word."""
    for step in ("2500", "4800"):
        (tmp_path / step / "opt_state").mkdir(parents=True)
    (tmp_path / "2500" / "model_weights").mkdir()
    (tmp_path / "2500" / "model_weights" / "_METADATA").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"'.*4800' has no model_weights folder"):
        weights_folder(tmp_path)
    assert weights_folder(tmp_path / "2500") == tmp_path / "2500" / "model_weights"  # named, it is read
