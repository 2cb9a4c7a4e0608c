"""Review s57f: the Hugging Face classes under configurations the other tests do not name."""

from __future__ import annotations

import json

import pytest
import torch

from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

TINY = {"hidden_size": 16, "num_heads": 2, "num_layers": 1}


@pytest.mark.parametrize("value", ["yes", "false", 2])
def test_a_use_cache_that_is_not_a_flag_is_refused_in_config_json_and_when_set(tmp_path, value) -> None:
    """config.json's ``use_cache`` "false" was read as true (a cache returned), 2 and a list as well, while
    forward refuses the same values given as its argument; refused now on load and where forward reads
    a value set on the config later."""
    torch.manual_seed(0)
    model = InnerloopForCausalLM(InnerloopConfig(model=TINY)).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "use_cache": value}))
    with pytest.raises(ValueError, match=r"use_cache must be True, False or None, got "):
        InnerloopForCausalLM.from_pretrained(tmp_path)
    model.config.use_cache = value
    with pytest.raises(ValueError, match=r"config\.use_cache must be True, False or None, got "):
        model(torch.tensor([[1, 2, 3]]))
    assert model(torch.tensor([[1, 2, 3]]), use_cache=False).cache is None  # the argument decides
    model.config.use_cache = 0  # JSON's 0 and 1 stay flags, as the argument's do
    assert model(torch.tensor([[1, 2, 3]])).cache is None
