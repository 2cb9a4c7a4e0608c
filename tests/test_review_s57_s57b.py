"""Review s57b: the provenance of results and of a run's plugins (records a checkpoint, a Hugging Face
folder and a result file keep).

Defects found (each seen failing before its fix):

- a corrupt ``innerloop_plugins`` / ``innerloop_plugin_sources`` record (a number, a list, an item that
  is no mapping, a digest that is no string) in a checkpoint or a Hugging Face ``config.json`` was read
  as "no record": the model loaded with its plugins unchecked, and a save wrote a fresh record over it.
  Now a one-line refusal naming the file (or ``InnerloopConfig``), the key, the value and what is valid.
"""

from __future__ import annotations

import shlex
from types import SimpleNamespace

import pytest
import torch

from innerloop.checkpoints import (
    PLUGIN_SOURCES_KEY,
    PLUGINS_KEY,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)

TINY = {"vocab_size": 7, "num_layers": 1, "num_heads": 1, "intermediate_size": 5, "hidden_size": 6}

CORRUPT_RECORDS = [
    (PLUGINS_KEY, 3, "it is an int"),
    (PLUGINS_KEY, ["huber"], "it is a list"),
    (PLUGINS_KEY, {"inner_loss": {"huber": "my_loss.Huber"}}, r"\['inner_loss'\]\['huber'\] is a str"),
    (PLUGINS_KEY, {"inner_loss": {"huber": {"origin": 1}}}, "no 'origin' string"),
    (PLUGINS_KEY, {"inner_loss": {"huber": {"origin": "-p m", "settings": 2}}}, r"\['settings'\] is an int"),
    (PLUGINS_KEY, {"inner_loss": ["huber"]}, r"\['inner_loss'\] is a list"),
    (PLUGIN_SOURCES_KEY, {"inner_loss": {"huber": 5}}, r"\['huber'\] is an int, not a digest"),
    (PLUGIN_SOURCES_KEY, "abc", "it is a str"),
]


@pytest.mark.parametrize(("key", "record", "why"), CORRUPT_RECORDS)
def test_a_corrupt_plugin_record_in_a_checkpoint_is_refused_naming_file_key_and_value(
    tmp_path, key, record, why
) -> None:
    # no model in it, so the save keeps the record as given (a model's save writes its own)
    path = save_checkpoint({"state_dict": {}, key: record}, tmp_path / "edited.safetensors")
    with pytest.raises(CheckpointError, match=rf"edited\.safetensors.*: {key}=.*\(.*{why}.*must be"):
        load_checkpoint(path)


@pytest.mark.slow  # reason: its load builds the plugin registry (entry points), about 2 s in a cold process
def test_a_well_formed_or_absent_plugin_record_loads(tmp_path) -> None:
    good = {"inner_loss": {"huber": {"origin": "-p m", "class": "m.Huber", "settings": {"delta": 2.0}}}}
    for record, sources in ((None, None), ({}, {}), (good, {"inner_loss": {"huber": "ab" * 32}})):
        tree = {"state_dict": {}, PLUGINS_KEY: record, PLUGIN_SOURCES_KEY: sources}
        assert load_checkpoint(save_checkpoint(tree, tmp_path / "c.safetensors"))[PLUGINS_KEY] == record


@pytest.mark.slow  # reason: imports transformers (InnerloopConfig), about 2 s in a cold process
@pytest.mark.parametrize(("key", "record", "why"), CORRUPT_RECORDS[::3])
def test_a_corrupt_plugin_record_in_an_hf_config_is_refused(key, record, why) -> None:
    from innerloop.hf import InnerloopConfig

    with pytest.raises(ValueError, match=rf"InnerloopConfig: {key}=.*\(.*{why}"):
        InnerloopConfig(model=TINY, **{key: record})
    assert InnerloopConfig(model=TINY, **{key: None}).model["hidden_size"] == 6


# -- the commands a result file or config.yaml records load the -p plugin modules again -----------------


