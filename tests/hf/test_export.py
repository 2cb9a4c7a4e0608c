"""``innerloop export`` and ``innerloop convert ttt-lm-pytorch --format hf``: the folder, its logits,
its tokenizer, and the refusals (a non-empty or foreign OUT_DIR, a bad checkpoint)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hf_testing import MODEL_KINDS
from safetensors.torch import load_file

import innerloop  # noqa: F401 (registers the Auto classes)
from innerloop.cli import main
from innerloop.hf.export import export_model
from innerloop.models import ModelConfig, build_model
from innerloop.train.module import load_model, save_model_checkpoint

FILES = {
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "configuration_innerloop.py",
    "modeling_innerloop.py",
    "innerloop_export.json",  # the files the export wrote (tests/hf/test_export_overwrite.py)
}


def checkpoint_of(kind: str, folder: Path) -> Path:
    """A training checkpoint (as `innerloop train` writes one) of a tiny model of ``kind``."""
    torch.manual_seed(0)
    return save_model_checkpoint(
        build_model(ModelConfig.from_dict(MODEL_KINDS[kind])), folder / "last.safetensors"
    )


@pytest.mark.parametrize("kind", ["ttt_linear", "ttt_mlp_mamba_untied"])
def test_export_gives_innerloops_logits_through_the_auto_classes(kind: str, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    checkpoint = checkpoint_of(kind, tmp_path)
    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == FILES
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = load_model(checkpoint)(ids)
        logits = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert (logits - expected).abs().max().item() <= 1e-5


def test_an_e2e_model_exports_with_its_float64_buffer(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(MODEL_KINDS["e2e"])).eval()
    out = export_model(model, tmp_path / "exported")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.model.outer_progress.dtype == torch.float64
    ids = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids)[0]).abs().max().item() <= 1e-5


def test_a_bfloat16_model_exports_in_bfloat16(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = build_model(ModelConfig.from_dict(MODEL_KINDS["swa"])).to(torch.bfloat16).eval()
    loaded = AutoModelForCausalLM.from_pretrained(export_model(model, tmp_path / "exported"))
    assert loaded.dtype == torch.bfloat16
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids)[0])


def test_the_exported_tokenizer_is_innerloops_bytes(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    assert main(["export", str(checkpoint_of("swa", tmp_path)), str(tmp_path / "out")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in ["def f(x):\n\treturn x  # ok", "héllo wörld ☃ 😀", "\x00\x01 \r\n", ""]:
        ids = tokenizer(text)["input_ids"]
        assert ids == list(text.encode("utf-8")), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.vocab_size == 256 and (tokenizer.eos_token, tokenizer.eos_token_id) == (
        "<|endoftext|>",
        256,
    )


def test_a_non_empty_out_dir_is_refused_and_an_export_replaced_only_with_overwrite(
    tmp_path: Path, capsys
) -> None:
    checkpoint = checkpoint_of("swa", tmp_path)
    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["export", str(checkpoint), str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is not empty; pass --overwrite" in error
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["export", str(checkpoint), str(out), "--overwrite"]) == 0
    assert {p.name for p in out.iterdir()} == FILES


def test_overwrite_never_replaces_a_folder_of_other_files(tmp_path: Path, capsys) -> None:
    checkpoint = checkpoint_of("swa", tmp_path)
    # the run's own folder holds the checkpoint: exporting into it would delete the run
    assert main(["export", str(checkpoint), str(tmp_path), "--overwrite"]) == 2
    assert "holds files that are not an innerloop export" in capsys.readouterr().err
    assert checkpoint.is_file()


def test_overwrite_keeps_what_a_user_added_to_an_earlier_export(tmp_path: Path, capsys) -> None:
    checkpoint = checkpoint_of("swa", tmp_path)
    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), str(out)]) == 0
    (out / "NOTES.md").write_text("my eval notes")
    (out / "results").mkdir()
    (out / "results" / "r.txt").write_text("1")
    capsys.readouterr()
    assert main(["export", str(checkpoint), str(out), "--overwrite"]) == 0
    assert "kept in it (not written by the export): NOTES.md, results/" in capsys.readouterr().out
    assert (out / "NOTES.md").read_text() == "my eval notes"
    assert (out / "results" / "r.txt").read_text() == "1"
    assert {p.name for p in out.iterdir()} == FILES | {"NOTES.md", "results"}
    # every file the export wrote with the usual permissions
    mask = os.umask(0)
    os.umask(mask)
    assert {(out / name).stat().st_mode & 0o777 for name in FILES} == {0o666 & ~mask}


def test_a_file_as_out_dir_and_a_bad_checkpoint_are_one_line_errors(tmp_path: Path, capsys) -> None:
    checkpoint = checkpoint_of("swa", tmp_path)
    assert main(["export", str(checkpoint), str(checkpoint)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    assert main(["export", str(broken), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "broken.safetensors" in error
    assert not (tmp_path / "out").exists()


def test_an_out_dir_that_is_a_symbolic_link_loop_is_named_so(tmp_path: Path, capsys) -> None:
    checkpoint = checkpoint_of("swa", tmp_path)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert main(["export", str(checkpoint), str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is a symbolic link loop" in error


def test_an_out_dir_that_cannot_be_made_is_one_line_and_nothing_is_written(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """It was a FileExistsError traceback (a path under a file) or a PermissionError one (a folder this
    user cannot write)."""
    checkpoint = checkpoint_of("swa", tmp_path / "ck")
    (tmp_path / "afile").write_text("mine")
    assert main(["export", str(checkpoint), str(tmp_path / "afile" / "x")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert (
        f"OUT_DIR='{tmp_path}/afile/x' is not a directory (its parent '{tmp_path}/afile' is a file)" in error
    )
    # (a permission test with chmod cannot fail for root, so the permission answer is what is faked)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert main(["export", str(checkpoint), str(locked / "x")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert f"OUT_DIR='{locked}/x' cannot be written: '{locked}' is not writable by this user" in error
    (locked / "empty").mkdir()  # an existing folder: the export is assembled in its parent
    assert main(["export", str(checkpoint), str(locked / "empty")]) == 2
    assert f"is assembled beside it, in '{locked}', which this user cannot write" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"
    assert sorted(p.name for p in locked.iterdir()) == ["empty"] and not any((locked / "empty").iterdir())


def test_convert_to_hf_under_a_file_is_one_line_naming_out(
    reference_models_dir: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "afile").write_text("mine")
    source = str(reference_models_dir / "ttt_linear_transformer")
    assert main(["convert", "ttt-lm-pytorch", source, str(tmp_path / "afile" / "x"), "--format", "hf"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert f"OUT='{tmp_path}/afile/x' is not a directory (its parent '{tmp_path}/afile' is a file)" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_interrupted_export_leaves_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    from innerloop.hf import export

    model = build_model(ModelConfig.from_dict(MODEL_KINDS["swa"]))
    out = export_model(model, tmp_path / "exported")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_tokenizer_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # the half-made folder is gone


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path: Path) -> None:
    from innerloop.hf.export import ExportError
    from innerloop.hf.tokenizer import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "bytes")
    model = build_model(ModelConfig.from_dict({**MODEL_KINDS["swa"], "vocab_size": 200}))
    with pytest.raises(
        ExportError,
        match=r"the tokenizer has ids up to 255 \(special tokens aside\) but the model's vocabulary has 200",
    ):
        export_model(model, tmp_path / "out", tokenizer=tmp_path / "bytes")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_folder_without_a_vocabulary_is_refused(tmp_path: Path) -> None:
    """A folder holding only a tokenizer_config.json (its tokenizer.json not copied in) made transformers
    build a tokenizer with an empty vocabulary: the export wrote it (every text encoded as no ids) and
    its unknown token's id 0 as generation_config's eos_token_id."""
    from innerloop.hf.export import ExportError

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"tokenizer_class": "GPT2Tokenizer"}')
    model = build_model(ModelConfig.from_dict(MODEL_KINDS["swa"]))
    with pytest.raises(ExportError, match=r"has no vocabulary .*\['tokenizer_config.json'\].*tokenizer.json"):
        export_model(model, tmp_path / "out", tokenizer=tmp_path / "tok")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["ttt_linear_transformer", "ttt_mlp_mamba"])
def test_convert_to_hf_reproduces_the_reference_logits(
    name: str, reference_models_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    assert (
        main(["convert", "ttt-lm-pytorch", str(reference_models_dir / name), str(out), "--format", "hf"]) == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "innerloop" and config["model"]["vocab_size"] == 300
    assert not (out / "tokenizer.json").exists()  # the reference's tokenizer is not ours to write
    # the reference's special token ids, for transformers' generate (which stops at EOS)
    reference = json.loads((reference_models_dir / name / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for key in ("bos_token_id", "eos_token_id"):
        assert config[key] == generation[key] == reference[key], key
    expected = load_file(str(reference_models_dir / name / "expected.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, reference_logits = expected["input_ids"], expected["logits"]
    with torch.no_grad():
        result = model(ids, labels=ids)
        generated = model.generate(ids[:, :13], max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert (result.logits - reference_logits).abs().max().item() < 1e-5  # measured 2.0e-6 and 9.5e-7 (s56e)
    # the loss of labels= and greedy decoding, against the reference's logits (review s49l)
    reference_loss = torch.nn.functional.cross_entropy(
        reference_logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
    )
    assert abs(result.loss.item() - reference_loss.item()) < 1e-5  # measured 0 and 4.8e-7
    top = reference_logits[:, 12].topk(2, dim=-1).values
    assert (top[:, 0] - top[:, 1]).min() > 1e-3  # decided by far more than the logits' error
    assert torch.equal(generated[:, 13], reference_logits[:, 12].argmax(-1))


def test_convert_to_hf_refuses_a_non_empty_out(reference_models_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    source = str(reference_models_dir / "ttt_linear_transformer")
    assert main(["convert", "ttt-lm-pytorch", source, str(tmp_path), "--format", "hf", "--overwrite"]) == 2
    assert "not an innerloop export" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
