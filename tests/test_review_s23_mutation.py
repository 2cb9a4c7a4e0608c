"""Review s23, mutation testing of the changes e7060a6^..22fd42d: each test here kills a mutant of a changed
line that no earlier test pinned (/work/notes/review_s23_mutation.md has the table of mutants).

Every test passes on the code as it is, and fails on the mutant named in its comment."""

from __future__ import annotations

import errno
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

for _variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_variable, "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).parent / "hf"))

# ------------------------------------------------------------------------------------------------------
# innerloop/checkpoints.py
# ------------------------------------------------------------------------------------------------------


def _checkpoint(path: Path, seed: int = 0, seq_len: int = 16, mixer: str = "ttt") -> Path:
    """A small checkpoint as a run writes it (untrained weights)."""
    from innerloop.config.load import load_config
    from innerloop.train.checkpoint import save_checkpoint
    from innerloop.train.module import LanguageModelModule

    overrides = [
        "model.hidden_size=16", "model.num_heads=2", "model.num_layers=1", "model.intermediate_size=32",
        f"model.mixer={mixer}", "model.ttt.mini_batch_size=4" if mixer == "ttt" else "model.window=4",
        f"data.seq_len={seq_len}", f"out_dir={path.parent}",
    ]  # fmt: skip
    run, _ = load_config("tiny", overrides)
    torch.manual_seed(seed)
    module = LanguageModelModule(model=asdict(run.model), seq_len=seq_len)
    tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}
    save_checkpoint(tree, path)
    return path


# mutant ck_digest_filehash: checkpoint_content_digest hashing the whole file even where the metadata
# holds the checksum (identities then changed with metadata no checksum covers, e.g. the innerloop version)
def test_checkpoint_identity_is_the_metadata_checksum(tmp_path) -> None:
    from safetensors import safe_open

    from innerloop.checkpoints import checkpoint_content_digest, checkpoint_identity
    from innerloop.data.atomic import file_sha256

    path = _checkpoint(tmp_path / "last.safetensors")
    with safe_open(str(path), framework="pt") as f:
        recorded = f.metadata()["innerloop.sha256"]
    assert recorded != file_sha256(path)
    assert checkpoint_content_digest(path) == recorded
    assert checkpoint_identity(path) == f"last-{recorded[:8]}"


# ------------------------------------------------------------------------------------------------------
# innerloop/data/atomic.py
# ------------------------------------------------------------------------------------------------------


# mutant at_other_tmp: the temporary file (removed already) named as the file the error was about
def test_an_error_about_the_temporary_names_the_target_only(tmp_path) -> None:
    from innerloop.data.atomic import atomic_write

    def write(temporary: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", temporary)

    target = tmp_path / "out.bin"
    with pytest.raises(OSError) as raised:
        atomic_write(target, write)
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename is None
    assert str(target) in str(raised.value) and ".tmp" not in str(raised.value)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------------
# innerloop/hf/modeling.py: save_pretrained staged
# ------------------------------------------------------------------------------------------------------


def _moves_out_of_staging(monkeypatch) -> list[str]:
    """The names save_pretrained moves out of its staging folder, in order."""
    moved: list[str] = []
    replace = os.replace

    def recording(src, dst, *args, **kwargs):
        if Path(src).parent.name.startswith(".innerloop-saving-"):
            moved.append(Path(src).name)
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", recording)
    return moved


# mutant hf_config_first: config.json moved in first (a save stopped after it leaves the new config beside
# the earlier weights), not last
def test_save_pretrained_moves_config_json_in_last(tmp_path, monkeypatch) -> None:
    from hf_testing import tiny_hf_model

    moved = _moves_out_of_staging(monkeypatch)
    tiny_hf_model("ttt_linear").save_pretrained(tmp_path)
    assert "config.json" in moved and "model.safetensors" in moved
    assert moved[-1] == "config.json"


def _shards(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", p.name)
    )


# mutants hf_no_stale_shards, hf_no_stale_index: a save over a sharded one keeps the earlier save's
# shards (and index) that it did not write
def test_save_pretrained_removes_the_earlier_saves_shards_and_index(tmp_path) -> None:
    from hf_testing import tiny_hf_model

    from innerloop.hf import InnerloopForCausalLM

    tiny_hf_model("ttt_linear", seed=0).save_pretrained(tmp_path, max_shard_size="20KB")
    many = _shards(tmp_path)
    assert len(many) > 2
    new = tiny_hf_model("ttt_linear", seed=1)
    new.save_pretrained(tmp_path, max_shard_size="10MB")  # one file: model.safetensors
    assert _shards(tmp_path) == []
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert (tmp_path / "model.safetensors").is_file()
    loaded = InnerloopForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in new.state_dict().items())
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith(".innerloop-saving-")
    ]  # mutant hf_no_rmtree


