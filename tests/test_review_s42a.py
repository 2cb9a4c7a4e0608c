"""Review s42a (session 41's test split and multi-process metric check, read adversarially): under
ddp_spawn on CPU the evaluation metrics' states were shared memory between the processes until their
first reset, so one process's updates landed in the other's states (the check raised on a valid run, or
the run logged one process's shard); HFDataModule.setup('test') of data without a test split, and a text
run's setup('validate') whose test files are gone or whose one file's test band is short, now answer as their parallels do; an hf evaluation of
test windows at another --seq-len names --seq-len, and is judged by the test windows alone; a test split of several files that leaves one for
training and validation is one error naming data.test_fraction; a comparison of one-file runs judges the
test band by the cut that starts it, not by a float sum of the fractions, and refuses a model that read
the baseline's hf records with other held-out fractions and trained on its windows' first document."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from ddp_testing import unsynced_two_rank_run  # noqa: F401 (a fixture)
from lm_testing import TINY

from innerloop.checkpoints import recorded_entry
from innerloop.config import ConfigError, load_config
from innerloop.data.packing import is_validation
from innerloop.train import train
from innerloop.train.compare import compare
from innerloop.train.data import DataError, HFDataModule, TextDataModule
from innerloop.train.run import evaluate


@pytest.mark.slow  # reason: uses a 2-process run (ddp_testing: ddp_spawn on CPU, ~15 s, shared with s41)
def test_each_process_of_a_ddp_spawn_run_evaluates_into_its_own_metric_states(unsynced_two_rank_run) -> None:  # noqa: F811
    # one validation window: rank 1 scores a padding row only, yet its val_ppl counted rank 0's 32 tokens
    # (the states were the same memory); the run failed 'not combined' in about 3 of 7 launches. Read from
    # s41's run of that one window (no training row logged before its one validation, which would have
    # reset the inner diagnostics' states): each process's states and counts, recorded before the sync
    # (that run skips it) and before the check that refuses the unsynced metrics
    scored = 0
    for rank in (0, 1):
        lines = (unsynced_two_rank_run / "metric_states" / f"rank{rank}.jsonl").read_text().splitlines()
        assert len(lines) == 1, f"rank {rank}: {len(lines)} validations recorded"
        seen = json.loads(lines[0])
        assert not seen["shared"], f"rank {rank}: metric states in shared memory: {seen['shared']}"
        assert seen["count"] == seen["scored"], (
            f"rank {rank}: val_ppl counts {seen['count']}, scored {seen['scored']}"
        )
        scored += seen["scored"]
    assert scored == 32  # the one window's tokens, scored by one process


def _records(root: Path, count: int = 120) -> Path:
    docs = root / "docs.jsonl"
    texts = [f"Document {i}: quick brown fox {i % 7} " * (1 + i % 3) for i in range(count)]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return docs


def test_hf_setup_for_test_without_a_test_split_is_refused_as_text_data_is(tmp_path) -> None:
    # HFDataModule.setup("test") at data.test_fraction=0 returned with nothing read (test_examples None);
    # TextDataModule's refuses it by name
    module = HFDataModule([str(_records(tmp_path))], seq_len=16, batch_size=2, val_batches=1)
    with pytest.raises(
        DataError, match="^test_fraction=0 holds out no test text"
    ):  # a DataModule built by hand names its arguments (s58c)
        module.setup("test")


def _trained(tmp_path: Path, name: str, paths: Path, *overrides: str) -> Path:
    model = ["model.hidden_size=16", "model.intermediate_size=32", "model.num_layers=1"]
    out = [f"data.paths=[{paths}]", f"out_dir={tmp_path / name}"]
    run, cfg = load_config(
        "tiny", [*TINY, *model, "data.seq_len=16", "trainer.max_steps=2", *out, *overrides]
    )
    return train(run, cfg).checkpoint


@pytest.mark.slow  # reason: trains a tiny data.name=hf run (a few seconds), then evaluates it
def test_an_hf_evaluation_of_test_windows_too_long_names_seq_len(tmp_path) -> None:
    # the message said 'fewer than data.seq_len + 1 = 4097 ... or a shorter data.seq_len', the run's
    # setting (16), where eval's --seq-len 4096 is what the test documents are too short for
    docs = _records(tmp_path)
    checkpoint = _trained(tmp_path, "hf", docs, "data.name=hf", "data.test_fraction=0.2")
    with pytest.raises(DataError, match=r"fewer than seq_len \+ 1 = 4097 .* or a shorter seq_len$"):
        evaluate(checkpoint, held_out="test", seq_len=4096, progress_bar=False)


def _files_in_bands(folder: Path, bands: dict[str, int]) -> None:
    """Files named so that their split keys' hashes fall in each band at val 0.1, test 0.2 ('val' below
    0.1, 'test' in [0.1, 0.3), 'train' above): ``bands`` says how many of each, of 40 lines each."""
    folder.mkdir()
    found: dict[str, int] = dict.fromkeys(bands, 0)
    for i in range(1000):
        name = f"g{i}.txt"
        place = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
        band = "val" if place < 0.1 else "test" if place < 0.3 else "train"
        if found.get(band, 0) < bands.get(band, 0):
            found[band] += 1
            (folder / name).write_text("".join(f"{name} line {j}\n" for j in range(40)))
    assert found == bands


def test_a_test_split_that_leaves_one_file_for_training_and_validation_names_test_fraction(tmp_path) -> None:
    # one test file and one other: validation held out the other, and the message was 'the training text
    # has 0 bytes ... or a shorter data.seq_len', which no seq_len cures
    folder = tmp_path / "two"
    _files_in_bands(folder, {"test": 1, "train": 1})
    said = r"data.test_fraction=0.2 holds out 1 of the 2 files for test, leaving 1 for training and valid"
    with pytest.raises(ConfigError, match=said):
        load_config("tiny", [f"data.paths=[{folder}]", "data.test_fraction=0.2", f"out_dir={tmp_path / 'o'}"])
    with pytest.raises(
        DataError, match="^" + said.replace("data.", "")
    ):  # a DataModule built by hand names its arguments (s58c)
        TextDataModule([str(folder)], seq_len=16, test_fraction=0.2).setup()


def test_a_text_evaluation_of_validation_windows_reads_no_test_file(tmp_path) -> None:
    # a run's test file gone since: its validation windows are as they were, and setup("validate") refused
    # them for want of a test file (an hf run's setup("validate") reads no test document and goes on)
    folder = tmp_path / "files"
    _files_in_bands(folder, {"val": 1, "train": 3})
    module = TextDataModule([str(folder)], seq_len=16, batch_size=2, val_batches=1, test_fraction=0.2)
    module.setup("validate")
    assert module.val_bytes is not None and module.test_bytes is None
    with pytest.raises(
        DataError, match=r"^test_fraction=0.2 holds out no test file"
    ):  # a DataModule built by hand names its arguments (s58c)
        TextDataModule([str(folder)], seq_len=16, test_fraction=0.2).setup()


@pytest.mark.slow  # reason: trains two tiny one-file runs (a few seconds), then compares them
def test_a_one_file_comparison_judges_the_test_band_by_the_cut_the_runs_made(tmp_path) -> None:
    # a's test band starts where b's training text ends (both cut the file at int(length * 0.7)), but
    # 0.1 + 0.2 = 0.30000000000000004 > 0.3, and b was refused as 'trained on the first 70%' of a's windows
    one = tmp_path / "one.txt"
    one.write_text("".join(f"line {j} of the one file\n" for j in range(400)))
    a = _trained(tmp_path, "a", one, "data.val_fraction=0.1", "data.test_fraction=0.2")
    b = _trained(tmp_path, "b", one, "data.val_fraction=0.3")
    assert (
        recorded_entry(a, "TextDataModule")["test_cut"]
        == recorded_entry(b, "TextDataModule")["validation_cut"]
    )
    comparison = compare([a.parent, b.parent], batches=1, held_out="test")
    assert not [note for note in comparison.notes if "not a held-out one" in note]
    assert any("none of which it trained on" in note for note in comparison.notes)
    compare([b.parent, a.parent], batches=1)  # b's validation windows: a trained on none of them


def test_a_one_file_evaluation_of_validation_windows_needs_no_test_window(tmp_path) -> None:
    # setup("validate") of one file whose test band holds no window refused with the test text's message
    # and advice (a larger data.test_fraction, which the run it evaluates cannot change)
    one = tmp_path / "one.txt"
    one.write_text("x" * 999)
    module = TextDataModule(
        [str(one)], seq_len=16, batch_size=2, val_batches=1, val_fraction=0.5, test_fraction=0.01
    )
    module.setup("validate")
    assert module.val_bytes is not None and len(module.val_bytes) == 500
    with pytest.raises(
        DataError, match=r"the test text \(0.01 of the file before its validation tail\) has 10"
    ):
        TextDataModule([str(one)], seq_len=16, val_fraction=0.5, test_fraction=0.01).setup()


@pytest.mark.slow  # reason: trains a tiny data.name=hf run (a few seconds), then evaluates it
def test_an_hf_evaluation_of_test_windows_is_judged_by_the_test_windows_alone(tmp_path) -> None:
    # a validation document edited in place leaves every document's number and side, and the test windows
    # as recorded; eval --held-out test refused them with the validation windows' message
    docs = _records(tmp_path)
    checkpoint = _trained(tmp_path, "hf", docs, "data.name=hf", "data.test_fraction=0.2")
    before = evaluate(checkpoint, held_out="test", progress_bar=False)[0]
    lines = docs.read_text().splitlines(keepends=True)
    first = next(n for n in range(len(lines)) if is_validation(n, 0.1))
    lines[first] = json.dumps({"text": "an edited validation document"}) + "\n"
    docs.write_text("".join(lines))
    with pytest.raises(DataError, match="the validation windows of data.paths=.* differ"):
        evaluate(checkpoint, progress_bar=False)
    after = evaluate(checkpoint, held_out="test", progress_bar=False)[0]
    assert after["val_ppl"] == before["val_ppl"] and after["windows"] == before["windows"]


@pytest.mark.slow  # reason: trains three tiny data.name=hf runs (a few seconds each), then compares them
def test_a_comparison_refuses_a_model_that_trained_on_the_baselines_held_out_documents(tmp_path) -> None:
    # b read the same records with no test split, so it trained on a's test documents: compare --held-out
    # test only noted that it 'may have trained on' them (a one-file or files run is refused)
    docs = _records(tmp_path)
    a = _trained(tmp_path, "a", docs, "data.name=hf", "data.test_fraction=0.2")
    b = _trained(tmp_path, "b", docs, "data.name=hf")
    c = _trained(tmp_path, "c", docs, "data.name=hf", "data.test_fraction=0.2", "seed=1")
    with pytest.raises(
        ConfigError, match=r"b was trained on document 4 of the baseline's records, the first of"
    ):
        compare([a.parent, b.parent], batches=1, held_out="test")
    compare([a.parent, c.parent], batches=1, held_out="test")  # c held out the same test documents
    compare([a.parent, b.parent], batches=1)  # the same validation documents: b trained on none of them
