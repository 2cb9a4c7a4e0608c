"""The tokenizer of a converted model: ``innerloop convert`` records the one ``--tokenizer`` names, or
that it is unknown; ``generate``, ``eval`` and ``export`` follow it (docs/huggingface.md, "Converting
the reference's models"). A vocabulary's size does not say which tokenizer a model reads, so a
converted model is never taken as byte-level unless told."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from innerloop.checkpoints import TOKENIZER_KEY, checkpoint_tokenizer, load_checkpoint
from innerloop.cli import main
from innerloop.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    TokenizerError,
    load_tokenizer,
    tokenizer_from_state,
    train_bpe,
)

REFERENCE = "ttt_mlp_mamba"  # vocabulary 300
CORPUS = ["def f(x):\n    return x * 2\n", "the quick brown fox jumps over the lazy dog\n" * 8]


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def converted(reference_models_dir: Path, tmp_path_factory) -> Path:
    """A reference model converted without --tokenizer: its checkpoint."""
    out = tmp_path_factory.mktemp("converted")
    assert main(["convert", "ttt-lm-pytorch", str(reference_models_dir / REFERENCE), str(out)]) == 0
    return out / "last.safetensors"


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A byte-level BPE of at most 300 tokens (the reference model's vocabulary), as a folder."""
    folder = tmp_path_factory.mktemp("bpe")
    train_bpe(CORPUS, 290).save_pretrained(folder)
    return folder


def test_a_converted_checkpoint_records_that_its_tokenizer_is_unknown(converted: Path, capsys) -> None:
    from innerloop.data.tokenizer import UnknownTokenizer

    assert load_checkpoint(converted).get(TOKENIZER_KEY) == {"kind": "unknown"}
    tokenizer = checkpoint_tokenizer(converted)
    assert isinstance(tokenizer, UnknownTokenizer) and tokenizer == tokenizer_from_state({"kind": "unknown"})
    with pytest.raises(TokenizerError, match="records no tokenizer .* --tokenizer"):
        tokenizer.encode("hello")


def test_an_older_training_checkpoint_without_a_tokenizer_is_still_byte_level(tmp_path: Path) -> None:
    from innerloop.models import ModelConfig, build_model
    from innerloop.train.module import save_model_checkpoint

    path = save_model_checkpoint(
        build_model(ModelConfig(hidden_size=16, num_heads=2)), tmp_path / "old.safetensors"
    )
    assert TOKENIZER_KEY not in load_checkpoint(path)
    assert checkpoint_tokenizer(path) == ByteTokenizer()


def test_generate_and_eval_refuse_text_for_an_unknown_tokenizer(
    converted: Path, tmp_path: Path, capsys
) -> None:
    code, out, err = _run(capsys, "generate", converted, "--prompt", "hello", "--tokens", "3")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "records no tokenizer" in err and "--tokenizer" in err and str(converted) in err
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    code, out, err = _run(capsys, "eval", converted, "--data", text, "--out", tmp_path / "ev")
    assert code == 2 and err.count("\n") == 1 and "records no tokenizer" in err
    assert not (tmp_path / "ev").exists()


@pytest.mark.slow  # 0.5 s
def test_eval_and_compare_on_the_default_windows_refuse_an_unknown_tokenizer(
    converted: Path, tmp_path: Path, capsys
) -> None:
    code, _, err = _run(
        capsys, "eval", converted, "--batches", "1", "--batch-size", "1", "--out", tmp_path / "e"
    )
    assert code == 2 and err.count("\n") == 1 and "records no tokenizer" in err
    code, _, err = _run(capsys, "compare", converted, converted, "--out", tmp_path / "c", "--batches", "1")
    assert code == 2 and err.count("\n") == 1 and "records no tokenizer" in err


def test_convert_records_the_tokenizer_it_is_given(
    reference_models_dir: Path, bpe_dir: Path, tmp_path: Path, capsys
) -> None:
    source = reference_models_dir / REFERENCE
    code, out, err = _run(capsys, "convert", "ttt-lm-pytorch", source, tmp_path / "b", "--tokenizer", "bytes")
    assert code == 0, err
    assert "tokenizer: bytes" in out
    assert checkpoint_tokenizer(tmp_path / "b" / "last.safetensors") == ByteTokenizer()
    code, out, err = _run(
        capsys, "generate", tmp_path / "b" / "last.safetensors", "--prompt", "def ", "--tokens", "3"
    )
    assert code == 0 and out.startswith("def "), err

    # innerloop's own BPE has its one special token at 0: the reference config's bos 1 and eos 2 are
    # ordinary tokens of it, which convert says (the model converts all the same)
    with pytest.warns(UserWarning, match=r"\(its config\) is the ordinary token") as caught:
        code, out, err = _run(
            capsys, "convert", "ttt-lm-pytorch", source, tmp_path / "t", "--tokenizer", bpe_dir
        )
    assert code == 0, err
    assert [str(w.message).split(" (its config)")[0] for w in caught] == [
        "the converted model's bos_token_id=1",
        "the converted model's eos_token_id=2",
    ]
    recorded = checkpoint_tokenizer(tmp_path / "t" / "last.safetensors")
    assert recorded == load_tokenizer(str(bpe_dir))
    code, out, err = _run(
        capsys, "generate", tmp_path / "t" / "last.safetensors", "--prompt", "def f", "--tokens", "3"
    )
    assert code == 0 and out.startswith("def f"), err


