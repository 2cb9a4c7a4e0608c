"""Review s57o: models compiled with torch.compile (their ``_orig_mod.`` names) through every save and
load path: each writes and reads the uncompiled model's names, so a compiled and an uncompiled model read
each other's files, bitwise."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import innerloop.checkpoints as checkpoints
from innerloop.checkpoints import load_checkpoint, load_model, load_weights, save_checkpoint
from innerloop.models import ModelConfig, build_model
from innerloop.train import LanguageModelModule
from innerloop.train.module import save_model_checkpoint

CONFIG = ModelConfig(hidden_size=16, num_heads=2, num_layers=2, intermediate_size=16, vocab_size=32)


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A model and a copy of it whose second block (or the whole model) is compiled: lazily, with the eager
    backend (nothing compiles: the names, not the compilation, are under test)."""
    torch.manual_seed(0)
    plain = build_model(CONFIG)
    torch.manual_seed(1)
    partly = build_model(CONFIG)
    partly.blocks[1] = torch.compile(partly.blocks[1], backend="eager")
    return plain, partly


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ours, theirs = checkpoints.plain_names(a.state_dict()), checkpoints.plain_names(b.state_dict())
    assert list(ours) == list(theirs)
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name


@pytest.mark.slow  # torch.compile's first call imports torch._dynamo: seconds
def test_load_weights_reads_across_compiled_and_plain_names():
    """load_weights refused a compiled model's own state_dict for an uncompiled model, and the reverse
    (missing and unexpected ``_orig_mod.`` weights)."""
    plain, partly = _models()
    whole = torch.compile(build_model(CONFIG), backend="eager")
    load_weights(whole, partly.state_dict())  # a block's _orig_mod. names into a whole compiled model
    _assert_same_weights(whole, partly)
    load_weights(partly, plain.state_dict())
    _assert_same_weights(partly, plain)
    fresh = build_model(CONFIG)
    load_weights(fresh, whole.state_dict())
    _assert_same_weights(fresh, whole)


@pytest.mark.slow  # torch.compile's first call imports torch._dynamo: seconds
def test_save_model_checkpoint_of_a_compiled_model_loads_as_the_plain_one(tmp_path):
    """save_model_checkpoint of torch.compile(model), or of a model with one block compiled, failed
    (load_state_dict's missing/unexpected keys); it writes the plain names, which load bitwise."""
    plain, partly = _models()
    for given in (partly, torch.compile(plain, backend="eager")):
        path = save_model_checkpoint(given, tmp_path / "model.ckpt")
        assert not any("_orig_mod" in key for key in load_checkpoint(path)["state_dict"])
        _assert_same_weights(load_model(path), given)


@pytest.mark.slow  # torch.compile's first call imports torch._dynamo: seconds
def test_a_checkpoint_with_orig_mod_names_loads_and_none_is_written(tmp_path, monkeypatch):
    """A file whose weights carry ``_orig_mod.`` (an earlier innerloop's, a module.state_dict() of a
    compiled model given to save_checkpoint) loads as the plain names; save_checkpoint writes none."""
    plain, partly = _models()
    module = LanguageModelModule(CONFIG)
    module.model = partly
    names = dict(module.model.state_dict())
    state = {"model." + key: value for key, value in names.items()}
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": state}
    written = save_checkpoint(checkpoint, tmp_path / "new.ckpt")
    assert not any("_orig_mod" in key for key in load_checkpoint(written)["state_dict"])
    monkeypatch.setattr(checkpoints, "plain_names", lambda state_dict, where="": dict(state_dict))
    old = save_checkpoint(checkpoint, tmp_path / "old.ckpt")  # as an earlier innerloop wrote it
    monkeypatch.undo()
    _assert_same_weights(load_model(old), partly)
    loaded = LanguageModelModule.load_from_checkpoint(old)
    _assert_same_weights(loaded.model, partly)


@pytest.mark.slow  # torch.compile's first call imports torch._dynamo: seconds
def test_a_lightning_module_loads_orig_mod_names_into_plain_and_compiled_models():
    """LanguageModelModule.load_state_dict of a state dict with ``_orig_mod.`` names (a user's
    torch.save(compiled.state_dict()) of an earlier version) into an uncompiled module: refused before."""
    plain, partly = _models()
    source = LanguageModelModule(CONFIG)
    source.model = torch.compile(partly, backend="eager")
    raw = {"model._orig_mod." + key: value for key, value in partly.state_dict().items()}
    target = LanguageModelModule(CONFIG)
    target.load_state_dict(raw)
    _assert_same_weights(target.model, partly)
    compiled = LanguageModelModule(CONFIG)
    compiled.model = torch.compile(build_model(CONFIG), backend="eager")
    compiled.load_state_dict(raw)
    _assert_same_weights(compiled.model, partly)