@pytest.mark.slow  # reason: imports Lightning (train.run, train.compare): seconds in a cold process
def test_the_reproduce_command_and_config_comment_load_the_p_modules_again(tmp_path, monkeypatch) -> None:
    """``innerloop -p 'my plugins/s57b_loss.py' compare ...`` wrote a Reproduce command without the
    ``-p`` (it failed: no plugin of that name), and config.yaml's comment named the module alone
    (``-p s57b_loss``), which imports only from the folder holding the file."""
    from plugin_testing import plugin_module_folder
    from test_review_s49_s49o import _DECORATED

    from innerloop.cli import _parser
    from innerloop.registry.modules import load_plugin_module
    from innerloop.train.compare import _compare_command
    from innerloop.train.run import _plugin_modules_comment

    folder = tmp_path / "my plugins"
    folder.mkdir()
    (folder / "s57b_loss.py").write_text(_DECORATED.format(cls="S57bLoss", name="s57b_loss"))
    models = [SimpleNamespace(checkpoint="a.safetensors", no_ttt=False)]
    comparison = SimpleNamespace(models=models, baseline=0, held_out="val", resamples=10, seed=0)
    windows = [SimpleNamespace(inputs=torch.zeros(2, 8), batch_size=2)]
    with plugin_module_folder(tmp_path, monkeypatch, "s57b_"):
        assert _compare_command(comparison, windows, [], None, None).startswith("innerloop compare ")
        monkeypatch.chdir(tmp_path)
        load_plugin_module(f"{folder.name}/s57b_loss.py")
        words = shlex.split(_compare_command(comparison, windows, [], None, None))
        comment = _plugin_modules_comment()
    file = str(folder / "s57b_loss.py")
    assert words[:4] == ["innerloop", "-p", file, "compare"]
    assert _parser().parse_args(words[1:]).plugin_modules_before == [file]
    assert comment == f"plugin modules loaded (not installed): innerloop -p {shlex.quote(file)}"


# -- one seed, two mixers: other initial embeddings, now said ----------------------------------------------


@pytest.mark.slow  # reason: builds three tiny runs and compares them at one length (Lightning): seconds
def test_compare_says_one_seed_gave_two_mixers_other_initial_embeddings(tmp_path) -> None:
    """Runs of TTT and SWA trained with one seed start from other embeddings (each model draws it after
    its own blocks): measured here, then named in compare's notes; two runs of one mixer get no such note."""
    from lm_testing import untrained_run

    from innerloop.checkpoints import load_checkpoint
    from innerloop.train.compare import compare

    corpus = tmp_path / "corpus.py"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(60)))
    runs = [
        untrained_run(tmp_path / n, corpus, m, 0, 8, 2, 1)
        for n, m in (("t", "ttt"), ("s", "swa"), ("u", "ttt"))
    ]
    embeds = [load_checkpoint(run / "last.safetensors")["state_dict"]["model.embed.weight"] for run in runs]
    assert not torch.equal(embeds[0], embeds[1]) and torch.equal(embeds[0], embeds[2])  # the measured fact
    notes = compare(runs, seq_lens=[8], baseline="t", resamples=10, batch_size=2, batches=1).notes
    said = [note for note in notes if "initial embedding" in note]
    assert len(said) == 1 and said[0].startswith(
        "s (mixer 'swa') and the baseline t (mixer 'ttt') both trained from seed=0"
    )


# -- innerloop eval's result says how to make it again ---------------------------------------------------


@pytest.mark.slow  # reason: two evaluations of a tiny run (Lightning): seconds in a cold process
def test_eval_writes_how_to_reproduce_it_and_the_command_does(tmp_path) -> None:
    """``innerloop eval`` wrote its CSV and PNG and nothing saying which checkpoint content, windows,
    versions or command made them (compare's .md has said so since s56l); ``eval_<...>.md`` says it now,
    and its command scores the same windows to the same numbers."""
    from lm_testing import untrained_run

    from innerloop.checkpoints import checkpoint_content_digest
    from innerloop.cli import _parser
    from innerloop.train.run import evaluate

    corpus = tmp_path / "corpus.py"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(60)))
    run = untrained_run(tmp_path / "run", corpus, "ttt", 0, 8, 2, 1)
    metrics, csv_path, _ = evaluate(run / "last.safetensors", seq_len=8, batches=1, out_dir=tmp_path / "out")
    record = csv_path.with_suffix(".md").read_text()
    reproduce = record[record.index("Reproduce:") :]
    assert checkpoint_content_digest(run / "last.safetensors")[:16] in reproduce
    args = _parser().parse_args(shlex.split(reproduce.split("`innerloop ", 1)[1].split("`", 1)[0]))
    again, *_ = evaluate(
        args.checkpoint, args.data, args.seq_len, args.batch_size, args.batches, out_dir=args.out,
        no_ttt=args.no_ttt, split=args.split, held_out=args.held_out,
    )  # fmt: skip
    assert again == metrics and csv_path.with_suffix(".md").read_text() == record


def test_a_config_file_error_names_the_option_on_the_command_line(tmp_path, capsys) -> None:
    """LOW: ``innerloop train --config bad.yaml`` said "file 'bad.yaml' is not valid YAML", naming the file
    but not the option (its other errors, a missing file or a folder, say ``--config``)."""
    from innerloop.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert f"error: --config file {str(bad)!r} is not valid YAML: " in capsys.readouterr().err
