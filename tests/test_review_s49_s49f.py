"""Review s49f: fair comparisons (issue 14) against inputs nobody listed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from benchmark_testing import benchmark_script
from lm_testing import untrained_run

from innerloop.config.load import ConfigError
from innerloop.train import compare as compare_module
from innerloop.train.bootstrap import expanded_tail, few_resamples_note
from innerloop.train.compare import ComparedModel, Comparison, LengthResult, compare, resolve_checkpoint


def _hugging_face_folder(folder):
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _orbax_folder(folder):
    (folder / "100").mkdir(parents=True)
    (folder / "100" / "_CHECKPOINT_METADATA").write_text("{}")
    return folder


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_hugging_face_folder, "a Hugging Face folder"),
        (_orbax_folder, "innerloop convert ttt-e2e"),
    ],
)
def test_compare_names_an_export_or_an_e2e_checkpoint_folder_as_eval_does(tmp_path, make, says) -> None:
    """An exported Hugging Face folder or an official TTT-E2E (orbax) checkpoint given to compare was "a
    folder without a checkpoint (last.safetensors)", not what it is and how to compare it (eval said)."""
    folder = make(tmp_path / "model")
    with pytest.raises(ConfigError, match=says):
        resolve_checkpoint(folder)
    with pytest.raises(ConfigError, match=says):
        compare([folder, folder])


def test_a_plain_folder_without_a_checkpoint_is_still_named_so(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"is a folder without a checkpoint \(last.safetensors\)"):
        resolve_checkpoint(tmp_path)


def test_the_few_resamples_note_counts_the_resamples_beyond_the_expanded_band_ends() -> None:
    """The band over W windows takes its ends at the expanded tail (0.24% over 6 windows, 0.57% over 8),
    not at 2.5%: the default 1000 resamples leave 2.4 and 5.7 beyond each end there, and the note that
    warns of fewer than 10 said nothing (it counted 25 at 2.5%)."""
    assert expanded_tail(6, 0.95) * 1000 == pytest.approx(2.43, abs=0.01)
    note = few_resamples_note(1000, 0.95, windows=6)
    assert note is not None and "2.43 beyond each end" in note and "over 6 windows" in note
    needed = int(
        note.split("resamples=")[1].split()[0]
    )  # from Python (s51a; --resamples on the command line)
    assert few_resamples_note(needed, 0.95, windows=6) is None
    assert few_resamples_note(needed - 1, 0.95, windows=6) is not None
    assert few_resamples_note(1000, 0.95, windows=32) is None  # 1.9% of 1000: 19 beyond each end
    assert few_resamples_note(1000, 0.95, windows=5) is None  # no band below 6 windows: nothing to warn of
    assert few_resamples_note(1000, 0.95) is None  # windows not known: the plain tail, as before


@pytest.mark.slow  # ~1 s: two tiny models evaluated on 6 windows
def test_compare_notes_too_few_resamples_for_its_windows(tmp_path) -> None:
    corpus = tmp_path / "corpus.py"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120)))
    runs = [
        untrained_run(tmp_path / n, corpus, m, s, 16, 3, 2) for n, m, s in (("a", "ttt", 0), ("b", "swa", 1))
    ]
    comparison = compare(runs)
    assert comparison.lengths[0].windows == 6
    assert any("over 6 windows" in note and "resamples=" in note for note in comparison.notes)


def test_growth_names_a_band_whose_ends_have_few_resamples_beyond_them(monkeypatch) -> None:
    """science.py growth's band over 8 windows ends at the 0.57% quantiles: its default 2000 resamples
    leave 11 beyond each end, 1000 leave 5.7, which it printed as a band like any other."""
    windows = 8
    generator = torch.Generator().manual_seed(0)
    sums = torch.rand(2, windows, 4, generator=generator, dtype=torch.float64) * 8
    result = LengthResult(
        16, [(0, 4), (4, 8), (8, 12), (12, 16)], sums, torch.full((windows, 4), 4.0), windows
    )
    models = [ComparedModel(n, Path(n), None, 1, None, None) for n in ("ttt", "swa")]  # type: ignore[arg-type]
    fake = Comparison(models, 1, [result], {}, 0.95, 1000, 0, "test windows")
    monkeypatch.setattr(compare_module, "compare", lambda *args, **kwargs: fake)
    science = benchmark_script("science")
    assert "--resamples" not in science.advantage_growth("ttt", "swa", None, resamples=2000)
    rough = science.advantage_growth("ttt", "swa", None, resamples=1000)
    assert "1000 bootstrap resamples leave 5.74 beyond each end" in rough, rough
    assert "use resamples=1743 or more" in rough and "the default is 2000" in rough  # called from Python
