"""Review s54g: interrupts (a Ctrl-C's KeyboardInterrupt, raised as the call it lands in returns) at
controlled points of the saves. A ``save_pretrained`` moves its files in ``config.json`` last, so the
earlier save's weight files that the new one replaces by others must be gone by then; the training run's
checkpoint callback records its pending checkpoint before writing it and promotes it once only, so a
Ctrl-C as either rename returns keeps the checkpoint and the config.yaml and says how to resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from innerloop.hf import InnerloopConfig, InnerloopForCausalLM
from innerloop.hf import modeling as hf_modeling

TINY = {
    "hidden_size": 32,
    "num_heads": 2,
    "num_layers": 2,
    "intermediate_size": 48,
    "mixer": "swa",
    "window": 8,
}


def _model(seed: int) -> InnerloopForCausalLM:
    torch.manual_seed(seed)
    return InnerloopForCausalLM(InnerloopConfig(model=TINY)).eval()


@pytest.mark.slow  # two saves and a load of a tiny model: about 0.5 s
def test_a_sharded_save_stopped_once_config_json_is_in_loads_its_own_weights(
    tmp_path: Path, monkeypatch
) -> None:
    """A Ctrl-C during the rename of ``config.json`` (raised when it returns) stopped the save before it
    removed the earlier save's ``model.safetensors``, which transformers loads before the new shards: the
    folder held the new config.json and loaded the earlier weights, silently. Now those files are removed
    before config.json comes in: the folder loads the new weights."""
    folder = tmp_path / "saved"
    _model(seed=0).save_pretrained(folder)  # unsharded: model.safetensors
    new = _model(seed=1)
    replace = os.replace

    def interrupted_once_config_is_in(source, target):  # noqa: ANN001, ANN202
        replace(source, target)
        if Path(target).name == "config.json":
            raise KeyboardInterrupt

    monkeypatch.setattr(hf_modeling.os, "replace", interrupted_once_config_is_in)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(folder, max_shard_size="20KB")
    monkeypatch.undo()
    assert "model-00001-of-00005.safetensors" in {p.name for p in folder.iterdir()}  # sharded indeed
    loaded = InnerloopForCausalLM.from_pretrained(folder).state_dict()
    for name, want in new.state_dict().items():
        assert torch.equal(loaded[name], want), name


@pytest.mark.slow  # a 4-step tiny training run: about 2 s
def test_a_ctrl_c_right_after_the_checkpoint_is_confirmed_stops_the_run_as_any(
    tmp_path: Path, monkeypatch
) -> None:
    """A second Ctrl-C during the rename that makes the pending checkpoint ``last.safetensors`` (raised
    when the rename returns, before the callback forgot the pending file): the callback's
    ``on_exception`` renamed it again, and the run ended in a FileNotFoundError traceback instead of
    :class:`TrainingInterrupted` naming the checkpoint and how to continue."""
    from lm_testing import TINY

    from innerloop.config import load_config
    from innerloop.train import TrainingInterrupted, load_checkpoint, train

    out = tmp_path / "run"
    run, cfg = load_config("tiny", [*TINY, "trainer.max_steps=3", "trainer.threads=1", f"out_dir={out}"])
    replace, interrupted = os.replace, []

    def interrupted_once_promoted(source, target):  # noqa: ANN001, ANN202
        replace(source, target)
        if Path(source).name == ".last.safetensors.pending" and not interrupted:
            interrupted.append(target)
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_once_promoted)
    with pytest.raises(TrainingInterrupted, match="resume"):
        train(run, cfg)
    monkeypatch.undo()
    assert load_checkpoint(out / "last.safetensors")["global_step"] == 2
    assert (out / "config.yaml").is_file()


@pytest.mark.slow  # a tiny training run stopped at its first checkpoint: about 2 s
def test_a_ctrl_c_as_the_first_checkpoint_is_written_keeps_it_and_the_config(
    tmp_path: Path, monkeypatch
) -> None:
    """A second Ctrl-C during the rename that completes the pending checkpoint's write (raised when it
    returns, the file whole) came before the callback recorded the file: it was not promoted, so the
    new run's config.yaml was removed as that of a run without a checkpoint, the whole checkpoint of
    step 2 left beside it, the message saying none was written, and ``--resume`` refused (no config).
    Now the checkpoint is kept as ``last.safetensors`` with the config, and the resume continues."""
    from lm_testing import TINY

    from innerloop.config import load_config
    from innerloop.train import TrainingInterrupted, load_checkpoint, train

    out = tmp_path / "run"
    run, cfg = load_config("tiny", [*TINY, "trainer.max_steps=4", "trainer.threads=1", f"out_dir={out}"])
    replace, interrupted = os.replace, []

    def interrupted_once_written(source, target):  # noqa: ANN001, ANN202
        replace(source, target)
        if Path(target).name == ".last.safetensors.pending" and not interrupted:
            interrupted.append(target)
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_once_written)
    with pytest.raises(TrainingInterrupted, match="resume"):
        train(run, cfg)
    monkeypatch.undo()
    assert load_checkpoint(out / "last.safetensors")["global_step"] == 2
    assert (out / "config.yaml").is_file()
    assert train(*load_config(str(out / "config.yaml"), [], out_dir=str(out)), resume=True) is not None
    assert load_checkpoint(out / "last.safetensors")["global_step"] == 4
