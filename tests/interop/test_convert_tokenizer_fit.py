"""``innerloop convert --tokenizer`` checks that the tokenizer can be the converted model's: a bos/eos id
of its config that the tokenizer lacks is refused (a Llama-2 tokenizer for a model of Llama-3's ids),
one that is an ordinary token of it, or a tokenizer covering under half the vocabulary, is warned about
(the TTT-E2E inner loss skips the bos id as a document start; generate stops at eos)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from innerloop.cli import main

DATA = Path(__file__).resolve().parents[1] / "data" / "e2e"
CONFIG = json.loads((DATA / "config.json").read_text(encoding="utf-8"))  # vocabulary 256, bos 1, eos 2

pytestmark = pytest.mark.usefixtures("tensorstore")


@pytest.fixture
def tensorstore() -> None:
    pytest.importorskip("tensorstore", reason="the e2e extra (tensorstore) is part of the test extra")


def word_level(path: Path, words: list[str], specials: list[str]) -> Path:
    """A tokenizer.json whose ids are ``words`` in order, then ``[UNK]``; ``specials`` marked special
    (at their ids among ``words``, else after them)."""
    vocabulary = {word: i for i, word in enumerate(words)}
    tokenizer = Tokenizer(WordLevel({**vocabulary, "[UNK]": len(words)}, unk_token="[UNK]"))
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(path))
    return path


def config_with(tmp_path: Path, **model) -> Path:
    config = json.loads(json.dumps(CONFIG))
    config["model"].update(model)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def convert(tmp_path: Path, config: Path, tokenizer: Path, *options: str) -> int:
    out = tmp_path / "out"
    return main(["convert", "ttt-e2e", str(DATA / "checkpoint"), str(config), str(out), "--tokenizer", str(tokenizer), *options])  # fmt: skip


@pytest.mark.slow  # ~1.1 s: the official checkpoint converted twice; moved out of the fast loop, at its one-minute limit
@pytest.mark.parametrize("options", [(), ("--format", "hf")])
def test_a_bos_id_the_tokenizer_lacks_is_refused(tmp_path, capsys, options) -> None:
    words = [f"w{i}" for i in range(200)]
    tokenizer = word_level(tmp_path / "t.json", words, ["<s>", "</s>"])  # at 201 and 202
    config = config_with(tmp_path, bos_token_id=240, eos_token_id=201)
    assert convert(tmp_path, config, tokenizer, *options) == 2
    error = capsys.readouterr().err
    assert "the converted model's bos_token_id=240 (its config) is no id of --tokenizer" in error
    assert (
        not (tmp_path / "out" / "last.safetensors").exists()
        and not (tmp_path / "out" / "config.json").exists()
    )


def converted_warnings(tmp_path: Path, tokenizer: Path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert convert(tmp_path, config_with(tmp_path), tokenizer) == 0
    return [str(w.message) for w in caught if "tokenizer" in str(w.message)]


def test_a_bos_or_eos_id_that_is_an_ordinary_token_is_warned_about(tmp_path) -> None:
    words = ["<pad>", "a", "b", *(f"w{i}" for i in range(200))]  # ids 1 and 2: the words 'a' and 'b'
    tokenizer = word_level(tmp_path / "t.json", words, ["<|begin_of_text|>"])
    bos, eos = converted_warnings(tmp_path, tokenizer)  # 204 of 256 ids: not under half
    assert "bos_token_id=1 (its config) is the ordinary token 'a' of --tokenizer" in bos
    assert "eos_token_id=2 (its config) is the ordinary token 'b' of --tokenizer" in eos


def test_the_tokenizer_a_model_was_trained_with_converts_quietly(tmp_path) -> None:
    words = ["<unk0>", "<s>", "</s>", *(f"w{i}" for i in range(200))]  # bos 1 and eos 2: the specials
    assert converted_warnings(tmp_path, word_level(tmp_path / "t.json", words, ["<s>", "</s>"])) == []


def test_a_tokenizer_covering_under_half_the_vocabulary_is_warned_about(tmp_path) -> None:
    tokenizer = word_level(tmp_path / "t.json", ["<unk0>", "<s>", "</s>", "a", "b"], ["<s>", "</s>"])
    (warning,) = converted_warnings(tmp_path, tokenizer)
    assert "has 6 ids (special tokens aside) for a vocabulary of 256" in warning


def test_special_tokens_past_the_vocabulary_are_warned_about(tmp_path) -> None:
    """An export's tokenizer named an end-of-text id (257) the model of 256 ids cannot produce."""
    words = ["<unk0>", "<s>", "</s>", *(f"w{i}" for i in range(250))]  # ids 0-252, [UNK] 253
    tokenizer = word_level(tmp_path / "t.json", words, ["<s>", "</s>", "<pad>", "<eot>", "<sep>", "<x>"])
    (warning,) = converted_warnings(tmp_path, tokenizer)  # <pad> 254, <eot> 255: inside; 256, 257: past
    assert "has special tokens past the model's vocabulary of 256 ('<sep>' = 256, '<x>' = 257)" in warning
