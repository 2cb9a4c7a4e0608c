"""``InnerloopForCausalLM.from_pretrained(OUT_DIR)`` where an ``innerloop export --overwrite`` was killed
between its two renames (OUT_DIR missing, the earlier export in ``.<name>.*.old`` beside it) fails in
one line naming that folder and how to put it back, instead of transformers' "couldn't connect to
huggingface.co" (review s11, resume L2). It moves nothing: the next export settles the folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hf_testing import MODEL_KINDS

from innerloop.hf import InnerloopForCausalLM
from innerloop.hf.export import export_model
from innerloop.models import ModelConfig, build_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig.from_dict(MODEL_KINDS["swa"])).eval()


def test_a_folder_missing_after_an_interrupted_export_is_named_with_where_the_earlier_one_waits(
    model, tmp_path: Path
) -> None:
    out = export_model(model, tmp_path / "hf", tokenizer=None)
    older = tmp_path / ".hf.abcdefgh.old"  # an earlier interrupted export's, set aside before
    older.mkdir()
    os.utime(older, ns=(1, 1))
    latest = tmp_path / ".hf.rg1__738.old"
    os.replace(out, latest)  # the kill between the two renames: OUT_DIR is missing
    with pytest.raises(FileNotFoundError) as missing:
        InnerloopForCausalLM.from_pretrained(str(out))
    message = str(missing.value)
    assert "\n" not in message
    assert message.startswith(f"{str(out)!r} does not exist: an `innerloop export` ")
    assert f"waits beside it in {str(latest)!r}; put it back with `mv {latest} {out}`" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.abcdefgh.old", ".hf.rg1__738.old"]

    os.replace(latest, out)  # as the message says
    loaded = InnerloopForCausalLM.from_pretrained(out)
    expected, found = model.state_dict(), loaded.model.state_dict()
    assert found.keys() == expected.keys()
    assert all(torch.equal(found[name], expected[name]) for name in expected)


def test_a_missing_folder_with_nothing_set_aside_beside_it_is_left_to_transformers(tmp_path: Path) -> None:
    (tmp_path / "hf.abcdefgh.old").mkdir()  # only looks like a leftover
    (tmp_path / ".hf.abcdefgh.old").symlink_to(tmp_path / "hf.abcdefgh.old")  # a link, not a folder set aside
    with pytest.raises(OSError) as missing:
        InnerloopForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert not isinstance(missing.value, FileNotFoundError) or "innerloop export" not in str(missing.value)
