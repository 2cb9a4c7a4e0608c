"""Review s30f: work made with older innerloop versions loads, resumes and reads the same today.

Checked by hand against three older commits (f0fcc64, 6f610ee, f8a345f; report in the session's notes):
their runs resume, evaluate, generate and export as they did. What is kept here is what was wrong: an
export written before 084afb3 (the export's tokenizer reading text as the run did) loads silently, while
its tokenizer reads a special token's text as the token and adds a template's start token, so
``AutoTokenizer``'s ids are not those ``innerloop generate`` (and the run) read.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the Hugging Face export needs transformers")

from innerloop.models import ModelConfig, build_model  # noqa: E402


def _bos_tokenizer_json() -> str:
    """A small byte-level BPE whose template adds a start token ``<s>`` (id 0), as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["def f(x): return x + 1\n" * 50, "hello world " * 50], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tokenizer.to_str()


def _export(tmp_path: Path) -> tuple[Path, Path, str]:
    from innerloop.checkpoints import save_checkpoint
    from innerloop.cli import main

    tokenizer_json = _bos_tokenizer_json()
    config = ModelConfig(hidden_size=32, num_heads=2, num_layers=1, intermediate_size=32, vocab_size=300)
    network = build_model(config).eval()
    checkpoint = save_checkpoint(
        {
            "hyper_parameters": {"model": config.to_dict()},
            "state_dict": {f"model.{key}": value for key, value in network.state_dict().items()},
            "tokenizer": {"kind": "huggingface", "tokenizer_json": tokenizer_json, "eos_token": "</s>"},
        },
        tmp_path / "last.safetensors",
    )
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(checkpoint), str(tmp_path / "hf")]) == 0
    return checkpoint, tmp_path / "hf", tokenizer_json


def _as_written_before_084afb3(folder: Path, tokenizer_json: str) -> None:
    """Rewrite the export's tokenizer files as innerloop export wrote them before 084afb3 (the tokenizer
    as trained, no split_special_tokens), with the export's record as that export wrote it (version 1)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from innerloop.data.atomic import file_sha256

    old = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), eos_token="</s>")
    old.save_pretrained(folder)
    record_path = folder / "innerloop_export.json"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = folder / name
        record["files"][name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    record["version"] = 1
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


@pytest.mark.slow  # ~2 s: trains a tokenizer, exports and loads a model, three times
def test_an_export_whose_tokenizer_reads_text_otherwise_than_the_run_is_named_on_load(tmp_path) -> None:
    """Found with an export of f0fcc64 loaded today: its AutoTokenizer read 'a<|endoftext|>b' as
    [65, 0, 66] where innerloop generate reads [65, 28, 92, ...] (the text), and a Llama tokenizer's
    export adds <s> to every prompt; nothing said so. Loading it now warns, naming the re-export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from innerloop.checkpoints import checkpoint_tokenizer

    checkpoint, folder, tokenizer_json = _export(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # today's export loads without a warning
        AutoModelForCausalLM.from_pretrained(folder)
    _as_written_before_084afb3(folder, tokenizer_json)
    run = checkpoint_tokenizer(checkpoint)
    assert AutoTokenizer.from_pretrained(folder)("def f").input_ids != run.encode("def f")  # the old reading
    with pytest.warns(UserWarning, match=r"tokenizer.*--overwrite") as caught:
        AutoModelForCausalLM.from_pretrained(folder)
    assert str(folder) in str(caught[0].message)
    with contextlib.redirect_stdout(io.StringIO()):  # the remedy the warning names
        from innerloop.cli import main

        assert main(["export", str(checkpoint), str(folder), "--overwrite"]) == 0
    assert AutoTokenizer.from_pretrained(folder)("def f</s>x").input_ids == run.encode("def f</s>x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.slow  # ~0.5 s
def test_todays_export_of_a_tokenizer_folder_as_transformers_loads_it_is_not_warned_of(tmp_path) -> None:
    """``--tokenizer FOLDER`` writes the folder as transformers loads it, split_special_tokens or not
    (the user's choice): such an export, of record version 2, is not an earlier one."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from innerloop.cli import main

    checkpoint, folder, tokenizer_json = _export(tmp_path)
    given = tmp_path / "given"
    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json), eos_token="</s>"
    ).save_pretrained(given)
    assert "split_special_tokens" not in json.loads((given / "tokenizer_config.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(checkpoint), str(folder), "--overwrite", "--tokenizer", str(given)]) == 0
    assert "split_special_tokens" not in json.loads((folder / "tokenizer_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.slow  # ~0.5 s
def test_a_tokenizer_config_edited_by_the_user_is_theirs_and_not_warned_of(tmp_path) -> None:
    """Only the export's own, unchanged tokenizer_config.json is read as an earlier export's: a user
    who edited it (changed since the record) chose what it says."""
    from transformers import AutoModelForCausalLM

    _, folder, tokenizer_json = _export(tmp_path)
    _as_written_before_084afb3(folder, tokenizer_json)
    path = folder / "tokenizer_config.json"
    path.write_text(path.read_text(encoding="utf-8").replace("{", '{"comment": "mine",', 1), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoModelForCausalLM.from_pretrained(folder)
