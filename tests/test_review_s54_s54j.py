"""Review s54j: the data walk's links to nothing (s54e) and its siblings. A link whose target is gone is
left out of the data; the walk now says so wherever the link stands where the entry could find files:
a link named like the glob's files, and a link where the glob would go on below a folder (a folder of
links to shards on a disk not mounted, read by ``data/**/*.txt``). A link loop is called one, not a
link to something deleted."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_review_s54_s54g import TINY

from innerloop.data.text import DataError, resolve_files
from innerloop.hf import InnerloopConfig, InnerloopForCausalLM
from innerloop.hf import modeling as hf_modeling
from innerloop.train.data import TextDataModule


def _warnings(caplog, entry: str) -> list[str]:  # noqa: ANN001
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="innerloop.data.text"):
        resolve_files([entry])
    return [r.getMessage() for r in caplog.records]


def test_a_link_to_a_gone_folder_below_a_glob_is_warned_of(tmp_path: Path, caplog) -> None:
    """``data/**/*.txt`` over a folder of links to shard folders on a disk not mounted: the links named
    ``shard1``, ``shard2`` match no ``*.txt`` as files, but the glob would have read the files below
    them; they were left out without a word (a data folder given as the entry warned of the same
    links). Now one warning names the first and counts the others."""
    data = tmp_path / "data"
    (data / "here").mkdir(parents=True)
    (data / "here" / "a.txt").write_text("text " * 20)
    (data / "shard1").symlink_to(tmp_path / "mnt" / "shard1")
    (data / "shard2").symlink_to(tmp_path / "mnt" / "shard2")
    for entry in (str(data / "**" / "*.txt"), str(data / "*" / "*.txt"), str(data)):
        (message,) = _warnings(caplog, entry)
        assert f"data.paths entry {entry!r}: the link {str(data / 'shard1')!r} (and 1 more)" in message
        assert "is left out of the data" in message


def test_a_link_to_nothing_the_glob_cannot_reach_is_not_warned_of(tmp_path: Path, caplog) -> None:
    """The warning stays for links the entry would read: ``*.txt`` of a folder (no ``/``: nothing below
    its folders) does not warn of a gone link ``shard1``, nor ``*/*.txt`` of a gone link ``notes.md``
    beside the folders it reads."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("text " * 20)
    (tmp_path / "sub" / "b.txt").write_text("text " * 20)
    (tmp_path / "shard1").symlink_to(tmp_path / "mnt" / "shard1")
    (tmp_path / "sub" / "notes.md").symlink_to(tmp_path / "mnt" / "notes.md")
    assert _warnings(caplog, str(tmp_path / "*.txt")) == []
    (tmp_path / "shard1").unlink()  # which */*.txt would enter
    assert _warnings(caplog, str(tmp_path / "*" / "*.txt")) == []


