"""Edges of evaluating and comparing on one's own data: a one-window comparison claims no certainty,
evaluation windows never overlap on long data, loss-by-position can be computed again at another
length, and a text file in another encoding is named with what to do."""

from __future__ import annotations

import math

import pytest
import torch

from innerloop.data.text import DataError, read_tokens
from innerloop.data.tokenizer import train_bpe
from innerloop.train.bootstrap import MIN_BAND_WINDOWS, expanded_tail
from innerloop.train.compare import bootstrap_difference
from innerloop.train.data import spread_windows
from innerloop.train.metrics import LossByPosition


@pytest.mark.parametrize("windows", [1, 2, MIN_BAND_WINDOWS - 1])
def test_too_few_windows_give_no_band(windows) -> None:
    """Below MIN_BAND_WINDOWS no percentile band covers what it says (a "95%" band over 2 windows left
    the true difference out in half the trials): the mean, and NaN for the band."""
    differences = torch.arange(2.0 * windows).reshape(windows, 2)
    mean, low, high = bootstrap_difference(differences, torch.ones(windows, 2))
    torch.testing.assert_close(mean, differences.double().mean(0))
    assert all(math.isnan(v) for v in (*low.tolist(), *high.tolist()))


def test_enough_windows_give_a_band() -> None:
    differences = torch.arange(float(MIN_BAND_WINDOWS))[:, None]
    _, low, high = bootstrap_difference(differences, torch.ones(MIN_BAND_WINDOWS, 1), resamples=2500)
    assert low.item() < high.item()


def test_resamples_drawn_in_parts_give_the_bands_of_drawing_them_at_once() -> None:
    differences = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    counts = torch.ones(64, 3, dtype=torch.float64)
    mean, low, high = bootstrap_difference(differences, counts, resamples=3001, seed=5)  # 4 parts
    picks = torch.randint(64, (3001, 64), generator=torch.Generator().manual_seed(5))  # the same draws
    at_once = differences[picks].sum(1) / counts[picks].sum(1)  # [R, K]
    tail = expanded_tail(64, 0.95)
    quantiles = torch.quantile(at_once, torch.tensor([tail, 1 - tail], dtype=torch.float64), dim=0)
    torch.testing.assert_close(torch.stack([low, high]), quantiles, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, differences.mean(0), rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # reason: ~1 s: spreads 100,000 windows over 12.8M tokens
def test_windows_of_long_data_never_overlap() -> None:
    seq_len, holds = 128, 100_000  # as many windows as 12.8M tokens hold: float32 starts overlapped here
    data = torch.arange(seq_len * holds + 2)  # each token its position: a window's first is its start
    inputs, _ = spread_windows(data, seq_len=seq_len, count=holds)
    assert inputs.shape == (holds, seq_len) and int(inputs[:, 0].diff().min()) >= seq_len  # scored apart


def test_loss_by_position_is_computed_again_at_another_length() -> None:
    metric = LossByPosition(4)
    metric.update(torch.ones(2, 8), torch.ones(2, 8, dtype=torch.bool))
    metric.compute()
    metric.reset()
    metric.update(torch.ones(2, 12), torch.ones(2, 12, dtype=torch.bool))  # refused before the fix
    assert metric.compute().tolist() == [1.0] * 4


@pytest.mark.parametrize(
    ("option", "fix"), [("data.paths", "data.tokenizer=bytes"), ("--data", "a model trained on bytes")]
)
def test_a_utf16_file_is_named_with_its_encoding_and_the_options_of_its_command(
    tmp_path, option, fix
) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes("héllo wörld".encode("utf-16"))
    tokenizer = train_bpe(["hello world, some text to learn from"] * 20, 300)
    with pytest.raises(
        DataError, match=rf"{option} file .* is UTF-16 text \(it starts with a UTF-16 byte-order mark\)"
    ) as error:
        read_tokens([path], tokenizer, option=option)
    assert "iconv" in str(error.value) and fix in str(error.value)