@pytest.mark.slow  # torch.compile's first call imports torch._dynamo, and Lightning's loader: seconds
def test_load_from_checkpoint_reads_a_pickled_ckpt_with_orig_mod_names(tmp_path):
    """Lightning's own ``.ckpt`` (pickled), written by an earlier innerloop from a module whose model was
    compiled (``model._orig_mod.*``): load_from_checkpoint refused it ('does not fit')."""
    import lightning as L

    plain, partly = _models()
    module = LanguageModelModule(CONFIG)
    raw = {"model._orig_mod." + key: value for key, value in partly.state_dict().items()}
    torch.save(
        {
            "hyper_parameters": dict(module.hparams),
            "state_dict": raw,
            "pytorch-lightning_version": L.__version__,
        },
        tmp_path / "old.ckpt",
    )
    _assert_same_weights(LanguageModelModule.load_from_checkpoint(tmp_path / "old.ckpt").model, partly)


def test_plain_names_refuses_two_weights_of_one_name():
    """A state dict that names one weight both ways (``a._orig_mod.w`` and ``a.w``) cannot be read
    without dropping one: refused, naming it."""
    state = {"a._orig_mod.w": torch.zeros(1), "a.w": torch.ones(1)}
    with pytest.raises(ValueError, match=r"'a.w'.*both"):
        checkpoints.plain_names(state)


def _hf_with_a_compiled_block() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """An InnerloopForCausalLM (byte vocabulary, so it exports) whose second block is compiled, and its
    weights under the uncompiled names."""
    from innerloop.hf.export import to_hugging_face

    torch.manual_seed(0)
    wrapped = to_hugging_face(build_model(replace(CONFIG, vocab_size=256)))
    weights = {key: value.clone() for key, value in wrapped.state_dict().items()}
    wrapped.model.blocks[1] = torch.compile(wrapped.model.blocks[1], backend="eager")
    return wrapped, weights


def _assert_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(weights)
    for name, value in weights.items():
        assert torch.equal(state[name], value), name


@pytest.mark.slow  # torch.compile's first call imports torch._dynamo, and transformers: seconds
def test_hugging_face_save_and_export_of_a_model_with_a_compiled_block_load_bitwise(tmp_path):
    """save_pretrained of a model with a compiled block wrote ``blocks.1._orig_mod.*`` names, which
    from_pretrained refused ('a config.json edited by hand?'); export_model of such a CausalLM failed
    with a KeyError. Both write the uncompiled names, which load bitwise."""
    from innerloop.hf import InnerloopForCausalLM
    from innerloop.hf.export import export_model

    wrapped, weights = _hf_with_a_compiled_block()
    wrapped.save_pretrained(tmp_path / "saved")
    _assert_weights(InnerloopForCausalLM.from_pretrained(tmp_path / "saved"), weights)
    export_model(wrapped.model, tmp_path / "exported")
    _assert_weights(InnerloopForCausalLM.from_pretrained(tmp_path / "exported"), weights)


@pytest.mark.slow  # torch.compile's first call imports torch._dynamo, and transformers: seconds
def test_from_pretrained_reads_a_folder_whose_weights_carry_orig_mod(tmp_path):
    """A folder saved from a compiled model by an earlier innerloop (names ``model.blocks.1._orig_mod.*``,
    ``model._orig_mod.*``) loads under the uncompiled names, bitwise: refused before."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from innerloop.hf import InnerloopForCausalLM

    wrapped, weights = _hf_with_a_compiled_block()
    wrapped.save_pretrained(tmp_path)
    (file,) = tmp_path.glob("*.safetensors")
    with safe_open(file, "pt") as handle:
        metadata = handle.metadata()
    renamed = {
        key.replace("blocks.1.", "blocks.1._orig_mod.").replace("model.norm", "model._orig_mod.norm"): value
        for key, value in load_file(file).items()
    }
    assert sum("_orig_mod" in key for key in renamed) > 1
    save_file(renamed, file, metadata=metadata)
    _assert_weights(InnerloopForCausalLM.from_pretrained(tmp_path), weights)