def test_a_link_loop_is_called_one(tmp_path: Path, caplog) -> None:
    """Links ``a.txt -> b.txt -> a.txt`` lead nowhere because they loop, not because a target was
    deleted: the error for the entry naming one, and the warning for a folder holding them, say so."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ok.txt").write_text("text " * 20)
    (tmp_path / "data" / "a.txt").symlink_to(tmp_path / "data" / "b.txt")
    (tmp_path / "data" / "b.txt").symlink_to(tmp_path / "data" / "a.txt")
    with pytest.raises(DataError) as raised:
        resolve_files([str(tmp_path / "data" / "a.txt")])
    assert "which does not exist" not in str(raised.value)
    assert "a loop of links" in str(raised.value)
    for entry in (str(tmp_path / "data"), str(tmp_path / "**" / "*.txt")):  # an OSError (ELOOP) before
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="innerloop.data.text"):
            assert resolve_files([entry]) == [tmp_path / "data" / "ok.txt"]
        (message,) = [r.getMessage() for r in caplog.records]
        assert "the link" in message and "(and 1 more)" in message and "a loop of links" in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_or_a_link_to_one_in_a_data_folder_is_not_read(tmp_path: Path, caplog) -> None:
    """A FIFO (and a link to one) in a data folder is not a file of text: the walk passes it, never
    opening it (an open would wait for a writer for ever), and the files beside it are read."""
    (tmp_path / "ok.txt").write_text("text " * 20)
    os.mkfifo(tmp_path / "pipe.txt")
    (tmp_path / "to_pipe.txt").symlink_to(tmp_path / "pipe.txt")
    assert resolve_files([str(tmp_path)]) == [tmp_path / "ok.txt"]
    assert resolve_files([str(tmp_path / "*.txt")]) == [tmp_path / "ok.txt"]


def _tiny_hf_model(seed: int) -> InnerloopForCausalLM:
    torch.manual_seed(seed)
    return InnerloopForCausalLM(InnerloopConfig(model=dict(TINY))).eval()  # s54g's tiny swa model


@pytest.mark.slow  # four sharded saves of a tiny model and a load: about 2 s
def test_a_sharded_save_over_a_sharded_one_stopped_between_shards_never_loads_a_mix(
    tmp_path: Path, monkeypatch
) -> None:
    """A sharded save over an earlier sharded one (the same shard names, as a re-save of the model after
    more training writes) moves its shards in one by one. Stopped after the first (a Ctrl-C as that
    rename returns), the folder held the new first shard beside the earlier save's others, its index and
    config: it loaded a mix of the two saves' weights, without a word. Now the earlier index goes
    before the first new shard comes in: stopped anywhere, the folder loads one save's weights whole, or
    refuses to load (no index yet), never a mix."""
    old, new = _tiny_hf_model(seed=0), _tiny_hf_model(seed=1)
    replace = os.replace
    old.save_pretrained(tmp_path / "old", max_shard_size="20KB")
    for stop_after in (1, 4, 6):  # of 5 shards, then the index: mixes before, the new weights at 6
        folder = tmp_path / f"saved{stop_after}"
        shutil.copytree(tmp_path / "old", folder)

        def interrupted(source, target, moved=[], stop_after=stop_after):  # noqa: ANN001, ANN202, B006
            replace(source, target)
            moved.append(Path(target).name)
            if sum(name.startswith("model") for name in moved) == stop_after:
                raise KeyboardInterrupt

        monkeypatch.setattr(hf_modeling.os, "replace", interrupted)
        try:
            new.save_pretrained(folder, max_shard_size="20KB")
        except KeyboardInterrupt:
            pass
        monkeypatch.undo()
        try:
            loaded = InnerloopForCausalLM.from_pretrained(folder).state_dict()
        except OSError:  # no weights to load: said, not a mix
            continue
        sources = {
            "new"
            if torch.equal(loaded[k], v)
            else "old"
            if torch.equal(loaded[k], old.state_dict()[k])
            else "?"
            for k, v in new.state_dict().items()
        }
        assert len(sources) == 1 and "?" not in sources, (stop_after, sources)


def test_a_state_from_before_the_validation_digest_resumes_without_its_warning(
    tmp_path: Path, caplog
) -> None:
    """A checkpoint written before runs recorded ``validation_digest`` (s54e) resumed on held-out text
    edited since: no warning of a validation text that differs (nothing to compare), while the state of
    today's runs warns (the docs' claim, docs/training.md)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("first half of the text, " * 8 + "second half of the text " * 8)
    first = TextDataModule([str(corpus)], seq_len=8, batch_size=2, val_fraction=0.5)
    first.setup()
    state = first.state_dict()
    corpus.write_text(corpus.read_text()[:-6] + "edited")
    for recorded, warned in (
        ({k: v for k, v in state.items() if k != "validation_digest"}, False),
        (state, True),
    ):
        caplog.clear()
        resumed = TextDataModule([str(corpus)], seq_len=8, batch_size=2, val_fraction=0.5)
        with caplog.at_level(logging.WARNING, logger="innerloop.train.data"):
            resumed.load_state_dict(recorded)
            resumed.setup()
        said = [r.getMessage() for r in caplog.records if "validation text differs" in r.getMessage()]
        assert bool(said) == warned


@pytest.mark.slow  # three saves of a tiny model: about 0.6 s
def test_a_resave_keeps_the_users_own_files_and_leaves_no_stale_weights(tmp_path: Path) -> None:
    """save_pretrained over an earlier save, sharded over unsharded and back: the user's own files in
    the folder (a README, a tokenizer copied in) stay; the earlier save's weight files that the new one
    does not write go (no shard index or shards beside a new model.safetensors, and the reverse)."""
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    (folder / "tokenizer.json").write_text("{}")
    model = _tiny_hf_model(seed=0)
    model.save_pretrained(folder, max_shard_size="20KB")
    model.save_pretrained(folder)  # unsharded over sharded
    names = {p.name for p in folder.iterdir()}
    assert {"README.md", "tokenizer.json", "model.safetensors"} <= names
    assert not [n for n in names if n.startswith("model-") or n.endswith(".index.json")]
    model.save_pretrained(folder, max_shard_size="20KB")  # sharded over unsharded
    names = {p.name for p in folder.iterdir()}
    assert {"README.md", "tokenizer.json", "model.safetensors.index.json"} <= names
    assert "model.safetensors" not in names


def test_a_relative_link_to_nothing_names_where_it_leads(tmp_path: Path, monkeypatch) -> None:
    """A data.paths entry that is a relative link (``corpus.txt -> ../mnt/corpus.txt``) whose target is
    gone: the error gave the link's text alone, read from the folder the run starts in, not the link's;
    it now names the path it leads to as well."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.txt").symlink_to(Path("..") / "mnt" / "corpus.txt")
    monkeypatch.chdir(tmp_path / "data")
    with pytest.raises(DataError) as raised:
        resolve_files(["corpus.txt"])
    assert f"is a link to '../mnt/corpus.txt' ({str(tmp_path / 'mnt' / 'corpus.txt')!r})" in str(raised.value)
