"""Review s29b: the Hugging Face integration, the family layers and the CLI, probed through the public
API. Each test is one finding (the commit that fixes it names it)."""

from __future__ import annotations

import os
import re

import pytest
import torch

from innerloop.ops import scan

MATRIX = dict(inner_model="matrix", inner_norm=False, inner_residual=False)


def _qkv_lr(tokens: int = 5) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, tokens, 3, dtype=torch.float64) for _ in range(3))
    return q, k, v, torch.rand(1, 2, tokens, dtype=torch.float64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_scan_refuses_a_non_finite_lr_by_name(bad: float) -> None:
    """A NaN or infinite learning rate ran silently (all outputs and weights NaN), where a non-finite
    decay or momentum is refused by name."""
    q, k, v, lr = _qkv_lr()
    lr[0, 1, 2] = bad
    with pytest.raises(ValueError, match="lr must be finite"):
        scan(q, k, v, lr, **MATRIX)


def test_scan_refuses_a_non_finite_token_scale_by_name() -> None:
    q, k, v, lr = _qkv_lr()
    tau = torch.tensor([1.0, float("nan")], dtype=torch.float64)
    with pytest.raises(ValueError, match="token_scale must be finite"):
        scan(q, k, v, lr, mini_batch_size=2, token_scale=tau, **MATRIX)


def _files_under(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_users_file_kept_in_an_unfinished_export_survives_the_next_export(tmp_path) -> None:
    """An ``--overwrite`` killed between its two renames leaves the user's files in its staging folder.
    When OUT_DIR has taken such a file's name since, the settling keeps the staging folder with the file
    ("stays in its hidden folder", docs/huggingface.md), but it deleted the folder's record of what the
    export wrote: the next settling took every file left there as the export's and deleted the
    user's file (``innerloop export`` settles twice in one command: it checks the target, then writes)."""
    from innerloop.hf.export import export_model
    from innerloop.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=16, num_heads=2, num_layers=1)).eval()
    out = export_model(model, tmp_path / "hf", tokenizer=None)
    (out / "notes.txt").write_bytes(b"the user's notes")
    # The state a SIGKILL between the two renames of `export --overwrite` leaves: the new export staged
    # beside OUT_DIR with the user's notes moved into it, the earlier export renamed aside.
    staging = export_model(model, tmp_path / "new", tokenizer=None)
    os.rename(out / "notes.txt", staging / "notes.txt")
    os.replace(staging, tmp_path / ".hf.qrstuvwx.tmp")
    os.replace(out, tmp_path / ".hf.abcdefgh.old")
    # The user puts the earlier export back as the error of from_pretrained says, and writes new notes.
    os.replace(tmp_path / ".hf.abcdefgh.old", out)
    (out / "notes.txt").write_bytes(b"notes written since")

    export_model(model, out, overwrite=True, tokenizer=None)
    assert b"the user's notes" in _files_under(tmp_path).values()
    export_model(model, out, overwrite=True, tokenizer=None)  # a later export: settles again

    kept = _files_under(tmp_path)
    assert kept["hf/notes.txt"] == b"notes written since"
    assert b"the user's notes" in kept.values(), sorted(kept)


def test_the_settling_line_names_no_empty_list_of_files_moved_back(tmp_path, caplog) -> None:
    """When none of the user's files in an unfinished export could go back (OUT_DIR took every name),
    the line said "moved  back into OUT_DIR" with an empty list."""
    import logging

    from innerloop.hf.export import export_model, settle_interrupted_export
    from innerloop.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=16, num_heads=2, num_layers=1)).eval()
    out = export_model(model, tmp_path / "hf", tokenizer=None)
    staging = export_model(model, tmp_path / "new", tokenizer=None)
    (staging / "notes.txt").write_bytes(b"the user's notes")
    os.replace(staging, tmp_path / ".hf.qrstuvwx.tmp")
    (out / "notes.txt").write_bytes(b"notes written since")
    with caplog.at_level(logging.WARNING, logger="innerloop.hf.export"):
        said = settle_interrupted_export(out)
    assert said == ["kept .hf.qrstuvwx.tmp: it holds notes.txt of yours, whose names OUT_DIR has taken"]
    assert "moved  back" not in caplog.text


def test_from_pretrained_on_a_training_run_folder_says_to_export_it(tmp_path) -> None:
    """``InnerloopForCausalLM.from_pretrained`` on a folder without a config.json (here a training run's,
    ``runs/tiny``: last.safetensors and config.yaml) said "config.json has no 'model' section ... (keys
    found: [])", of a file that does not exist; it names the missing config.json and, for a run, the
    export that makes a Hugging Face folder of it."""
    from innerloop.hf import InnerloopForCausalLM

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.safetensors").write_bytes(b"")
    (run / "config.yaml").write_text("out_dir: run\n")
    with pytest.raises(
        FileNotFoundError, match=r"holds no config\.json.*innerloop export .*last\.safetensors"
    ):
        InnerloopForCausalLM.from_pretrained(run)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"'.*empty' holds no config\.json"):
        InnerloopForCausalLM.from_pretrained(str(empty))


def test_export_names_the_valid_tokenizers_for_a_folder_that_holds_none(tmp_path) -> None:
    """``export --tokenizer FOLDER`` with a folder that holds no tokenizer passed on transformers' message
    (which suggests installing sentencepiece) without saying what the option takes."""
    from innerloop.hf.export import ExportError, export_model
    from innerloop.models import ModelConfig, build_model

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("no tokenizer here")
    model = build_model(ModelConfig(hidden_size=16, num_heads=2, num_layers=1)).eval()
    with pytest.raises(
        ExportError,
        match=r"^tokenizer: .*notes.*valid: 'bytes', a tokenizer\.json file or a tokenizer folder",
    ):
        export_model(model, tmp_path / "hf", tokenizer=notes)
    assert not (tmp_path / "hf").exists()


