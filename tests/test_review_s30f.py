"""Review s30f: work made with older innerloop versions loads, resumes and reads the same today.

Checked by hand against three older commits (f0fcc64, 6f610ee, f8a345f; report in the session's notes):
their runs resume, evaluate, generate and export as they did. What is kept here is what was wrong: an
export written before 084afb3 (the export's tokenizer reading text as the run did) loads silently, while
its tokenizer reads a special token's text as the token and adds a template's start token, so
``AutoTokenizer``'s ids are not those ``innerloop generate`` (and the run) read; and a Lightning
checkpoint written inside a gradient accumulation before ed0a2b9 (the rewind on save) resumed today
with the step's first micro-batches lost.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face export needs transformers")

from tokenizer_testing import export_a_checkpoint_with_a_bos_tokenizer  # noqa: E402
from trainer_testing import VALIDATION_INSIDE_AN_ACCUMULATION, user_fit  # noqa: E402


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

    checkpoint, folder, tokenizer_json = export_a_checkpoint_with_a_bos_tokenizer(tmp_path)
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

    checkpoint, folder, tokenizer_json = export_a_checkpoint_with_a_bos_tokenizer(tmp_path)
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

    _, folder, tokenizer_json = export_a_checkpoint_with_a_bos_tokenizer(tmp_path)
    _as_written_before_084afb3(folder, tokenizer_json)
    path = folder / "tokenizer_config.json"
    path.write_text(path.read_text(encoding="utf-8").replace("{", '{"comment": "mine",', 1), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.slow  # three short float64 fits (~1.3 s)
def test_a_checkpoint_an_older_innerloop_wrote_inside_an_accumulation_resumes_as_the_uninterrupted_run(
    tmp_path, monkeypatch
) -> None:
    """f0fcc64 (before the rewind on save, ed0a2b9) wrote a ModelCheckpoint after batch 3 of an
    accumulation of 2 as it was: 3 batches processed. Resumed today it was not rewound: the first step
    took one micro-batch (resumed batches [195, 128, 265, 160, 453], the run's 460 never read) and the
    weights ended 6.6e-3 from the uninterrupted run's, silently. Today's load rewinds it as today's save
    would have."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from innerloop.train import LanguageModelModule

    def fit(ckpt_path=None, callbacks=()) -> tuple[LanguageModelModule, list[int]]:
        return user_fit(tmp_path, 4, VALIDATION_INSIDE_AN_ACCUMULATION, callbacks, ckpt_path)

    whole, whole_batches = fit()
    with monkeypatch.context() as patch:  # the checkpoint as f0fcc64 wrote it: no rewind on save
        patch.setattr(LanguageModelModule, "on_save_checkpoint", L.LightningModule.on_save_checkpoint)
        saved = ModelCheckpoint(
            dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=-1, filename="{step}"
        )
        fit(callbacks=[saved])
    checkpoint = tmp_path / "ckpt" / "step=1.ckpt"  # after batch 3: one micro-batch into step 2
    progress = torch.load(checkpoint, weights_only=False)["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert progress["total"]["processed"] == 3  # as the older innerloop wrote it
    resumed, resumed_batches = fit(ckpt_path=checkpoint)
    assert resumed_batches == whole_batches[2:]
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters(), strict=True))
