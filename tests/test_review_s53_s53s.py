"""Review s53s: the token-index record (s53m), the dispatch gates and generate's text window at inputs
nobody tried.

Defects found (each seen failing before its fix):

- a checkpoint whose ``token_index_dtype`` record is not one the saving side writes (``"float16"``, a
  list of another length, a number) was refused by ``load_model`` / ``load_module`` with a bare
  ``ValueError`` that did not name the file (every other refusal of a checkpoint is a one-line
  :class:`~innerloop.checkpoints.CheckpointError` naming it, which the CLI reports without a traceback).
"""

from __future__ import annotations

import pytest
import torch

from innerloop.checkpoints import CheckpointError, load_model, save_checkpoint
from innerloop.train.module import LanguageModelModule, load_module
from tests.test_review_s53_s53m import built_in_float64

TINY = {"vocab_size": 7, "num_layers": 2, "num_heads": 1, "intermediate_size": 5, "hidden_size": 6}
TTT3 = {**TINY, "ttt": {"mini_batch_size": 3}}


def _checkpoint_with_record(tmp_path, record) -> str:
    """A checkpoint of a float64 ``TTT3`` model whose ``token_index_dtype`` record is ``record``."""
    model = built_in_float64(TTT3)
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    checkpoint = {"hyper_parameters": {"model": TTT3}, "state_dict": state, "token_index_dtype": record}
    return str(save_checkpoint(checkpoint, tmp_path / "edited.safetensors"))


@pytest.mark.parametrize("record", ["float16", ["float64", "float32", "float32"], 3])
def test_a_hostile_token_index_record_is_a_checkpoint_error_naming_the_file_and_key(tmp_path, record):
    path = _checkpoint_with_record(tmp_path, record)
    with pytest.raises(CheckpointError, match=r"edited\.safetensors.*token_index_dtype"):
        load_model(path, keep_dtype=True)


def test_a_hostile_token_index_record_is_a_checkpoint_error_for_load_module_too(tmp_path):
    path = _checkpoint_with_record(tmp_path, "float16")
    with pytest.raises(CheckpointError, match=r"edited\.safetensors.*token_index_dtype='float16'"):
        load_module(path, keep_dtype=True)


def test_a_good_record_of_a_checkpoint_still_loads_exact(tmp_path):
    loaded = load_model(_checkpoint_with_record(tmp_path, "float64"), keep_dtype=True)
    indexes = [
        m.token_idx for m in loaded.modules() if isinstance(getattr(m, "token_idx", None), torch.Tensor)
    ]
    assert [index[2].item() for index in indexes] == [1 / 3, 1 / 3]


def test_a_hostile_token_index_record_is_a_checkpoint_error_in_lightnings_on_load_checkpoint():
    # Lightning's load (a --resume, load_from_checkpoint): the same one-line refusal as check_state_dict's
    module = LanguageModelModule(model=TTT3)
    checkpoint = {"state_dict": module.state_dict(), "token_index_dtype": "float16"}
    with pytest.raises(
        CheckpointError, match=r"'the checkpoint': token_index_dtype='float16' must be one of"
    ):
        module.on_load_checkpoint(checkpoint)