def test_save_pretrained_refuses_an_empty_path(tmp_path, monkeypatch) -> None:
    """``save_pretrained("")`` saved into the current directory (replacing a config.json or
    model.safetensors there), where transformers' own refuses the empty path: its staged save read
    ``Path("")`` as ``.``."""
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    model = InnerloopForCausalLM(InnerloopConfig(model={"hidden_size": 16, "num_heads": 2, "num_layers": 1}))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text('{"the user\'s": "config"}')
    with pytest.raises(ValueError, match=r"save_directory '' is empty"):
        model.save_pretrained("")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert (tmp_path / "config.json").read_text() == '{"the user\'s": "config"}'


def test_a_users_file_kept_with_a_replaced_export_survives_the_next_export(tmp_path, monkeypatch) -> None:
    """A file added to OUT_DIR while ``--overwrite`` replaced it stays with the earlier export, set aside
    (the export says so). Deleting that export's own files deleted its record too, so the next export
    took the folder as one written before the record existed and deleted every file of it named like a
    model file (here the user's weights shard)."""
    import innerloop.hf.export as export

    torch.manual_seed(0)
    from innerloop.models import ModelConfig, build_model

    model = build_model(ModelConfig(hidden_size=16, num_heads=2, num_layers=1)).eval()
    out = export.export_model(model, tmp_path / "hf", tokenizer=None)
    shard = "model-00001-of-00002.safetensors"
    planned = export._plan_replacement

    def plan_then_a_file_arrives(out_dir, staging):
        plan = planned(out_dir, staging)
        (out_dir / shard).write_bytes(b"the user's weights, saved meanwhile")
        return plan

    monkeypatch.setattr(export, "_plan_replacement", plan_then_a_file_arrives)
    with pytest.raises(export.ExportError, match="added while it was replaced"):
        export.export_model(model, out, overwrite=True, tokenizer=None)
    monkeypatch.setattr(export, "_plan_replacement", planned)
    export.export_model(model, out, overwrite=True, tokenizer=None)  # settles the earlier export set aside
    export.export_model(model, out, overwrite=True, tokenizer=None)
    assert b"the user's weights, saved meanwhile" in _files_under(tmp_path).values()


@pytest.mark.parametrize(
    "special, named",
    [
        ({"eos_token_id": 999}, "eos_token_id=999"),
        ({"bos_token_id": "a"}, "bos_token_id='a'"),
        ({"foo_token_id": 1}, "foo_token_id"),
    ],
)
def test_export_refuses_special_tokens_its_loader_refuses(tmp_path, special, named) -> None:
    """``export_model(special_tokens=...)`` wrote an id past the vocabulary, a string or an unknown name
    into config.json: the folder was written, and ``from_pretrained`` then refused it."""
    from innerloop.hf.export import ExportError, export_model
    from innerloop.models import ModelConfig, build_model

    model = build_model(ModelConfig(hidden_size=16, num_heads=2, num_layers=1)).eval()
    with pytest.raises(ExportError, match=rf"^special_tokens: .*{re.escape(named)}"):
        export_model(model, tmp_path / "hf", special_tokens=special)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_convert_refuses_a_reference_config_whose_token_id_is_past_the_vocabulary(tmp_path, capsys) -> None:
    """``innerloop convert ttt-lm-pytorch SRC OUT --format hf`` with a reference config.json whose
    eos_token_id is past its vocab_size wrote a folder that ``from_pretrained`` refuses."""
    import json
    import shutil
    from pathlib import Path

    from innerloop.cli import main

    source = tmp_path / "reference"
    shutil.copytree(Path(__file__).parent / "data" / "models" / "ttt_mlp_mamba", source)
    config = json.loads((source / "config.json").read_text())
    config["eos_token_id"] = config["vocab_size"]
    (source / "config.json").write_text(json.dumps(config))
    assert main(["convert", "ttt-lm-pytorch", str(source), str(tmp_path / "hf"), "--format", "hf"]) == 2
    error = capsys.readouterr().err
    assert "eos_token_id=300" in error and "config.json" in error, error
    assert not (tmp_path / "hf").exists()


def test_export_model_checks_its_model_and_overwrite_arguments(tmp_path) -> None:
    """``export_model(torch.nn.Linear(2, 2), ...)`` failed with "'Linear' object has no attribute
    'config'", and ``overwrite="no"`` (a string, truthy) replaced an earlier export."""
    from innerloop.hf.export import export_model
    from innerloop.models import ModelConfig, build_model

    with pytest.raises(TypeError, match=r"model must be an innerloop language model .*got Linear"):
        export_model(torch.nn.Linear(2, 2), tmp_path / "hf")
    model = build_model(ModelConfig(hidden_size=16, num_heads=2, num_layers=1)).eval()
    out = export_model(model, tmp_path / "hf", tokenizer=None)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(TypeError, match=r"overwrite must be True or False, got 'no'"):
        export_model(model, out, overwrite="no", tokenizer=None)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_config_from_pretrained_on_a_folder_without_config_json_says_so(tmp_path) -> None:
    """``InnerloopConfig.from_pretrained`` on a folder without config.json (transformers reads it as an
    empty dict) said "config.json has no 'model' section ... (keys found: [])"."""
    from innerloop.hf import InnerloopConfig

    with pytest.raises(ValueError, match=r"no config\.json, or an empty one"):
        InnerloopConfig.from_pretrained(tmp_path)
