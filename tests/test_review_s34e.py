"""Review s34e: the last look at session 34's argument checks."""

import io
import os

import numpy as np
import pytest
import torch

from innerloop import checkpoints
from innerloop.core.functional import as_integer
from innerloop.models.generate import sample_next
from innerloop.train.data import checked_window_sizes
from innerloop.train.plots import read_loss_by_position_csv


@pytest.mark.parametrize("value", [torch.tensor([2]), torch.tensor([[2]]), np.array([2])])
def test_as_integer_refuses_a_tensor_of_one_element_that_is_not_0d(value):
    # torch's __index__ read tensor([[2]]) as 2 where numpy refuses array([2]): a [B] tensor of one row
    # passed as a size (top_k, seq_lens, max_new_tokens) was taken silently
    assert as_integer(value) is None
    with pytest.raises(ValueError, match="seq_len="):
        checked_window_sizes(seq_len=value)
    with pytest.raises(TypeError, match="top_k="):
        sample_next(torch.randn(1, 5), temperature=1.0, top_k=value, generator=None)


@pytest.mark.parametrize(
    "value", [3, np.int64(3), np.uint8(3), torch.tensor(3), torch.tensor(3, dtype=torch.uint8)]
)
def test_as_integer_takes_the_integers_it_took(value):
    assert as_integer(value) == 3 and type(as_integer(value)) is int


@pytest.mark.parametrize("name", ["checkpoint_tokenizer", "checkpoint_identity", "checkpoint_content_digest"])
@pytest.mark.parametrize("value", [None, 3, io.BytesIO(b"x")])
def test_checkpoint_readers_refuse_a_non_path_naming_it_as_load_checkpoint_does(name, value):
    # the siblings of load_checkpoint's check: pathlib's 'expected str, bytes or os.PathLike object'
    # (checkpoint_tokenizer, checkpoint_identity) or a file named 'None' (checkpoint_content_digest)
    with pytest.raises(TypeError, match=r"checkpoint=.* must be a path \(a str or os\.PathLike\)"):
        getattr(checkpoints, name)(value)


def test_read_loss_by_position_csv_refuses_an_int_instead_of_reading_that_file_descriptor(tmp_path):
    fd = os.open(tmp_path / "other.txt", os.O_RDWR | os.O_CREAT)  # another's open file
    try:
        with pytest.raises(TypeError, match=r"path=\d+ \(int\) must be a path"):
            read_loss_by_position_csv(fd)
        os.fstat(fd)  # still open: open(fd) closed it on the way out
    finally:
        os.close(fd)
