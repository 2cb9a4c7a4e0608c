"""Review s49f: fair comparisons (issue 14) against inputs nobody listed."""

from __future__ import annotations

import pytest

from innerloop.config.load import ConfigError
from innerloop.train.compare import compare, resolve_checkpoint


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
    from innerloop.train.bootstrap import expanded_tail, few_resamples_note

    assert expanded_tail(6, 0.95) * 1000 == pytest.approx(2.43, abs=0.01)
    note = few_resamples_note(1000, 0.95, windows=6)
    assert note is not None and "2.43 beyond each end" in note and "over 6 windows" in note
    needed = int(note.split("--resamples ")[1].split()[0])
    assert few_resamples_note(needed, 0.95, windows=6) is None
    assert few_resamples_note(needed - 1, 0.95, windows=6) is not None
    assert few_resamples_note(1000, 0.95, windows=32) is None  # 1.9% of 1000: 19 beyond each end
    assert few_resamples_note(1000, 0.95, windows=5) is None  # no band below 6 windows: nothing to warn of
    assert few_resamples_note(1000, 0.95) is None  # windows not known: the plain tail, as before


@pytest.mark.slow  # ~1 s: two tiny models evaluated on 6 windows
def test_compare_notes_too_few_resamples_for_its_windows(tmp_path) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from lm_testing import untrained_run

    corpus = tmp_path / "corpus.py"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120)))
    runs = [
        untrained_run(tmp_path / n, corpus, m, s, 16, 3, 2) for n, m, s in (("a", "ttt", 0), ("b", "swa", 1))
    ]
    comparison = compare(runs)
    assert comparison.lengths[0].windows == 6
    assert any("over 6 windows" in note and "--resamples" in note for note in comparison.notes)
