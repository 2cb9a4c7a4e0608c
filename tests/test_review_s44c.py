"""Review s44c: an adversarial look at session 43's changes (git diff 1a6d449..32d24ef).

Covered: core/functional.py's saved-tensor stack functions and their callers (an exception inside the
suspended block, threads, nested reentrant and non-reentrant checkpoints with save_on_cpu, a hook that
raises outside, torch.compile; a checkpointed primal-form model still holds less than one not
checkpointed); attend under bf16/fp16 CPU autocast (gradients bit-equal to SDPA's own, plain, checkpointed
and under save_on_cpu, with float and bool masks, is_causal and scale, retain_graph twice); head_counts
against the divisors of every width to 3000 and the head-split and weights-fit messages; data.name=hf's
compressed files (truncated, corrupt and not compressed .gz/.bz2/.xz of json, csv and text, streaming or
not: one DataError naming the file); ``innerloop tokenizer train``'s records, slices, mixes and --raw;
first_document_of at tiny fractions and at val_fraction 1 (tests/train/test_test_fraction.py); resume
commands read back by the override parser, not only by the shell; an override's value PyYAML cannot scan;
InnerloopConfig's views set together by update / update_from_string, and a vocabulary or token id set
below a special token id; compressed files read whole as text (tokenizer train, text runs, eval --data).
Found right and left: the registry, per-token-gradient, default-gradient, E2E and first-use callers under
nested checkpoints; a non-reentrant checkpoint of mini-batch GD layers keeps the per-token gradients'
tensors (4 TTT-MLP layers: 69.5 MB against 177.5 MB unchecked and 0.2 MB reentrant, as documented).
"""

from __future__ import annotations

import shlex

import pytest

from innerloop.config.load import ConfigError, load_config, read_out_dir
from innerloop.train.run import resume_command


@pytest.mark.parametrize(
    "out_dir",
    [
        "runs/x #2",
        "1e3",
        "true",
        "runs/a: b",
        "runs/tab\tx",
        "runs/${oc.env:HOME}",
        "runs/it's 'q'",
        "rüns/a b",
        "runs/a\\${x}",  # s44e: a backslash before ${ (OmegaConf's escape) is doubled
        "runs/a\\\\${x}",
    ],
)
def test_a_resume_command_names_its_out_dir_to_the_override_parser_too(out_dir) -> None:
    """The shell-quoted ``out_dir=...`` of a resume command was read by the override parser as YAML: ``runs/x
    #2`` as ``runs/x`` (another run's folder), ``true`` and ``1e3`` as other values, a tab or ``a: b`` as an
    error, and ``${...}`` resolved; its value is quoted for YAML where it needs it, so the command resumes
    that run."""
    argv = shlex.split(resume_command(out_dir, " optim.lr=<lower>"))
    assert argv[:3] == ["innerloop", "train", "--resume"] and argv[4:] == ["optim.lr=<lower>"]
    assert read_out_dir("tiny", [argv[3]]) == out_dir
    assert resume_command("runs/a b") == "innerloop train --resume 'out_dir=runs/a b'"  # plain: as it was


def test_an_override_value_pyyaml_cannot_scan_is_one_config_error() -> None:
    """OmegaConf read ``out_dir=a<TAB>b``, and the check of its value's kind then raised PyYAML's bare
    ScannerError (a traceback from ``innerloop train``)."""
    with pytest.raises(
        ConfigError, match=r"override 'out_dir=a\\tb' cannot be parsed: found character '\\t'"
    ):
        read_out_dir("tiny", ["out_dir=a\tb"])


