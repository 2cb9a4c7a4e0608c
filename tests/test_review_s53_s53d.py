"""Review s53d: a mutation audit of decoding, the Hugging Face cache, checkpoint loading, data packing and
the evaluation metrics. Each test here kills a mutant the suite let survive (named in its docstring)."""

from __future__ import annotations

import pytest
import torch

from innerloop.hf import InnerloopConfig, InnerloopForCausalLM
from innerloop.hf.modeling import LeftPaddedCache

HF_SHAPES = {"hidden_size": 16, "num_heads": 2, "num_layers": 2, "intermediate_size": 32}


def hf_model() -> InnerloopForCausalLM:
    """A hidden-16 float64 TTT model (seeded), in eval mode."""
    torch.manual_seed(0)
    config = InnerloopConfig(model={**HF_SHAPES, "ttt": {"mini_batch_size": 4}})
    return InnerloopForCausalLM(config).eval().double()


def test_left_padded_reorder_cache_reorders_the_pads_with_the_rows() -> None:
    """Mutant: ``LeftPaddedCache.reorder_cache`` kept the groups and fingerprint of the rows asked for but
    not their pad counts: row 0 (no pads) reordered behind row 1 (two pads) kept the old ``pads``, so the
    next forward read each row with the other's pad count (a wrong group, or an error)."""
    model = hf_model()
    ids = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    following = torch.tensor([[11, 12], [13, 14]])
    with torch.no_grad():
        cache = model(ids, attention_mask=mask).cache
        assert isinstance(cache, LeftPaddedCache)
        rows = torch.tensor([1, 0])
        expected = model(following[rows], cache=cache.index_select(rows)).logits
        cache.reorder_cache(rows)
        assert cache.pads.tolist() == [2, 0]
        logits = model(following[rows], cache=cache).logits
    assert torch.equal(logits, expected)


def counting_reader(documents: list[list[int]], read: list[tuple[int, int]]):
    """A :data:`~innerloop.data.packing.DocumentReader` of ``documents`` (every epoch the same) that
    appends ``(epoch, document)`` to ``read`` for each document it yields."""

    def reader(epoch: int, first: int):
        for number in range(first, len(documents)):
            read.append((epoch, number))
            yield number, documents[number]

    return reader


