"""Review s51f: a cache passed in with input_ids of another batch size is refused, naming the cache and
both sizes. A 1-row ``LeftPaddedCache`` given 2 rows ran, the second row read from no state at all:
its logits were zeros and ``generate()`` continued it with token 0 (a silent wrong answer); other sizes
failed in torch's words (an IndexError, a size mismatch)."""

from __future__ import annotations

import pytest
import torch
from hf_testing import tiny_hf_model

from innerloop.hf.modeling import LeftPaddedCache


@pytest.fixture(scope="module")
def model():
    return tiny_hf_model("ttt_linear")


@pytest.fixture(scope="module")
def left_padded_caches(model) -> dict[int, LeftPaddedCache]:
    """Rows -> the cache of that many prompts of 5 columns, the first row's first 2 of them pads."""
    caches = {}
    for rows in (1, 2):
        ids = torch.arange(5 * rows).reshape(rows, 5)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        with torch.no_grad():
            caches[rows] = model(ids, attention_mask=mask).cache
        assert isinstance(caches[rows], LeftPaddedCache)
    return caches


@pytest.mark.slow  # the left-padded prefill of the shared caches: ~1 s on a loaded CPU
@pytest.mark.parametrize(("cached_rows", "given_rows"), [(1, 2), (2, 1), (2, 3)])
def test_a_left_padded_cache_of_another_batch_size_is_refused(
    model, left_padded_caches, cached_rows: int, given_rows: int
) -> None:
    cache = left_padded_caches[cached_rows]
    with pytest.raises(
        ValueError, match=rf"cache .*holds {cached_rows} sequence.*input_ids has {given_rows} row"
    ):
        model(torch.full((given_rows, 1), 7), cache=cache)


@pytest.mark.slow  # as above
def test_generate_with_a_left_padded_cache_of_another_batch_size_is_refused(
    model, left_padded_caches
) -> None:
    cache = left_padded_caches[1]
    sequence = torch.cat([torch.arange(5)[None].repeat(2, 1), torch.tensor([[7], [9]])], dim=1)
    with pytest.raises(ValueError, match=r"cache .*holds 1 sequence.*input_ids has 2 row"):
        model.generate(sequence, cache=cache, max_new_tokens=2)


def test_a_plain_cache_of_another_batch_size_names_the_cache_not_an_inner_state(model) -> None:
    with torch.no_grad():
        cache = model(torch.arange(4)[None]).cache
    with pytest.raises(ValueError, match=r"past_key_values.*holds 1 sequence.*input_ids has 2 row"):
        model(torch.full((2, 1), 7), past_key_values=cache)
