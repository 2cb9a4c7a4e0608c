"""DataModules: the default corpus, the split, batches as a function of their index, the recall task."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from innerloop.train.data import (
    IGNORE_INDEX,
    RECALL_KEYS,
    RECALL_VALUES,
    IndexedBatches,
    RecallDataModule,
    TextDataModule,
    copied_files,
    read_tokens,
    recall_example,
    resolve_files,
    split_by_file,
    split_keys,
    split_text_files,
    stdlib_files,
    warn_copied_files,
)


def test_the_default_corpus_is_the_standard_library_without_installed_packages() -> None:
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert root / "os.py" in files and root / "json" / "decoder.py" in files
    assert not any("site-packages" in p.parts for p in files)
    skipped = {"test", "tests", "idle_test", "__pycache__"}  # the test suites and caches are not the corpus
    assert not any(skipped & set(p.relative_to(root).parts[:-1]) for p in files)
    assert files == sorted(files) and all(p.suffix == ".py" and p.is_file() for p in files)


def test_the_split_is_by_file_deterministic_and_disjoint() -> None:
    files = stdlib_files()
    train, val = split_by_file(files, 0.1)
    train_again, val_again = split_by_file(list(reversed(files)), 0.1)  # order does not matter
    assert set(train_again) == set(train) and set(val_again) == set(val)
    assert not set(train) & set(val) and set(train) | set(val) == set(files)
    assert 0.05 < len(val) / len(files) < 0.15


@pytest.mark.parametrize("entry", ["{root}", "{root}/**/*.txt", "{root}/sub"])
def test_adding_a_file_moves_no_other_file_between_training_and_validation(tmp_path, entry) -> None:
    """The split hashes paths relative to the data.paths entries, not to the files' common folder: with
    every file in data/sub/, that folder was the root, and a file added in data/ re-drew every file's
    side (validation text a checkpoint had trained on)."""
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for i in range(30):
        (tmp_path / "sub" / ("deeper" if i % 3 else "") / f"part{i}.txt").write_text(f"text {i} " * 40)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    (elsewhere / "linked.txt").write_text("linked " * 40)
    paths = [entry.format(root=tmp_path)]

    def split() -> tuple[set[Path], set[Path]]:
        files = resolve_files(paths)
        train, val = split_text_files(files, 0.2, split_keys(paths))
        module = TextDataModule(paths, seq_len=8, batch_size=1, val_fraction=0.2)
        module.setup()
        assert torch.equal(module.val_bytes, read_tokens(val))  # the module splits the same way
        return set(train), set(val)

    train, val = split()
    (tmp_path / "sub" / "added.txt").write_text("new " * 40)
    (tmp_path / "added.txt").write_text("new " * 40)
    (tmp_path / "sub" / "deeper" / "added.txt").write_text("new " * 40)
    (tmp_path / "sub" / "link.txt").symlink_to(elsewhere / "linked.txt")  # a file that lives elsewhere
    train_after, val_after = split()
    assert train <= train_after and val <= val_after and val


def test_files_named_through_links_split_by_the_names_given(tmp_path) -> None:
    """Entries that are links (a Hugging Face snapshot folder is made of them) split by the path as
    found, not by where the links point: the same names split the same way wherever the data lives."""
    store, data = tmp_path / "store", tmp_path / "data"
    store.mkdir()
    data.mkdir()
    for i in range(20):
        (store / f"blob{i}").write_text(f"text {i} " * 40)
        (data / f"part{i}.txt").symlink_to(store / f"blob{i}")
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(20):
        (plain / f"part{i}.txt").write_text(f"text {i} " * 40)
    linked = split_text_files(resolve_files([str(data)]), 0.3, split_keys([str(data)]))
    named = split_text_files(resolve_files([str(plain)]), 0.3, split_keys([str(plain)]))
    assert named[0] and named[1]
    assert [sorted(p.name for p in side) for side in named] == [
        sorted(f"part{p.name[4:]}.txt" for p in side) for side in linked
    ]


def test_training_batches_depend_only_on_their_index(tmp_path) -> None:
    text = tmp_path / "a.txt"
    text.write_bytes(bytes(range(32, 127)) * 50)
    module = TextDataModule([str(text)], seq_len=16, batch_size=4, seed=3)
    module.setup()
    stream = iter(IndexedBatches(module.make_train_batch))
    first = [next(stream) for _ in range(5)]
    resumed = iter(IndexedBatches(module.make_train_batch, start=3))
    assert all(torch.equal(a, b) for a, b in zip(next(resumed), first[3], strict=True))
    inputs, targets = first[0]
    assert inputs.shape == targets.shape == (4, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the next bytes


def test_ranks_split_the_same_stream_of_batches(tmp_path) -> None:
    make = lambda i: (torch.tensor([i]), torch.tensor([i]))  # noqa: E731
    rank0, rank1 = iter(IndexedBatches(make, 0, 0, 2)), iter(IndexedBatches(make, 0, 1, 2))
    seen = [int(next(r)[0]) for _ in range(3) for r in (rank0, rank1)]
    assert seen == [0, 1, 2, 3, 4, 5]


def test_a_single_file_is_split_by_bytes(tmp_path) -> None:
    text = tmp_path / "only.txt"
    text.write_bytes(b"x" * 1000)
    module = TextDataModule([str(text)], seq_len=8, val_fraction=0.2)
    module.setup()
    assert len(module.train_bytes) + len(module.val_bytes) == 1001  # + the document separator


def test_a_recall_example_asks_for_the_value_of_each_key() -> None:
    inputs, targets = recall_example(num_pairs=5, gap=30, generator=torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (4 * 5 + 30 - 1,)
    sequence = torch.cat((inputs, targets[-1:]))
    pairs = dict(zip(sequence[0:10:2].tolist(), sequence[1:10:2].tolist(), strict=True))
    assert all(k in RECALL_KEYS for k in pairs) and all(v in RECALL_VALUES for v in pairs.values())
    scored = (targets != IGNORE_INDEX).nonzero().flatten().tolist()
    assert len(scored) == 5
    for position in scored:
        key, answer = int(inputs[position]), int(targets[position])
        assert pairs[key] == answer
        assert position - 2 * list(pairs).index(key) >= 30  # at least `gap` tokens after the pair


def test_recall_validation_is_fixed_and_training_varies() -> None:
    module = RecallDataModule(num_pairs=4, gap=8, batch_size=2, val_batches=2)
    assert torch.equal(module.make_val_examples()[0], module.make_val_examples()[0])
    assert module.make_val_examples()[0].shape == (4, module.seq_len)
    assert not torch.equal(module.make_train_batch(0)[0], module.make_train_batch(1)[0])


def test_a_data_folder_skips_hidden_entries_and_compiled_python(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("text")
    for hidden in (".git/HEAD", ".venv/lib/x.py", "pkg/__pycache__/m.cpython-311.pyc", "pkg/.env"):
        (tmp_path / hidden).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / hidden).write_bytes(b"\x00binary")
    (tmp_path / "pkg" / "m.py").write_text("code")
    assert [p.relative_to(tmp_path).as_posix() for p in resolve_files([str(tmp_path)])] == [
        "notes.txt",
        "pkg/m.py",
    ]
    assert resolve_files([str(tmp_path / ".git" / "HEAD")]) == [
        (tmp_path / ".git" / "HEAD").resolve()
    ]  # named


def test_held_out_files_that_copy_training_files_are_named_in_one_warning(tmp_path, caplog) -> None:
    """A corpus with duplicated files (a mirror folder, a file saved twice) split by file name put copies of
    training text in validation, whose loss then measured memorisation, silently; the copies are found by
    content (size, then SHA-256) and a warning names one, when they are at least 1% of the held-out bytes."""
    texts = [f"document {i}: ".encode() + bytes([65 + i % 26]) * (300 + i) for i in range(12)]
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i:02d}.txt").write_bytes(text)
    files = sorted(tmp_path.glob("*.txt"))
    train, val = split_text_files(files, 0.3, split_keys([str(tmp_path)]))
    assert train and val
    assert copied_files(val, train) == []  # distinct contents: no copy
    twin = tmp_path / "mirror" / "same.txt"
    twin.parent.mkdir()
    twin.write_bytes(val[0].read_bytes())  # training gets a copy of a held-out file under another name
    assert copied_files(val, [*train, twin]) == [(val[0], twin)]
    assert copied_files([twin], train) == []  # the same size with other bytes is no copy
    (tmp_path / "empty.txt").write_bytes(b"")
    assert copied_files([tmp_path / "empty.txt"], [tmp_path / "empty.txt"]) == []  # empty files never are

    def warnings_of(held_out_bytes: int) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="innerloop.data.text"):
            warn_copied_files([(val[0], twin)], held_out_bytes)
        return [r.getMessage() for r in caplog.records]

    size = val[0].stat().st_size
    (message,) = warnings_of(size * 2)
    assert "1 held-out file(s)" in message and f"{size} of the {size * 2}" in message
    assert str(val[0]) in message and str(twin) in message and "data.paths" in message
    assert warnings_of(size * 101) == []  # under 1% of the held-out bytes: stray copies are not worth a line
    twin.unlink()  # now a copy under a name the split puts in training, read through the DataModule
    name = next(
        f"copy{k}.txt" for k in range(100) if not split_by_file([twin], 0.3, {twin: f"copy{k}.txt"})[1]
    )
    (tmp_path / name).write_bytes(val[0].read_bytes())
    caplog.clear()
    with caplog.at_level("WARNING", logger="innerloop.data.text"):
        TextDataModule([str(tmp_path)], seq_len=8, val_fraction=0.3).setup()
    (message,) = [r.getMessage() for r in caplog.records if "exact copies" in r.getMessage()]
    assert f"{val[0]!s}" in message and name in message