def test_config_overrides_that_change_the_width_and_heads_together_are_taken() -> None:
    """run_clm.py's ``--config_overrides hidden_size=30,num_attention_heads=3`` (and ``config.update``) set
    the views one at a time: from 64 and 4, 30 with 4 heads (or 64 with 3) was refused, whatever the order."""
    from innerloop.hf.configuration import InnerloopConfig

    config = InnerloopConfig(model={"hidden_size": 64, "num_heads": 4, "vocab_size": 300})
    config.update_from_string("hidden_size=30,num_attention_heads=3")
    assert (config.hidden_size, config.num_attention_heads, config.model["num_heads"]) == (30, 3, 3)
    config.update({"num_attention_heads": 4, "hidden_size": 64})
    assert (config.hidden_size, config.num_attention_heads) == (64, 4)
    assert not any(key.startswith("_innerloop") for key in config.to_dict())
    with pytest.raises(ValueError, match=r"model.hidden_size=30 must be divisible by model.num_heads=4"):
        config.update({"hidden_size": 30})  # alone, still no model
    assert config.hidden_size == 64


def test_a_vocabulary_cut_below_a_special_token_id_is_refused_when_set() -> None:
    """``config.vocab_size = 100`` with ``eos_token_id=250`` was taken, and save_pretrained then wrote a
    config.json that from_pretrained refused; refused when set now (the config unchanged), and a vocabulary
    set together with its token ids (``update``) is checked once both are."""
    from innerloop.hf.configuration import InnerloopConfig

    config = InnerloopConfig(model={"hidden_size": 32, "num_heads": 2, "vocab_size": 300}, eos_token_id=250)
    with pytest.raises(ValueError, match=r"eos_token_id=250 must be a token id in \[0, 100\)"):
        config.vocab_size = 100
    assert config.vocab_size == 300 and InnerloopConfig.from_dict(config.to_dict()).model == config.model
    with pytest.raises(ValueError, match=r"pad_token_id=300 must be a token id in \[0, 300\)"):
        config.pad_token_id = 300
    assert config.pad_token_id is None
    config.update({"vocab_size": 100, "eos_token_id": 50})
    assert (config.vocab_size, config.eos_token_id) == (100, 50)
    with pytest.raises(ValueError, match=r"eos_token_id=100 must be a token id in \[0, 100\)"):
        config.update({"eos_token_id": 100, "pad_token_id": 5})
    assert (config.eos_token_id, config.pad_token_id) == (50, None)  # the update's token ids put back


def test_a_compressed_file_read_whole_as_text_is_named_compressed(tmp_path, capsys) -> None:
    """``innerloop tokenizer train notes.txt.gz`` (a text file, read whole) and ``--raw corpus.jsonl.gz``
    said only "is not UTF-8 text (invalid start byte at byte 1)" of a gzip file; the one line says it is
    compressed now."""
    import gzip

    from innerloop.cli import main

    text, records = tmp_path / "notes.txt.gz", tmp_path / "corpus.jsonl.gz"
    text.write_bytes(gzip.compress(b"notes " * 50))
    records.write_bytes(gzip.compress(b'{"text": "notes"}\n' * 50))
    argv = ["tokenizer", "train", "--vocab-size", "300", "--out", str(tmp_path / "tok")]
    for given in ([str(text)], ["--raw", str(records)]):
        assert main([*argv, *given]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not UTF-8 text" in err and "compressed (.gz)" in err, err


def test_a_text_run_refuses_a_compressed_file_it_would_read_as_text(tmp_path) -> None:
    """A data.name=text run read ``notes.txt.gz`` as it is: a byte-level model trained on the gzip bytes
    without a word (and ``innerloop eval --data`` scored them); refused by name now, in the config's
    checks and where the files are read."""
    import gzip
    import random

    from innerloop.data.text import DataError, read_tokens

    words = random.Random(0).choices(["alpha", "beta", "gamma", "delta"], k=20000)
    packed, plain = tmp_path / "notes.txt.gz", tmp_path / "more.txt"
    packed.write_bytes(gzip.compress(" ".join(words).encode()))
    plain.write_text(" ".join(words))
    with pytest.raises(ConfigError, match=r"data.paths file '.*notes.txt.gz' is compressed \(.gz\)"):
        load_config(
            "tiny", ["data.name=text", f"data.paths=[{packed},{plain}]", f"out_dir={tmp_path / 'out'}"]
        )
    with pytest.raises(DataError, match=r"--data file '.*notes.txt.gz' is compressed \(.gz\)"):
        read_tokens([packed], None, option="--data")