def test_a_sharded_save_over_one_with_more_shards_keeps_only_its_own(tmp_path) -> None:
    from hf_testing import tiny_hf_model

    tiny_hf_model("ttt_linear", seed=0).save_pretrained(tmp_path, max_shard_size="20KB")
    many = _shards(tmp_path)
    tiny_hf_model("ttt_linear", seed=1).save_pretrained(tmp_path, max_shard_size="60KB")
    fewer = _shards(tmp_path)
    assert 1 < len(fewer) < len(many)
    total = {name.rsplit("-of-", 1)[1] for name in fewer}
    assert len(total) == 1  # every shard of one save


# mutant hf_forget_folder: the export's record compared with the folder's files before the save's replace
# them (unchanged, so the record kept the earlier weights' checksum and from_pretrained refused the new ones)
def test_save_pretrained_over_an_export_loads_the_saved_weights(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from innerloop.hf.export import export_model
    from innerloop.models import ModelConfig, build_model
    from innerloop.models.config import TTTConfig

    config = ModelConfig(
        mixer="ttt", backbone="transformer", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
        ttt=TTTConfig(inner_model="linear", mini_batch_size=16),
    )  # fmt: skip
    folder = tmp_path / "export"
    export_model(build_model(config), folder, tokenizer=None)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    model.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------------
# innerloop/train/compare.py
# ------------------------------------------------------------------------------------------------------


def _model(name: str, parameters: int = 1000, seq_len: int | None = 16):
    return SimpleNamespace(
        name=name,
        parameters=parameters,
        tokens_trained=None,
        module=SimpleNamespace(hparams={"seq_len": seq_len}),
    )


# mutant cmp_size_baseline: the tolerance taken of the baseline's count, not of the smaller: a model 5%
# smaller than the baseline went unnamed while the baseline 5% smaller than it was named
def test_size_note_is_the_same_whichever_model_is_the_baseline() -> None:
    from innerloop.train.compare import size_notes

    big, small = _model("big", 100_000), _model("small", 95_000)
    assert len(size_notes([big, small], 0)) == 1
    assert len(size_notes([small, big], 0)) == 1
    near = _model("near", 95_500)  # 4.5% of the smaller: within the tolerance either way
    assert size_notes([big, near], 0) == [] and size_notes([near, big], 0) == []


# mutant cmp_len_ge: a model scored at exactly the length it trained at named as scored past it
def test_length_note_only_past_the_trained_length() -> None:
    from innerloop.train.compare import _length_notes

    models = [_model("a", seq_len=16), _model("b", seq_len=32)]
    assert _length_notes(models, [16]) == []
    notes = _length_notes(models, [8, 17, 32])
    assert len(notes) == 1 and "a trained at data.seq_len=16" in notes[0] and "T=17, 32" in notes[0]


# ------------------------------------------------------------------------------------------------------
# innerloop/train/data.py
# ------------------------------------------------------------------------------------------------------


# mutant data_empty_any: --data refused as empty when any one of its files is empty, not every one
def test_data_with_one_empty_file_among_others_is_read(tmp_path) -> None:
    from innerloop.train.data import DataError, evaluation_examples

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "text.txt").write_text("some words to read as windows " * 40)
    inputs, _ = evaluation_examples([str(tmp_path / "empty.txt"), str(tmp_path / "text.txt")], 16, 4)
    assert inputs.shape == (4, 16)
    with pytest.raises(DataError, match="the file is empty"):
        evaluation_examples([str(tmp_path / "empty.txt")], 16, 4)


