"""data.test_fraction: a test split held out from training and validation (text files by a band of
their hash, one file by a band before its validation tail, hf records by a share of the documents not
held out for validation); at 0 (the default) every split, state, digest and checkpoint record is what
innerloop made before the key existed (golden values computed with that code); training never reads
a test byte; ``innerloop eval --held-out test`` and ``compare --held-out test`` score the test windows,
refused where the data changed under them; the config refuses what cannot be a test split."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lm_testing import TINY, direct_perplexity

from innerloop.checkpoints import recorded_entry
from innerloop.cli import main
from innerloop.config.load import ConfigError, load_config
from innerloop.data.packing import document_side, first_document_of, is_test, is_validation
from innerloop.data.text import (
    check_text_split,
    split_by_file,
    split_keys,
    split_test_files,
    split_text_files,
    text_split_lengths,
)
from innerloop.data.tokenizer import train_bpe
from innerloop.train import train
from innerloop.train.compare import compare
from innerloop.train.data import (
    DataError,
    HFDataModule,
    TextDataModule,
    validation_file_keys,
)
from innerloop.train.run import evaluate, run_data_record

MODEL = {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 32}


def _corpus(root: Path) -> dict[str, Path]:
    """Text files of distinct lines (a line found elsewhere would be a leak), one file, and jsonl records."""
    (root / "many").mkdir(parents=True)
    for i in range(40):
        (root / "many" / f"f{i:02d}.txt").write_text("".join(_line(f"{i}.{j}") for j in range(10 + i)))
    (root / "one.txt").write_text("".join(_line(str(j)) for j in range(300)))
    docs = root / "docs.jsonl"
    records = [
        json.dumps({"text": f"Document {i}: quick brown fox {i % 7} " * (1 + i % 3)}) for i in range(120)
    ]
    docs.write_text("".join(r + "\n" for r in records))
    return {"many": root / "many", "one": root / "one.txt", "docs": docs}


def _line(name: str) -> str:
    """A line no other holds any 17 bytes of (hex of a hash of its name)."""
    return hashlib.sha256(name.encode()).hexdigest()[:30] + "\n"


def _digest(value: object) -> str:
    def plain(v: object) -> object:
        return (
            hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() if isinstance(v, torch.Tensor) else v
        )

    return hashlib.sha256(json.dumps(value, default=plain, sort_keys=True).encode()).hexdigest()[:16]


def _zero_test_outputs(corpus: dict[str, Path]) -> dict[str, str]:
    """What a run without a test split splits, reads and records, with only the API innerloop had before
    data.test_fraction (so that the same function ran on that code gave the golden values)."""
    out = {}
    for name in ("many", "one"):
        paths = [str(corpus[name])]
        keys = split_keys(paths)
        files = sorted(keys)
        splits = []
        for v in (0.0, 0.1, 0.3):
            train_files, val_files = split_text_files(files, v, keys)
            splits += [
                sorted(keys[p] for p in train_files),
                sorted(keys[p] for p in val_files),
                sorted(keys[p] for p in split_by_file(files, v, keys)[1]),
                list(text_split_lengths(files, v, keys)),
                validation_file_keys(paths, v),
            ]
        module = TextDataModule(paths, seq_len=16, batch_size=3, val_batches=2, seed=5)
        module.setup()
        batches = [module.make_train_batch(i) for i in range(3)]
        texts = [module.train_bytes, module.val_bytes, module.make_val_examples(), batches]
        state = {k: v for k, v in module.state_dict().items() if k != "validation_digest"}  # recorded since
        out[name] = _digest([splits, state, texts])
    hf = HFDataModule([str(corpus["docs"])], seq_len=16, batch_size=3, val_batches=2)
    hf.setup()
    stream = iter(hf.train_dataloader())
    batches = [next(stream) for _ in range(20)]
    state = {k: v for k, v in hf.state_dict().items() if k != "files"}  # files: their times
    out["hf"] = _digest([state, hf.val_examples, batches])
    return out


# computed by _zero_test_outputs on main at 02ccca7, before data.test_fraction existed
GOLDEN = {"hf": "964e033667736dec", "many": "b26afdfb51c8fcfe", "one": "eb8240b2027f99ca"}


def test_without_a_test_split_every_split_state_and_stream_is_as_before(tmp_path) -> None:
    assert _zero_test_outputs(_corpus(tmp_path)) == GOLDEN


def _contains(text: torch.Tensor, window: torch.Tensor) -> bool:
    return bytes(window.to(torch.uint8).tolist()) in bytes(text.to(torch.uint8).tolist())


@pytest.mark.parametrize("name", ["many", "one"])
def test_training_never_reads_a_test_byte(tmp_path, name) -> None:
    corpus = _corpus(tmp_path)
    module = TextDataModule([str(corpus[name])], seq_len=16, batch_size=4, val_batches=4, test_fraction=0.2)
    module.setup()
    test = TextDataModule([str(corpus[name])], seq_len=16, batch_size=4, val_batches=4, test_fraction=0.2)
    test.setup("test")
    inputs, targets = test.make_test_examples()
    assert len(inputs) == 16
    windows = torch.cat([inputs, targets[:, -1:]], dim=1)
    assert module.train_bytes is not None and module.val_bytes is not None
    training = [torch.cat([x, y[:, -1:]], dim=1) for x, y in map(module.make_train_batch, range(50))]
    for window in windows:
        assert not _contains(module.train_bytes, window)  # anywhere in the training text
        assert not _contains(module.val_bytes, window)
        assert not any(_contains(batch.flatten(), window) for batch in training)
    # and the training text is what a run without a test split trains on, less the test text only
    plain = TextDataModule([str(corpus[name])], seq_len=16, batch_size=4, val_batches=4)
    plain.setup()
    assert torch.equal(plain.val_bytes, module.val_bytes)
    assert len(plain.train_bytes) == len(module.train_bytes) + len(test.test_bytes)


def test_one_files_test_text_is_the_band_before_its_validation_tail(tmp_path) -> None:
    one = _corpus(tmp_path)["one"]
    module = TextDataModule([str(one)], seq_len=16, test_fraction=0.25, val_fraction=0.1)
    module.setup()
    data = torch.frombuffer(bytearray(one.read_bytes() + b"\0"), dtype=torch.uint8)
    cut, test_cut = int(len(data) * 0.9), int(len(data) * 0.65)
    assert (module.validation_cut, module.test_cut) == (cut, test_cut)
    assert torch.equal(module.train_bytes, data[:test_cut])
    assert torch.equal(module.test_bytes, data[test_cut:cut])
    assert module.state_dict()["test_cut"] == test_cut


def test_a_files_test_membership_does_not_change_when_files_are_added(tmp_path) -> None:
    many = _corpus(tmp_path)["many"]
    keys = split_keys([str(many)])
    _, test, _ = split_test_files(sorted(keys), 0.1, 0.2, keys)
    assert 3 <= len(test) <= 14  # about 8 of 40
    for i in range(40, 80):
        (many / f"f{i:02d}.txt").write_text(f"added {i}\n")
    more = split_keys([str(many)])
    others, test_now, _ = split_test_files(sorted(more), 0.1, 0.2, more)
    assert set(test) <= set(test_now)
    assert all(more[p] >= "f40" for p in set(test_now) - set(test))
    # validation files never test files, and the validation split is the one without a test split
    val = split_text_files(others, 0.1, more)[1]
    assert not set(val) & set(test_now)
    assert val == split_text_files(sorted(more), 0.1, more)[1]


def test_hf_test_documents_are_a_share_apart_from_validation_and_never_trained_on(tmp_path) -> None:
    for v, t in ((0.1, 0.1), (0.1, 0.05), (0.3, 0.2), (0.5, 0.4)):
        sides = [(is_validation(n, v), is_test(n, v, t)) for n in range(10_000)]
        assert not any(a and b for a, b in sides)
        assert sum(b for _, b in sides) == pytest.approx(10_000 * t, abs=1)
        assert sum(a for a, _ in sides) == pytest.approx(10_000 * v, abs=1)
    docs = _corpus(tmp_path)["docs"]
    module = HFDataModule([str(docs)], seq_len=16, batch_size=3, val_batches=2, test_fraction=0.2)
    module.setup()
    assert module.test_examples is not None and "test_digest" in module.state_dict()
    stream = iter(module.train_dataloader())
    training = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in (next(stream) for _ in range(40))])
    test_text = [
        bytes(w.tolist()) for w in torch.cat([module.test_examples[0], module.test_examples[1][:, -1:]], 1)
    ]
    trained = bytes(training.flatten().to(torch.uint8).tolist())
    assert not any(window in trained for window in test_text)
    plain = HFDataModule([str(docs)], seq_len=16, batch_size=3, val_batches=2)
    plain.setup()
    assert plain.state_dict()["validation_digest"] == module.state_dict()["validation_digest"]


def _config(tmp_path: Path, *overrides: str) -> None:
    load_config("tiny", [*overrides, f"out_dir={tmp_path / 'out'}"])


@settings(max_examples=30, deadline=None)
@given(
    val_fraction=st.one_of(st.floats(2e-3, 0.95), st.sampled_from([0.1, 1 / 3, 0.25, 0.5])),
    test_share=st.one_of(st.just(0.0), st.floats(0.02, 0.999)),
    side=st.sampled_from(["validation", "test", "training"]),
)
def test_the_first_document_of_a_side_is_the_first_a_walk_from_document_0_finds(
    val_fraction, test_share, side
) -> None:
    """compare's refusal of a model trained on the baseline's first held-out document finds that document
    from where the fractions put it (a walk from document 0 took seconds at a fraction of 1e-6): the same
    document as the walk, for any fractions whose sum leaves training documents."""
    test_fraction = test_share * (0.999 - val_fraction) if val_fraction < 0.999 else 0.0
    walk = next((n for n in range(20_000) if document_side(n, val_fraction, test_fraction) == side), None)
    assert first_document_of(side, val_fraction, test_fraction, within=20_000) == walk


@pytest.mark.parametrize("tiny", [1e-12, 1e-17, 1e-20, 5e-324])
def test_the_first_document_of_a_tiny_fraction_is_none_found_at_once(tiny) -> None:
    """A valid fraction too small for any held-out document among the first ``within`` (the walk's None):
    from 1e-17 on, stepping from ``ceil(1/fraction)`` never ended (``n + 1`` and ``n`` the same float),
    and at 5e-324 ``1/fraction`` is infinite (an OverflowError)."""

    def too_slow(signum, frame):
        raise TimeoutError("first_document_of took more than 5 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(5)
    try:
        assert first_document_of("validation", tiny) is None
        assert first_document_of("test", 0.1, tiny) is None
        assert first_document_of("test", tiny, tiny) is None
        assert first_document_of("test", tiny, 0.3) == 3  # the fourth document: 3 * 0.3 < 1 <= 4 * 0.3
        if 1.0 + tiny > 1:  # all validation, and a test share on top: a sum past 1 (it divided by 1 - 1)
            with pytest.raises(ValueError, match=r"must be at most 1"):
                first_document_of("test", 1.0, tiny)
        else:  # a share below float64's resolution at 1: a sum of 1, all validation
            assert first_document_of("test", 1.0, tiny) is None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_the_config_refuses_what_cannot_be_a_test_split(tmp_path) -> None:
    corpus = _corpus(tmp_path)
    many, one = f"data.paths=[{corpus['many']}]", f"data.paths=[{corpus['one']}]"
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.5 \+ data.test_fraction=0.5 = 1 leaves no"):
        _config(tmp_path, many, "data.val_fraction=0.5", "data.test_fraction=0.5")
    with pytest.raises(ConfigError, match=r"data.test_fraction=1.0 must be in \[0, 1\)"):
        _config(tmp_path, many, "data.test_fraction=1")
    with pytest.raises(ConfigError, match=r"data.test_fraction=0.1 applies to data.name='text' or 'hf' only"):
        _config(tmp_path, "data.name=recall", "data.test_fraction=0.1")
    with pytest.raises(
        ConfigError, match=r"the test text \(0.01 of the file before its validation tail\) has "
    ):
        _config(tmp_path, one, "data.seq_len=512", "data.test_fraction=0.01")
    with pytest.raises(
        ConfigError, match=r"data.test_fraction=0.001 holds out no test file: .* larger data.test"
    ):
        _config(tmp_path, many, "data.test_fraction=0.001")
    keys = split_keys([str(corpus["many"])])
    check_text_split(sorted(keys), 0.1, 16, keys, 0.2)  # a usable split passes
    with pytest.raises(DataError, match="leaves no training text"):
        TextDataModule([str(corpus["many"])], val_fraction=0.6, test_fraction=0.4)
    with pytest.raises(
        DataError, match="^test_fraction=0 holds out no test text"
    ):  # built by hand: its argument
        TextDataModule([str(corpus["many"])]).setup("test")


def test_the_checkpoint_records_no_test_fraction_without_a_test_split() -> None:
    run, _ = load_config("tiny", [])
    assert "data.test_fraction" not in run_data_record(run)  # as a checkpoint of an older innerloop
    run, _ = load_config("tiny", ["data.test_fraction=0.1"])
    assert run_data_record(run)["data.test_fraction"] == 0.1


def _trained(tmp_path: Path, name: str, paths: Path, *overrides: str) -> Path:
    out = tmp_path / name
    settings = [*TINY, *(f"model.{k}={v}" for k, v in MODEL.items()), "model.ttt.mini_batch_size=4"]
    run, cfg = load_config(
        "tiny",
        [
            *settings,
            "data.seq_len=16",
            "trainer.max_steps=2",
            f"data.paths=[{paths}]",
            f"out_dir={out}",
            *overrides,
        ],
    )
    return train(run, cfg).checkpoint


@pytest.mark.slow  # reason: trains two tiny runs (a few seconds), evaluates and compares them
def test_eval_and_compare_score_the_runs_test_windows_named_test(tmp_path, capsys) -> None:
    corpus = _corpus(tmp_path)
    checkpoint = _trained(tmp_path, "run", corpus["many"], "data.test_fraction=0.2")
    assert recorded_entry(checkpoint, "innerloop_run")["data.test_fraction"] == 0.2
    state = recorded_entry(checkpoint, "TextDataModule")
    module = TextDataModule([str(corpus["many"])], seq_len=16, batch_size=4, val_batches=1, test_fraction=0.2)
    module.setup("test")
    assert state["test_files"] == module.test_keys and module.test_keys
    assert main(["eval", str(checkpoint), "--held-out", "test", "--out", str(tmp_path / "ev")]) == 0
    said = capsys.readouterr().out
    assert "the run's test windows (data.name='text'" in said
    (csv_path,) = (tmp_path / "ev").glob("*.csv")
    assert "_text-test-" in csv_path.name and "-val-" not in csv_path.name
    metrics = evaluate(checkpoint, held_out="test", progress_bar=False)[0]
    assert metrics["val_ppl"] == pytest.approx(
        direct_perplexity(checkpoint, *module.make_test_examples()), rel=1e-5
    )
    validation = evaluate(checkpoint, progress_bar=False)[0]
    assert validation["val_ppl"] != metrics["val_ppl"]
    other = _trained(tmp_path, "other", corpus["many"], "data.test_fraction=0.2", "seed=1")
    out = tmp_path / "cmp"
    assert (
        main(["compare", str(checkpoint.parent), str(other.parent), "--held-out", "test", "--out", str(out)])
        == 0
    )
    assert "the run's test windows" in capsys.readouterr().out
    assert sorted(p.suffix for p in out.glob("compare-test-*")) == [".csv", ".md", ".png"]


@pytest.mark.slow  # reason: trains tiny runs (a few seconds)
def test_eval_of_test_windows_refuses_data_changed_under_them(tmp_path) -> None:
    corpus = _corpus(tmp_path)
    one = _trained(tmp_path, "one", corpus["one"], "data.test_fraction=0.2")
    evaluate(one, held_out="test", progress_bar=False)
    corpus["one"].write_text(corpus["one"].read_text()[:6000])  # shortened: its test band starts earlier
    with pytest.raises(DataError, match=r"shorter than when the checkpoint was written: its test text"):
        evaluate(one, held_out="test", progress_bar=False)
    many = _trained(tmp_path, "run_many", corpus["many"], "data.test_fraction=0.2")
    test_file = corpus["many"] / recorded_entry(many, "TextDataModule")["test_files"][0]
    test_file.rename(test_file.with_name("renamed.txt"))  # its text now elsewhere, perhaps in training
    with pytest.raises(DataError, match=r"held out for test before, now not .* as test text"):
        evaluate(many, held_out="test", progress_bar=False)
    plain = _trained(tmp_path, "plain", corpus["many"])
    with pytest.raises(ConfigError, match=r"held_out='test': the run \(data.test_fraction=0\) held out no"):
        evaluate(plain, held_out="test", progress_bar=False)
    with pytest.raises(ConfigError, match="held_out='test' scores the run's own test windows, and paths"):
        evaluate(plain, [str(corpus["one"])], held_out="test", progress_bar=False)


@pytest.mark.slow  # reason: trains a tiny data.name=hf run (a few seconds)
def test_eval_of_an_hf_runs_test_windows(tmp_path) -> None:
    docs = _corpus(tmp_path)["docs"]
    checkpoint = _trained(
        tmp_path, "hf", docs, "data.name=hf", "data.test_fraction=0.2", "data.val_batches=2"
    )
    module = HFDataModule([str(docs)], seq_len=16, batch_size=4, val_batches=2, test_fraction=0.2)
    module.setup()
    assert recorded_entry(checkpoint, "HFDataModule")["test_digest"] == module.state_dict()["test_digest"]
    metrics, csv_path, _ = evaluate(checkpoint, held_out="test", out_dir=tmp_path / "ev", progress_bar=False)
    assert metrics["val_ppl"] == pytest.approx(direct_perplexity(checkpoint, *module.test_examples), rel=1e-5)
    assert csv_path is not None and "_hf-test-" in csv_path.name
    lines = docs.read_text().splitlines(keepends=True)
    first = next(n for n in range(len(lines)) if is_test(n, 0.1, 0.2))
    lines[first] = json.dumps({"text": "edited"}) + "\n"  # a test document edited: its windows differ
    docs.write_text("".join(lines))
    with pytest.raises(DataError, match="the test windows of data.paths=.* differ from those the checkpoint"):
        evaluate(checkpoint, held_out="test", progress_bar=False)
    validation = evaluate(checkpoint, progress_bar=False)[0]  # its validation windows are as they were
    assert validation["windows"] == 8


@pytest.mark.slow  # reason: trains a tiny run (a few seconds), then resumes it
@pytest.mark.parametrize(("first", "then"), [("0.2", "0"), ("0", "0.2")])
def test_a_resume_may_not_change_the_test_split(tmp_path, first, then) -> None:
    many = _corpus(tmp_path)["many"]
    checkpoint = _trained(tmp_path, "run", many, f"data.test_fraction={first}")
    saved = checkpoint.parent / "config.yaml"  # edited by hand: the checkpoint's record is what refuses it
    text = saved.read_text()
    assert f"test_fraction: {float(first)}" in text
    saved.write_text(text.replace(f"test_fraction: {float(first)}", f"test_fraction: {float(then)}"))
    run, cfg = load_config(str(saved), ["trainer.max_steps=4"])
    with pytest.raises(
        ConfigError, match=rf"gives data.test_fraction \({float(first)!r} -> {float(then)!r}\)"
    ):
        train(run, cfg, resume=True)


@pytest.mark.slow  # reason: trains two tiny one-file runs (a few seconds), then compares them
def test_compare_of_one_file_runs_judges_the_windows_by_what_each_run_held_out(tmp_path) -> None:
    one = _corpus(tmp_path)["one"]
    with_test = _trained(tmp_path, "a", one, "data.test_fraction=0.2")
    without = _trained(tmp_path, "b", one)  # trained on the first 90%: a's test band, not its last 10%
    compare([with_test.parent, without.parent], batches=1)  # a's validation windows: b never read them
    with pytest.raises(ConfigError, match=r"b was trained on the first 90% of"):
        compare([with_test.parent, without.parent], batches=1, held_out="test")
    compare([without.parent, with_test.parent], batches=1)  # b's validation windows: a held them out


def test_hf_data_without_a_test_document_is_refused_by_name_but_still_validates(tmp_path) -> None:
    docs = _corpus(tmp_path)["docs"]  # 120 documents: at 0.001, the first test one would be about the 900th
    module = HFDataModule([str(docs)], seq_len=16, batch_size=3, val_batches=2, test_fraction=0.001)
    with pytest.raises(
        DataError, match=r"no document is held out for test: .* larger test_fraction$"
    ):  # a DataModule built by hand names its arguments (s58c)
        module.setup()
    module = HFDataModule([str(docs)], seq_len=16, batch_size=3, val_batches=2, test_fraction=0.001)
    module.setup("validate")  # an evaluation of the validation windows reads no test document
    assert module.val_examples is not None and module.test_examples is None


def _short_validation_documents(root: Path) -> Path:
    """120 jsonl records whose validation documents (every 10th) are one letter and the others long: the
    validation text fills a window of 16 tokens and not one of 64; the test text fills many of 64."""
    docs = root / "short-validation.jsonl"
    text = [("x" if is_validation(i, 0.1) else f"document {i}: the quick brown fox " * 4) for i in range(120)]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in text))
    return docs


def test_hf_test_windows_are_read_without_the_validation_windows(tmp_path) -> None:
    # setup("test") read the validation windows too, and failed where they fill no window at this length
    docs = _short_validation_documents(tmp_path)
    module = HFDataModule([str(docs)], seq_len=64, batch_size=2, val_batches=1, test_fraction=0.2)
    with pytest.raises(
        DataError, match="the validation documents hold fewer than seq_len"
    ):  # a DataModule built by hand names its arguments (s58c)
        module.setup()
    module = HFDataModule([str(docs)], seq_len=64, batch_size=2, val_batches=1, test_fraction=0.2)
    module.setup("test")
    assert module.val_examples is None and module.test_examples is not None
    assert module.test_examples[0].shape == (2, 64)


@pytest.mark.slow  # reason: trains a tiny run (a few seconds), then evaluates it
def test_eval_of_an_hf_runs_test_windows_at_another_seq_len(tmp_path) -> None:
    # eval --held-out test --seq-len 64 failed with validation's message (no validation window of 64)
    docs = _short_validation_documents(tmp_path)
    checkpoint = _trained(tmp_path, "hf", docs, "data.name=hf", "data.test_fraction=0.2")
    metrics, _, _ = evaluate(checkpoint, held_out="test", seq_len=64, batches=1, progress_bar=False)
    module = HFDataModule([str(docs)], seq_len=64, batch_size=4, val_batches=1, test_fraction=0.2)
    module.setup("test")
    assert metrics["windows"] == 4
    assert metrics["val_ppl"] == pytest.approx(direct_perplexity(checkpoint, *module.test_examples), rel=1e-5)


def test_a_test_split_too_short_in_tokens_is_refused_before_training(tmp_path) -> None:
    # the config counts the test files' bytes; a tokenizer made fewer tokens of them, and the split was
    # found too short only at `eval --held-out test`, after the training it cannot be changed without
    folder = tmp_path / "files"
    folder.mkdir()
    names = [folder / f"f{i:02d}.txt" for i in range(40)]
    for path in names:
        path.touch()
    _, test, _ = split_test_files(names, 0.1, 0.2)
    assert test  # the files whose hash is in the test band: one long run of a letter each, merged by the BPE
    for i, path in enumerate(names):
        path.write_text("a" * 100 if path in test else "".join(_line(f"{i}.{j}") for j in range(12)))
    tokenizer = train_bpe(["a" * 5000, "line one two three"], 300)
    module = TextDataModule(
        [str(folder)], seq_len=64, batch_size=2, val_batches=1, tokenizer=tokenizer, test_fraction=0.2
    )
    check_text_split(sorted(names), 0.1, 64, None, 0.2)  # the bytes suffice
    with pytest.raises(DataError, match=r"the test text \(the held-out test files\) has \d+ tokens, fewer"):
        module.setup()


def test_resuming_a_one_file_run_whose_test_band_moved_is_refused(tmp_path) -> None:
    """A resume checked the one file's recorded test cut (innerloop/train/data.py ``test_cut``) with no test
    of its message: a file that changed length moves the test band under the run."""
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 40)

    def module() -> TextDataModule:
        data = TextDataModule([str(path)], seq_len=8, batch_size=2, val_fraction=0.2, test_fraction=0.2)
        data.setup("fit")
        return data

    state = module().state_dict()
    path.write_bytes(path.read_bytes()[:-300])
    moved = module()
    message = (
        rf"changed length since the checkpoint was written: its test text \(data.test_fraction=0.2\) started "
        rf"at token {state['test_cut']} and now starts at token {moved.test_cut}, so the resumed run would "
        r"train on text held out for test, or the reverse; resume with the file as it was"
    )
    with pytest.raises(DataError, match=message):
        moved.load_state_dict(state)
