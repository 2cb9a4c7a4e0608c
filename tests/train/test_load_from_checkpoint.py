"""``LanguageModelModule.load_from_checkpoint``: Lightning's loader also reads innerloop's safetensors
checkpoints (which ``torch.load`` cannot), and still reads Lightning's own pickled ones."""

from __future__ import annotations

import pytest
import torch

from innerloop.checkpoints import is_safetensors_file
from innerloop.train.module import LanguageModelModule, save_model_checkpoint
from tests.lm_testing import tiny_ttt_lm


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = tiny_ttt_lm("mlp")
    return model, save_model_checkpoint(model, tmp_path / "epoch=0-step=6.ckpt")  # Lightning's name


def test_an_innerloop_checkpoint_loads_with_its_weights_and_overrides(saved) -> None:
    model, path = saved
    module = LanguageModelModule.load_from_checkpoint(path, lr=1e-4)
    assert isinstance(module, LanguageModelModule) and module.training  # as Lightning returns it
    assert module.hparams.lr == 1e-4
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(module.model(ids)[0], model(ids)[0])
    on_cpu = LanguageModelModule.load_from_checkpoint(str(path), map_location="cpu")
    assert next(on_cpu.parameters()).device.type == "cpu"


def test_arguments_that_cannot_apply_to_an_innerloop_checkpoint_are_refused(saved, tmp_path) -> None:
    _, path = saved
    with pytest.raises(ValueError, match=r"hparams_file='h.yaml': .* carries its hyperparameters"):
        LanguageModelModule.load_from_checkpoint(path, hparams_file="h.yaml")
    with pytest.raises(ValueError, match=r"strict=False: .* leave strict unset or True"):
        LanguageModelModule.load_from_checkpoint(path, strict=False)
    with pytest.raises(
        ValueError,
        match=r"loaded with max_steps=0 in place of its own: max_steps=0 must be in \[1, 9007199254740992\]",
    ):  # an override is checked
        LanguageModelModule.load_from_checkpoint(path, max_steps=0)


def test_a_pickled_lightning_checkpoint_still_goes_to_lightnings_loader(saved, tmp_path) -> None:
    model, path = saved
    module = LanguageModelModule.load_from_checkpoint(path)
    pickled = tmp_path / "pickled.ckpt"
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
         "pytorch-lightning_version": "2.6.0"},
        pickled,
    )  # fmt: skip
    assert not is_safetensors_file(pickled)
    again = LanguageModelModule.load_from_checkpoint(pickled, weights_only=False)
    for (key, ours), theirs in zip(module.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), key


def test_only_files_that_start_as_safetensors_do_are_recognised(saved, tmp_path) -> None:
    _, path = saved
    assert is_safetensors_file(path)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "short").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{")  # header longer than the file
    (tmp_path / "text").write_bytes(b"hello world, not a checkpoint")
    for name in ("empty", "short", "text", "missing"):
        assert not is_safetensors_file(tmp_path / name), name
    assert not is_safetensors_file(tmp_path)  # a directory
