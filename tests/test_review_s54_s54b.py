"""Review s54b: Hugging Face leftovers.

- ``InnerloopForCausalLM(config)`` ignored ``config.innerloop_token_index_dtype`` (only ``from_pretrained``
  read it): a float64 model built from a saved config (under ``torch.set_default_dtype(torch.float64)``,
  ``from_config(config, dtype=torch.float64)``, ``AutoModelForCausalLM.from_config``) held its TTT token
  index exact where the model saved held it rounded, and computed other logits than ``from_pretrained``'s.
  The constructor now makes the index as the record says (a later cast keeps the index it widens).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_review_s53_s53m import default_dtype_float64

from innerloop.checkpoints import token_index_made_in
from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

TTT3 = {"vocab_size": 7, "num_layers": 2, "num_heads": 1, "intermediate_size": 5, "hidden_size": 6}
TTT3 = {**TTT3, "ttt": {"mini_batch_size": 3}}  # 1/3: rounded and exact differ
IDS = torch.tensor([[3, 1, 4, 1, 5, 2, 6]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def saved_rounded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of a float32 model cast to float64 (a ``64-true`` run's): its index is rounded."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("rounded")
    InnerloopForCausalLM(InnerloopConfig(model=TTT3)).double().eval().save_pretrained(folder)
    return folder


def _built_from_config(how: str, config: InnerloopConfig) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if how == "constructor":
        with default_dtype_float64():
            return InnerloopForCausalLM(config)
    if how == "from_config":
        return InnerloopForCausalLM._from_config(config, dtype=torch.float64)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float64)


@pytest.mark.slow  # a save and a load: about 1 s on a loaded CPU
@pytest.mark.parametrize("how", ["constructor", "from_config", "AutoModelForCausalLM.from_config"])
def test_a_float64_model_built_from_a_saved_config_is_the_one_from_pretrained_gives(
    saved_rounded, how
) -> None:
    """Seen failing: each built the exact index ('float64') where the record says 'float32', and its logits
    (the folder's weights loaded) differed from ``from_pretrained``'s."""
    loaded = InnerloopForCausalLM.from_pretrained(saved_rounded, dtype=torch.float64).eval()
    built = _built_from_config(how, InnerloopConfig.from_pretrained(saved_rounded)).eval()
    assert built.dtype == torch.float64
    assert token_index_made_in(built) == token_index_made_in(loaded) == "float32"
    built.load_state_dict(loaded.state_dict())
    assert torch.equal(_logits(built), _logits(loaded))


def test_the_constructor_honours_a_per_layer_record_and_refuses_one_of_another_length() -> None:
    """A record of one entry per TTT layer is made layer by layer; one naming 3 layers of 2 is refused when
    the model is built, naming the field (it was refused only by from_pretrained)."""
    config = InnerloopConfig(model=TTT3, innerloop_token_index_dtype=["float32", "float64"])
    with default_dtype_float64():
        assert token_index_made_in(InnerloopForCausalLM(config)) == ["float32", "float64"]
    wrong = InnerloopConfig(model=TTT3, innerloop_token_index_dtype=["float32"] * 3)
    with pytest.raises(
        ValueError, match=re.escape("innerloop_token_index_dtype=['float32', 'float32', 'float32'] has 3")
    ):
        InnerloopForCausalLM(wrong)


def test_a_float32_model_ignores_the_record_and_a_later_cast_widens_its_index() -> None:
    """Built in float32 the index is exact whatever the record (1/(i+1) in float32); ``.double()`` widens
    it (rounded), as torch's casts do, and save_pretrained records that ('float32')."""
    config = InnerloopConfig(model=TTT3, innerloop_token_index_dtype="float64")
    model = InnerloopForCausalLM(config)
    assert model.dtype == torch.float32 and token_index_made_in(model) is None
    assert token_index_made_in(model.double()) == "float32"


@pytest.fixture(scope="module")
def saved_float64(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A folder of a float64 model (attention: no index to tell) and its logits."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("float64")
    model = InnerloopForCausalLM(InnerloopConfig(model={**TTT3, "mixer": "attention"})).double().eval()
    model.save_pretrained(folder)
    return folder, _logits(model)


def _config_says(folder: Path, key: str, dtype: str) -> None:
    """config.json's dtype (``key``: ``dtype``, or the older ``torch_dtype``) set to ``dtype``."""
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps({**config, key: dtype}))


@pytest.mark.slow  # three loads: about 1.5 s on a loaded CPU
@pytest.mark.parametrize(("key", "narrow"), [("dtype", "float32"), ("torch_dtype", "bfloat16")])
def test_float64_weights_under_a_narrower_config_dtype_are_refused_unless_a_dtype_is_given(
    saved_float64, key, narrow
) -> None:
    """Seen failing: loaded in float32 (bfloat16) without a word, every weight rounded, as transformers
    loads its own models (a GPT-2 folder so edited loads in float32). Refused now where no dtype (or
    'auto') is given, naming the weight, both dtypes and the two ways on; a dtype given loads."""
    folder, logits = saved_float64
    _config_says(folder, key, narrow)
    for given in ({}, {"dtype": "auto"}):
        with pytest.raises(
            ValueError, match=rf"stored as torch.float64, but config.json's dtype \('{narrow}'\) loads"
        ):
            InnerloopForCausalLM.from_pretrained(folder, **given)
    exact = InnerloopForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    assert torch.equal(_logits(exact), logits)
    assert InnerloopForCausalLM.from_pretrained(folder, dtype=getattr(torch, narrow)).dtype == getattr(
        torch, narrow
    )