# ------------------------------------------------------------------------------------------------------
# Gaps the review left (its "Gaps left" list), pinned after it
# ------------------------------------------------------------------------------------------------------


def test_nan_input_under_ignore_spreads_through_delta_chunk_without_raising() -> None:
    # mutant delta_nan (kernels/delta_chunk/adapter.py): a NaN decay not masked before the range check
    # raised "decay must lie in [0, 1]" for a layer that asked to let NaN through
    from innerloop.core.family_layers import GatedDeltaNetLayer

    torch.manual_seed(0)
    layer = GatedDeltaNetLayer(16, 2, non_finite="ignore")
    x = torch.randn(2, 12, 16)
    x[1, 3, 5] = float("nan")
    with torch.no_grad():
        y, _ = layer(x)
    assert {path for path, _ in layer.dispatches} == {"delta_chunk"}, layer.dispatches
    assert torch.isfinite(y[0]).all()  # the other sequence is untouched
    assert torch.isnan(y[1, 3:]).any()  # the NaN spreads within its own sequence


def test_the_build_sweep_leaves_a_locked_temporary_and_removes_an_abandoned_one(tmp_path: Path) -> None:
    # mutant build_sweep_all (kernels/cpu/build.py): the sweep removed the temporaries of live builds too
    fcntl = pytest.importorskip("fcntl", reason="file locks are POSIX; elsewhere nothing is swept")
    from innerloop.kernels.cpu.build import ABANDONED_AFTER_SECONDS, _remove_abandoned_builds

    live, abandoned = tmp_path / ".build-live.so", tmp_path / ".build-dead.so"
    # review s38d: a build's temporary is created, then locked: in between, another build's sweep removed
    # it; an unlocked temporary is now swept only once it is older than ABANDONED_AFTER_SECONDS
    starting = tmp_path / ".build-starting.so"
    for path in (live, abandoned, starting):
        path.write_bytes(b"x")
    long_ago = time.time() - 2 * ABANDONED_AFTER_SECONDS
    for path in (live, abandoned):
        os.utime(path, (long_ago, long_ago))
    handle = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running build holds its temporary
        _remove_abandoned_builds(tmp_path)
        assert live.exists()
        assert starting.exists()  # just made, not locked yet
        assert not abandoned.exists()
    finally:
        os.close(handle)


def test_no_conv_kernel_warning_for_family_layers_or_models_that_read_it(
    recwarn: pytest.WarningsRecorder,
) -> None:
    # mutants family_conv_true (core/family_layers.py) and mcfg_conv (models/config.py): a warning that
    # conv_kernel is ignored without share_qk, where the family layers and the model config read it
    from innerloop.core.family_layers import GatedDeltaNetLayer
    from innerloop.models import ModelConfig, build_model

    GatedDeltaNetLayer(16, 2, conv_kernel=2)
    build_model(
        ModelConfig(
            mixer="ttt", hidden_size=16, num_heads=2, num_layers=1, ttt={"conv_kernel": 2, "share_qk": False}
        )
    )
    assert not [str(w.message) for w in recwarn if "conv_kernel" in str(w.message)]


def test_an_empty_local_rank_is_not_a_launched_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    # mutant cfg_worker_empty (config/trainer_args.py): LOCAL_RANK="" counted as a worker's rank
    from innerloop.config.trainer_args import is_launched_worker

    monkeypatch.setenv("LOCAL_RANK", "")
    monkeypatch.setenv("NODE_RANK", "")
    assert not is_launched_worker()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert is_launched_worker()


def test_a_name_tag_keeps_accented_letters_without_their_accents() -> None:
    """s45d's LOW: the tags naming evaluated data and checkpoints in output file names dropped non-ASCII
    letters (``ünïcode – dash`` became ``n-code-dash``); their accents are dropped instead, the rest as before."""
    from innerloop.checkpoints import name_tag

    assert name_tag("ünïcode – dash", "data") == "unicode-dash"
    assert name_tag("modèle final.v2", "ckpt") == "modele-final.v2"
    assert name_tag("日本語", "data") == "data"  # no letter with an ASCII base: the fallback, as before
    assert name_tag("-x" * 30, "data") == ("x-" * 20)[:40]  # the 40-character cut, as before