def test_packing_reads_no_further_ahead_than_the_window_it_yields() -> None:
    """Mutant: ``available -= need`` (not ``seq_len``) after each window undercounted the tokens held by one
    a window, so the packer read one more token ahead per window: the windows were right, but after 60
    windows it held 60 tokens of documents it had not reached (a streaming source read ahead without
    bound, its segments kept in memory). Each window must be cut from at most the documents it spans."""
    from innerloop.data.packing import packed_windows

    documents = [[10 * d + t for t in range(3)] for d in range(400)]  # 3 tokens each
    read: list[tuple[int, int]] = []
    windows = packed_windows(counting_reader(documents, read), seq_len=4)
    for count in range(1, 61):
        window, position = next(windows)
        end = 4 * count  # the stream index of the window's last token (windows start every 4 tokens)
        assert window == [documents[i // 3][i % 3] for i in range(end - 4, end + 1)]
        assert len(read) == end // 3 + 1  # the document of the window's last token, and none after it


def test_an_epoch_of_exactly_one_window_of_tokens_packs_across_epochs() -> None:
    """Mutant: the short-epoch check ``tokens < seq_len + 1`` as ``<=`` refused training documents holding
    exactly one window's tokens, which fill it (the next window then starts the next epoch)."""
    from innerloop.data.packing import StreamPosition, packed_windows

    read: list[tuple[int, int]] = []
    windows = packed_windows(counting_reader([[1, 2, 3], [4, 5]], read), seq_len=4)
    first, second, third = (next(windows) for _ in range(3))
    assert first == ([1, 2, 3, 4, 5], StreamPosition(0, 1, 1))
    assert second == ([5, 1, 2, 3, 4], StreamPosition(1, 1, 0))
    assert third[0] == [4, 5, 1, 2, 3]


def test_left_padded_index_select_keeps_each_rows_state_within_a_group_of_one_pad_count() -> None:
    """Mutant: ``LeftPaddedCache.index_select`` numbering a group's rows in reverse gave row 0 the state of
    row 1 where both have as many pads; the tests' batches had one row per pad count (each group one row),
    where the numbering cannot be wrong. Rows 0 and 1 here share a group (one pad each)."""
    model = hf_model()
    ids = torch.tensor([[0, 1, 2, 3, 4], [0, 9, 8, 7, 6], [5, 5, 6, 6, 7]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    following = torch.tensor([[11, 12], [13, 14], [15, 16]])
    rows = torch.tensor([1, 0, 2, 1])
    with torch.no_grad():
        cache = model(ids, attention_mask=mask).cache
        assert isinstance(cache, LeftPaddedCache) and len(cache.groups) == 2
        expected = model(following, cache=cache).logits[rows]
        logits = model(following[rows], cache=cache.index_select(rows)).logits
    assert (logits - expected).abs().max().item() <= 1e-12


def test_validation_and_test_fractions_summing_to_one_hold_out_every_document() -> None:
    """Mutant: the sum check ``test / (1 - val) > 1`` as ``>= 1`` refused fractions that sum to exactly 1,
    which the docs allow ("a sum of at most 1"): every document is then held out, for one side or the
    other. (0.1 + 0.9 and 0.2 + 0.8 take the full check: ``1 - 0.9`` rounds below 0.1, so the quick
    check of plain floats passes them on; 0.5 + 0.5 is accepted by the quick one.)"""
    from innerloop.data.packing import document_side, first_document_of

    for val_fraction, test_fraction in ((0.1, 0.9), (0.2, 0.8), (0.5, 0.5), (1, 0.0)):
        sides = [document_side(n, val_fraction, test_fraction) for n in range(8)]
        assert "training" not in sides, (val_fraction, test_fraction, sides)
    assert [document_side(n, 0.2, 0.8) for n in range(5)] == ["test"] * 4 + ["validation"]
    assert first_document_of("test", 0.1, 0.9) == 0 and first_document_of("training", 0.1, 0.9, 100) is None


def test_left_padding_mixed_with_a_hole_or_right_padding_is_refused() -> None:
    """Mutant: ``left_pads`` taking ``first + count <= length`` (not ``==``) for "zeros, then ones to the
    end" read a row with a hole or trailing zeros beside a left-padded row as left padded: its tokens
    after the zeros were computed from a state that had read nothing of the gap, silently."""
    from innerloop.hf.modeling import left_pads

    assert left_pads(torch.tensor([[0, 1, 1], [1, 1, 1]])).tolist() == [1, 0]
    for bad_row, what in (([1, 0, 1], "a hole"), ([1, 1, 0], "right padding"), ([0, 1, 0], "right padding")):
        with pytest.raises(ValueError, match=f"left padding \\(row 0\\) and {what} \\(row 1"):
            left_pads(torch.tensor([[0, 1, 1], bad_row]))


def test_a_left_padded_cache_continues_with_the_whole_sequences_mask_or_the_new_tokens_ones() -> None:
    """Mutant: ``padded_rows`` expecting ``columns > pads`` (not ``>=``) refused the mask generate() extends
    (each row's pads as zeros, then ones) with a left-padded cache; no test passed a mask with one.
    Defect (MED) found writing it: the mask of the new tokens alone, all ones, which its docstring and its
    message name as valid, was refused (compared with a ``[columns]`` tensor, never equal to ``[B, columns]``)."""
    model = hf_model()
    ids = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    following = torch.tensor([[11, 12], [13, 14]])
    with torch.no_grad():
        cache = model(ids, attention_mask=mask).cache
        expected = model(following, cache=cache).logits
        whole = torch.cat((mask, torch.ones(2, 2, dtype=mask.dtype)), dim=1)
        for given in (whole, torch.ones(2, 2, dtype=mask.dtype)):
            assert torch.equal(model(following, attention_mask=given, cache=cache).logits, expected)