def test_a_tokenizer_folder_without_tokenizer_json_is_recorded_in_its_fast_form(
    bpe_dir: Path, tmp_path: Path
) -> None:
    """A GPT-2-style folder (vocab.json, merges.txt): what transformers' AutoTokenizer loads is recorded."""
    pytest.importorskip("transformers")
    from innerloop.data.tokenizer import tokenizer_from_source

    model = json.loads((bpe_dir / "tokenizer.json").read_text())["model"]
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "add_prefix_space": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    recorded = tokenizer_from_source(str(folder))
    expected = load_tokenizer(str(bpe_dir))
    assert isinstance(recorded, HFTokenizer) and recorded.eos_token == "<|endoftext|>"
    for text in [*CORPUS, "héllo ☃"]:
        assert recorded.encode(text) == expected.encode(text)
    assert tokenizer_from_state(json.loads(json.dumps(recorded.to_state()))) == recorded


def test_a_tokenizer_folder_without_a_vocabulary_is_refused(tmp_path: Path) -> None:
    """A folder holding only tokenizer_config.json (its vocabulary files not copied in): transformers
    made a tokenizer of its end-of-text token alone, which was recorded (every text encoded as no ids)."""
    pytest.importorskip("transformers")
    from innerloop.data.tokenizer import tokenizer_from_source

    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "GPT2Tokenizer"}')
    with pytest.raises(
        TokenizerError, match=r"^--tokenizer=.*has no vocabulary .*\['tokenizer_config.json'\]"
    ):
        tokenizer_from_source(str(tmp_path))


def test_convert_refuses_a_tokenizer_the_model_cannot_read(
    reference_models_dir: Path, tmp_path: Path, capsys
) -> None:
    big = tmp_path / "big"
    train_bpe([" ".join(f"w{i}" for i in range(2000))], 400).save_pretrained(big)
    source = reference_models_dir / REFERENCE
    code, _, err = _run(capsys, "convert", "ttt-lm-pytorch", source, tmp_path / "o", "--tokenizer", big)
    assert code == 2 and err.count("\n") == 1 and "but the model's vocabulary has 300" in err
    code, _, err = _run(
        capsys, "convert", "ttt-lm-pytorch", source, tmp_path / "o", "--tokenizer", tmp_path / "x"
    )
    assert code == 2 and err.count("\n") == 1 and "--tokenizer=" in err
    assert not (tmp_path / "o" / "last.safetensors").exists()


def test_convert_writes_the_checkpoint_save_model_checkpoint_writes_plus_the_tokenizer(
    converted: Path, reference_models_dir: Path, tmp_path: Path
) -> None:
    from innerloop.interop.ttt_lm_pytorch import load_model
    from innerloop.train.module import save_model_checkpoint

    plain = load_checkpoint(
        save_model_checkpoint(load_model(reference_models_dir / REFERENCE), tmp_path / "p")
    )
    ours = load_checkpoint(converted)
    assert ours.pop(TOKENIZER_KEY, None) == {"kind": "unknown"}
    assert ours.keys() == plain.keys() and ours["hyper_parameters"] == plain["hyper_parameters"]
    assert ours["state_dict"].keys() == plain["state_dict"].keys()
    for key, tensor in plain["state_dict"].items():
        assert ours["state_dict"][key].dtype == tensor.dtype and torch.equal(
            ours["state_dict"][key], tensor
        ), key


def test_export_of_an_unknown_tokenizer_writes_none_and_takes_tokenizer(
    converted: Path, tmp_path: Path, capsys
) -> None:
    code, out, err = _run(capsys, "export", converted, tmp_path / "hf")
    assert code == 0, err
    assert "no tokenizer: the checkpoint records none" in out
    assert (
        not list((tmp_path / "hf").glob("tokenizer*"))
        and not (tmp_path / "hf" / "special_tokens_map.json").exists()
    )
    code, out, err = _run(capsys, "export", converted, tmp_path / "hf2", "--tokenizer", "bytes")
    assert code == 0, err
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "hf2")("hi").input_ids == [104, 105]


def test_export_of_a_byte_checkpoint_too_small_for_bytes_points_at_tokenizer(tmp_path: Path, capsys) -> None:
    """An older conversion (recording none, read as bytes) of a 200-token model: --tokenizer gives its own."""
    from innerloop.models import ModelConfig, build_model
    from innerloop.train.module import save_model_checkpoint

    model = build_model(ModelConfig(hidden_size=16, num_heads=2, vocab_size=200))
    path = save_model_checkpoint(model, tmp_path / "old.safetensors")
    code, _, err = _run(capsys, "export", path, tmp_path / "hf")
    assert code == 2 and err.count("\n") == 1 and "--tokenizer" in err and "bytes" in err
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(199)} | {"[UNK]": 199}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tmp_path / "words.json"))  # the model's own: 200 words
    code, _, err = _run(capsys, "export", path, tmp_path / "hf", "--tokenizer", tmp_path / "words.json")
    assert code == 0, err
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
