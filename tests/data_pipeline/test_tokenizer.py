"""Tokenizers (innerloop.data.tokenizer): the byte-level default equals its Hugging Face form exactly,
trained BPEs are deterministic and load in transformers, bad specs are one clear error naming
data.tokenizer, and a run's model vocabulary, checkpoint, eval, generate and resume follow its tokenizer."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lm_testing import TINY  # the tiny model and run of the end-to-end tests

from innerloop.cli import main
from innerloop.config import load_config
from innerloop.config.load import ConfigError
from innerloop.data.tokenizer import (
    END_OF_TEXT,
    ByteTokenizer,
    HFTokenizer,
    TokenizerError,
    byte_level_tokenizer_json,
    load_tokenizer,
    tokenizer_from_state,
    train_bpe,
)
from innerloop.train import load_checkpoint, train
from innerloop.train.checkpoint import TOKENIZER_KEY, CheckpointError, checkpoint_tokenizer, save_checkpoint
from innerloop.train.run import _RecordTokenizer

TEXTS = [
    "",
    "hello world",
    "naïve café — 日本語 🎉\n\ttabs  and  spaces ",
    "\x00NUL and Ā (U+0100, the byte alphabet's NUL) and ĠĊ",
    "def f(x):\n    return x ** 2\n",
]


def _corpus(folder: Path) -> Path:
    """A few small Python-like files (UTF-8) to train tokenizers and models on."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        body = "".join(
            f"def function_{i}_{j}(value):\n    return value * {j} + {i}  # café\n" for j in range(30)
        )
        (folder / f"module_{i}.py").write_text(body, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A 300-token BPE trained by `innerloop tokenizer train` on a small corpus."""
    root = tmp_path_factory.mktemp("bpe")
    corpus = _corpus(root / "corpus")
    assert main(["tokenizer", "train", "--vocab-size", "300", "--out", str(root / "tok"), str(corpus)]) == 0
    return root / "tok"


# -- the byte tokenizer and its Hugging Face form --------------------------------------------------------


@functools.cache
def _byte_level_backend():
    from tokenizers import Tokenizer

    return Tokenizer.from_str(byte_level_tokenizer_json())


@given(st.text(max_size=60))
def test_the_byte_tokenizer_json_encodes_every_text_to_its_utf8_bytes_and_back(text: str) -> None:
    backend = _byte_level_backend()
    ids = backend.encode(text, add_special_tokens=False).ids
    assert ids == list(text.encode("utf-8")) == ByteTokenizer().encode(text)
    assert backend.decode(ids) == text == ByteTokenizer().decode(ids)


def test_autotokenizer_loads_the_saved_byte_tokenizer_as_the_same_tokenizer(tmp_path) -> None:
    from transformers import AutoTokenizer

    written = ByteTokenizer().save_pretrained(tmp_path)
    assert {p.name for p in written} == {"tokenizer.json", "tokenizer_config.json"}
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == 257 and loaded.vocab_size == 256  # the bytes and, past them, the end of text
    assert loaded.eos_token == END_OF_TEXT and loaded.eos_token_id == 256
    for text in TEXTS:
        ids = ByteTokenizer().encode(text)
        assert loaded.encode(text, add_special_tokens=False) == ids
        assert loaded.decode(ids) == text
    assert loaded.convert_ids_to_tokens(list(range(256))) == list(
        json.loads(byte_level_tokenizer_json())["model"]["vocab"]
    )


# -- trained BPE ------------------------------------------------------------------------------------------


def test_a_trained_bpe_is_deterministic_has_its_vocabulary_and_loads_in_transformers(
    bpe_dir, tmp_path
) -> None:
    from transformers import AutoTokenizer

    again = tmp_path / "again"
    assert (
        main(
            ["tokenizer", "train", "--vocab-size", "300", "--out", str(again), str(bpe_dir.parent / "corpus")]
        )
        == 0
    )
    assert (again / "tokenizer.json").read_bytes() == (bpe_dir / "tokenizer.json").read_bytes()

    tokenizer = load_tokenizer(str(bpe_dir))
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.vocab_size == 300
    assert tokenizer.eos_id == 0 and tokenizer.eos_token == END_OF_TEXT
    loaded = AutoTokenizer.from_pretrained(bpe_dir)
    assert loaded.eos_token == END_OF_TEXT and len(loaded) == 300
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert loaded.encode(text, add_special_tokens=False) == ids
        assert tokenizer.decode(ids) == text == loaded.decode(ids)
    assert len(tokenizer.encode("def function_1_2(value):")) < len("def function_1_2(value):")  # merges


def test_a_tokenizer_json_file_alone_and_its_state_give_the_same_tokenizer(bpe_dir) -> None:
    folder, file = load_tokenizer(str(bpe_dir)), load_tokenizer(str(bpe_dir / "tokenizer.json"))
    assert folder == file  # the eos token comes from the special <|endoftext|> without a config
    state = json.loads(json.dumps(folder.to_state()))  # what a checkpoint's JSON tree holds
    assert tokenizer_from_state(state) == folder
    assert tokenizer_from_state(None) == ByteTokenizer() == tokenizer_from_state({"kind": "bytes"})


def test_tokenizer_train_refuses_an_existing_tokenizer_and_a_vocabulary_below_the_bytes(
    bpe_dir, capsys
) -> None:
    corpus = str(bpe_dir.parent / "corpus")
    assert main(["tokenizer", "train", "--vocab-size", "300", "--out", str(bpe_dir), corpus]) == 2
    assert "tokenizer_config.json' exist; pass --overwrite" in capsys.readouterr().err  # both files
    assert main(["tokenizer", "train", "--vocab-size", "256", "--out", str(bpe_dir / "x"), corpus]) == 2
    assert "--vocab-size: must be an integer >= 258, got '256'" in capsys.readouterr().err
    with pytest.raises(TokenizerError, match="vocab_size=100 must be >= 258"):
        train_bpe(["text"], 100)


# -- bad specs --------------------------------------------------------------------------------------------


def _bad_specs(tmp_path: Path) -> dict[str, tuple[str, str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    binary = tmp_path / "binary" / "tokenizer.json"
    binary.parent.mkdir()
    binary.write_bytes(b"\xff\xfe\x00")
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "tokenizer.json").write_text(byte_level_tokenizer_json())
    (bad_config / "tokenizer_config.json").write_text("[")
    unknown_eos = tmp_path / "unknown_eos"
    unknown_eos.mkdir()
    (unknown_eos / "tokenizer.json").write_text(byte_level_tokenizer_json())
    (unknown_eos / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    return {
        "hub name": ("gpt2", "neither 'bytes' nor an existing file or folder"),
        "folder without tokenizer.json": (str(empty), "a folder without a tokenizer.json"),
        "invalid JSON": (str(broken), "is not a valid tokenizer.json"),
        "not UTF-8": (str(binary), "cannot be read"),
        "bad tokenizer_config.json": (str(bad_config), "is not readable JSON"),
        "eos token not in the vocabulary": (str(unknown_eos), "'</s>' is not in its vocabulary"),
    }


def test_every_bad_tokenizer_spec_is_one_error_naming_data_tokenizer(tmp_path, capsys) -> None:
    for case, (spec, message) in _bad_specs(tmp_path).items():
        with pytest.raises(TokenizerError, match="data.tokenizer=") as caught:
            load_tokenizer(spec)
        assert message in str(caught.value), case
        assert main(["train", f"data.tokenizer={spec}", f"out_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("innerloop train: error: data.tokenizer=") and "\n" not in err, (case, err)
    assert not (tmp_path / "run").exists()


# -- the run config follows the tokenizer -----------------------------------------------------------------


def test_the_model_vocabulary_follows_the_tokenizer_unless_the_config_sets_one(bpe_dir, tmp_path) -> None:
    run, cfg = load_config("tiny", [f"data.tokenizer={bpe_dir}", f"out_dir={tmp_path}"])
    assert run.model.vocab_size == 300 and cfg.model.vocab_size == 300  # saved as such in config.yaml
    run, _ = load_config("tiny", [f"data.tokenizer={bpe_dir}", "model.vocab_size=320", f"out_dir={tmp_path}"])
    assert run.model.vocab_size == 320  # larger than the tokenizer's is allowed (e.g. padded)
    with pytest.raises(ConfigError, match=r"model.vocab_size=256 is too small for data.tokenizer=.*>= 300"):
        load_config("tiny", [f"data.tokenizer={bpe_dir}", "model.vocab_size=256", f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="does not apply to data.name='recall'"):
        load_config("tiny", ["data.name=recall", f"data.tokenizer={bpe_dir}", f"out_dir={tmp_path}"])
    run, _ = load_config("tiny", [f"out_dir={tmp_path}"])
    assert run.data.tokenizer == "bytes" and run.model.vocab_size == 256  # the default is unchanged


@pytest.mark.slow  # ~1 s: a training run, a resume, an evaluation and a generation
def test_train_eval_generate_and_resume_use_the_runs_tokenizer(bpe_dir, tmp_path, capsys) -> None:
    corpus, out = bpe_dir.parent / "corpus", tmp_path / "run"
    tok_copy = tmp_path / "tok"
    tok_copy.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tok_copy / name).write_bytes((bpe_dir / name).read_bytes())
    overrides = [
        *TINY,
        "trainer.max_steps=2",
        f"data.tokenizer={tok_copy}",
        f"data.paths=[{corpus}]",
        f"out_dir={out}",
    ]
    run, cfg = load_config("tiny", overrides)
    train(run, cfg)
    checkpoint = out / "last.safetensors"
    assert load_checkpoint(checkpoint)[TOKENIZER_KEY] == load_tokenizer(str(bpe_dir)).to_state()
    assert checkpoint_tokenizer(checkpoint) == load_tokenizer(str(bpe_dir))

    assert main(["eval", str(checkpoint), "--data", str(corpus), "--batches", "1", "--batch-size", "2"]) == 0
    assert "nats/token" in capsys.readouterr().out
    assert (
        main(
            ["generate", str(checkpoint), "--prompt", "def function_", "--tokens", "5", "--temperature", "0"]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("def function_")

    # The export carries the run's tokenizer: transformers' AutoTokenizer reads the same ids.
    from transformers import AutoTokenizer

    exported = tmp_path / "hf"
    assert main(["export", str(checkpoint), str(exported)]) == 0
    text = "def function_name(argument):\n    return argument"
    hf_ids = AutoTokenizer.from_pretrained(str(exported), local_files_only=True)(text)["input_ids"]
    assert hf_ids == load_tokenizer(str(bpe_dir)).encode(text)

    eval_dir = tmp_path / "eval"
    capsys.readouterr()

    def evaluated() -> list[str]:  # its own validation windows: what they are, and the perplexity
        assert main(["eval", str(checkpoint), "--batches", "1", "--out", str(eval_dir)]) == 0
        lines = capsys.readouterr().out.splitlines()
        return [line for line in lines if line.startswith(("evaluating ", "perplexity:"))]

    before = evaluated()
    train_bpe(["another corpus, another tokenizer"], 290).save_pretrained(tok_copy)  # the files change
    assert main(["train", f"out_dir={out}", "--resume", "trainer.max_steps=3"]) == 2
    assert "is not the tokenizer" in capsys.readouterr().err
    # eval still reads the run's windows with the tokenizer the model was trained with
    assert evaluated() == before and len(before) == 2


def test_generate_of_a_bpe_model_refuses_a_prompt_that_is_not_utf8_in_one_line(
    bpe_dir, tmp_path, capsys
) -> None:
    """It was a TypeError traceback from the tokenizers library (a byte-level model takes any bytes:
    tests/train/test_cli_errors.py)."""
    import os

    from innerloop.models import ModelConfig, build_model
    from innerloop.train.module import save_model_checkpoint

    tokenizer = load_tokenizer(str(bpe_dir))
    config = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, vocab_size=300)
    checkpoint = save_model_checkpoint(build_model(config), tmp_path / "m.safetensors", tokenizer.to_state())
    prompt = os.fsdecode(b"ab\xff")  # how Python hands such command-line bytes to the program
    assert main(["generate", str(checkpoint), "--prompt", prompt, "--tokens", "2"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    assert (
        "--prompt b'ab\\xff' is not valid UTF-8 (byte 0xff at 2), but the model's tokenizer (a Hugging Face "
        "tokenizer of 300 tokens) reads UTF-8 text: give a UTF-8 prompt"
    ) in error
    assert main(["generate", str(checkpoint), "--prompt", "café", "--tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("café")


def test_a_byte_level_run_records_bytes_and_an_unrecorded_tokenizer_reads_as_bytes(tmp_path) -> None:
    run, _ = load_config("tiny", [f"out_dir={tmp_path}"])
    assert _RecordTokenizer(run).state == {"kind": "bytes"}
    older = save_checkpoint(
        {"state_dict": {}}, tmp_path / "older.safetensors"
    )  # before tokenizers were recorded
    assert checkpoint_tokenizer(older) == ByteTokenizer()
    with pytest.raises(CheckpointError, match="cannot read"):
        checkpoint_tokenizer(
            save_checkpoint({TOKENIZER_KEY: {"kind": "sentencepiece"}}, tmp_path / "odd.safetensors")
        )


def test_the_saved_byte_tokenizer_is_the_one_export_writes(tmp_path) -> None:
    from transformers import AutoTokenizer

    from innerloop.hf.tokenizer import byte_tokenizer

    ByteTokenizer().save_pretrained(tmp_path / "saved")
    byte_tokenizer().save_pretrained(tmp_path / "exported")
    saved, exported = (AutoTokenizer.from_pretrained(tmp_path / name) for name in ("saved", "exported"))
    assert saved.get_vocab() == exported.get_vocab()
    assert saved.eos_token == exported.eos_token == END_OF_TEXT
    for text in [*TEXTS, f"a{END_OF_TEXT}b", END_OF_TEXT]:  # the token's text is read as bytes, as a run does
        assert saved.encode(text) == exported.encode(text) == ByteTokenizer().encode(text)
        assert byte_tokenizer().encode(text) == ByteTokenizer().encode(text)
    assert saved.decode([97, 256]) == exported.decode([97, 256]) == f"a{END_OF_TEXT}"


@pytest.mark.slow  # ~2 s: a training run, then its evaluation and comparison
def test_eval_and_compare_of_a_run_whose_tokenizer_files_are_gone_use_the_recorded_one(
    bpe_dir, tmp_path, capsys
) -> None:
    """eval and compare failed on data.tokenizer's missing folder (a run moved to another machine),
    though the checkpoint records the tokenizer: they built the run's DataModule only to read seq_len."""
    corpus, out, tok_copy = bpe_dir.parent / "corpus", tmp_path / "run", tmp_path / "tok"
    tok_copy.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tok_copy / name).write_bytes((bpe_dir / name).read_bytes())
    overrides = [*TINY, "trainer.max_steps=2", f"data.tokenizer={tok_copy}", f"data.paths=[{corpus}]"]
    run, cfg = load_config("tiny", [*overrides, f"out_dir={out}"])
    train(run, cfg)
    checkpoint = out / "last.safetensors"
    assert main(["eval", str(checkpoint), "--batches", "1"]) == 0
    before = capsys.readouterr().out
    tok_copy.rename(tmp_path / "tok_moved")
    assert main(["eval", str(checkpoint), "--batches", "1"]) == 0
    after = capsys.readouterr().out
    assert [line for line in after.splitlines() if line.startswith("perplexity")] == [
        line for line in before.splitlines() if line.startswith("perplexity")
    ]
    assert main(["compare", str(out), str(out), "--batches", "1", "--out", str(tmp_path / "cmp")]) == 0
