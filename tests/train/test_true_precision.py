"""Runs trained in a ``*-true`` precision (``bf16-true``, ``16-true``, ``64-true``: Lightning casts the
whole model, so the checkpoint holds bfloat16, float16 or float64 weights where a freshly built model
has float32 ones): their checkpoints load for eval, compare and generate (upcast to float32, float64
kept), export in their own dtype, and resume bit-identically; checkpoints that are wrong in other ways
are still refused with their messages."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from lm_testing import TINY, RecordLosses
from safetensors.torch import load_file

from innerloop.checkpoints import CheckpointError, load_checkpoint, load_model, save_checkpoint
from innerloop.cli import main
from innerloop.config import load_config
from innerloop.hf.export import export_checkpoint
from innerloop.models import ModelConfig
from innerloop.train import train
from innerloop.train.module import LanguageModelModule, load_module

LOW = [torch.bfloat16, torch.float16, torch.float64]
"""The dtypes of the ``*-true`` precisions other than ``32-true``."""


def _module(mixer: str = "ttt") -> LanguageModelModule:
    torch.manual_seed(0)
    config = ModelConfig(
        mixer=mixer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, window=4
    )
    return LanguageModelModule(config)


def _true_precision_checkpoint(path: Path, dtype: torch.dtype, mixer: str = "ttt") -> dict[str, torch.Tensor]:
    """The checkpoint of a run whose module Lightning cast to ``dtype`` (as ``*-true`` does: every
    floating tensor; E2E's float64 buffer too before E2ELM kept it float64, as checkpoints of then
    hold it: cast here too, so that those load); returns its state dict."""
    module = _module(mixer).to(dtype=dtype)
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in module.state_dict().items()}
    save_checkpoint({"hyper_parameters": dict(module.hparams), "state_dict": state_dict}, path)
    return state_dict


@pytest.mark.parametrize("mixer", ["ttt", "e2e"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_a_true_precision_checkpoint_loads_upcast_for_use_and_as_stored_for_export(tmp_path, dtype, mixer):
    path = tmp_path / "last.safetensors"
    stored = _true_precision_checkpoint(path, dtype, mixer)
    used = torch.promote_types(dtype, torch.float32)  # bfloat16, float16 -> float32; float64 stays
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))

    for model, prefix in ((load_model(path), "model."), (load_module(path), "")):
        assert not model.training
        for key, tensor in model.state_dict().items():
            expected = stored[prefix + key]
            if key.endswith("outer_progress"):  # E2E's float64 counter stays float64
                assert tensor.dtype == torch.float64
            else:
                assert tensor.dtype == used, key
            assert torch.equal(tensor, expected.to(tensor.dtype)), key  # the stored values, exactly
        with torch.no_grad():
            logits = model(ids)
        logits = logits[0] if isinstance(logits, tuple) else logits
        assert logits.dtype == used and bool(torch.isfinite(logits).all())

    kept = load_model(path, keep_dtype=True)
    for key, tensor in kept.state_dict().items():
        assert tensor.dtype == dtype and torch.equal(tensor, stored["model." + key]), key
    assert kept.lm_head.weight is kept.embed.weight  # tied weights stay tied through the cast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_an_e2e_module_cast_to_low_precision_keeps_its_progress_in_float64(tmp_path, dtype) -> None:
    """(review s22 e2e: the cast rounded it, and with it the inner lr's warm-up.) Its checkpoint holds
    the float64 value, which loads as it is, also with keep_dtype."""
    module = _module("e2e")
    module.model.set_outer_progress(0.3)
    module = module.to(dtype=dtype)
    assert module.model.outer_progress.dtype == torch.float64 and float(module.model.outer_progress) == 0.3
    path = save_checkpoint({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()},
                           tmp_path / "last.safetensors")  # fmt: skip
    for keep_dtype in (False, True):
        model = load_model(path, keep_dtype=keep_dtype)
        assert model.outer_progress.dtype == torch.float64 and float(model.outer_progress) == 0.3


def test_a_float32_checkpoint_loads_as_before(tmp_path) -> None:
    path = tmp_path / "last.safetensors"
    module = _module("e2e")
    save_checkpoint({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    for keep_dtype in (False, True):
        model = load_model(path, keep_dtype=keep_dtype)
        assert {str(t.dtype) for t in model.state_dict().values()} == {"torch.float32", "torch.float64"}
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, module.state_dict()["model." + key])


def test_the_export_of_a_bf16_true_checkpoint_is_bfloat16_and_says_so(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    path = tmp_path / "last.safetensors"
    stored = _true_precision_checkpoint(path, torch.bfloat16)
    out = export_checkpoint(path, tmp_path / "exported")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.dtype == torch.bfloat16
    for key, tensor in loaded.model.state_dict().items():  # the weights exactly as trained
        assert torch.equal(tensor, stored["model." + key]), key
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # close, not equal: the Hugging Face model keeps its RoPE tables in float32
        logits = loaded(ids).logits.float()
        torch.testing.assert_close(logits, load_model(path)(ids)[0], rtol=0, atol=0.02)


def _error(path: Path, load) -> str:
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(repr(str(path)))
    return message


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (  # an integer tensor where a float one is expected: never a precision's doing
            lambda sd: sd.update({"model.norm.weight": torch.ones(16, dtype=torch.int64)}),
            r"1 dtype mismatch\(es\): 'model.norm.weight' is torch.int64, expected torch.float32 "
            r"\(.*was the file edited, or written by another program\?\)",
        ),
        (  # one weight in another floating dtype than the others: no precision writes that
            lambda sd: sd.update({"model.norm.weight": torch.ones(16, dtype=torch.float32)}),
            r"'model.norm.weight' is torch.float32, expected torch.bfloat16 like its other weights",
        ),
        (
            lambda sd: sd.update({"model.norm.weight": torch.ones(8, dtype=torch.bfloat16)}),
            r"1 shape mismatch\(es\): 'model.norm.weight' is \[8\], expected \[16\] "
            r"\(was it written by a run with another model config\?\)",
        ),
        (lambda sd: sd.pop("model.norm.weight"), r"1 missing weight\(s\) \['model.norm.weight'\]"),
        (
            lambda sd: sd.update(extra=torch.zeros(1, dtype=torch.bfloat16)),
            r"1 unexpected weight\(s\) \['extra'\]",
        ),
    ],
    ids=["int-for-float", "mixed-floats", "shape", "missing", "unexpected"],
)
def test_a_wrong_true_precision_checkpoint_is_still_refused(tmp_path, edit, message) -> None:
    path = tmp_path / "last.safetensors"
    module = _module().to(dtype=torch.bfloat16)
    state_dict = module.state_dict()
    edit(state_dict)
    save_checkpoint({"hyper_parameters": dict(module.hparams), "state_dict": state_dict}, path)
    for load in (load_model, load_module, lambda p: load_model(p, keep_dtype=True)):
        error = _error(path, load)
        assert "does not fit the model its hyperparameters describe (mixer='ttt'" in error
        assert re.search(message, error), error


def test_non_finite_bfloat16_weights_are_still_refused(tmp_path) -> None:
    path = tmp_path / "last.safetensors"
    module = _module().to(dtype=torch.bfloat16)
    state_dict = module.state_dict()
    state_dict["model.norm.weight"][3] = float("nan")
    save_checkpoint({"hyper_parameters": dict(module.hparams), "state_dict": state_dict}, path)
    assert "has non-finite weights: 'model.norm.weight' holds 1 NaN" in _error(path, load_model)


# -- whole runs ------------------------------------------------------------------------------------------

STEPS = 6


def _tensors(tree, where: str = ""):
    """``(where, tensor)`` of every tensor in a checkpoint tree (weights, optimizer moments, ...)."""
    if isinstance(tree, torch.Tensor):
        yield where, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{where}/{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _tensors(value, f"{where}/{i}")


def _run(out: Path, precision: str, callbacks=(), resume: bool = False):
    run, cfg = load_config(
        "tiny", [*TINY, f"trainer.max_steps={STEPS}", f"trainer.precision={precision}", f"out_dir={out}"]
    )
    if resume:  # as `innerloop train --resume`: the run's saved config, with its precision
        run, cfg = load_config(str(out / "config.yaml"))
        assert run.trainer.precision == precision
    return train(run, cfg, resume=resume, callbacks=list(callbacks))


@pytest.mark.slow  # ~5 s each: three short training runs
@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("64-true", torch.float64)])
def test_a_true_precision_run_resumes_bit_identically(tmp_path, precision, dtype) -> None:
    """64-true too: restored into the float32 module Lightning casts only afterwards, its float64
    weights would be rounded to float32 on the way."""
    record = RecordLosses()
    reference = _run(tmp_path / "whole", precision, [record])
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "crashed", precision, [RecordLosses(crash_after=3)])
    assert load_checkpoint(tmp_path / "crashed" / "last.safetensors")["global_step"] == 2

    resumed_record = RecordLosses()
    resumed = _run(tmp_path / "crashed", precision, [resumed_record], resume=True)
    assert min(resumed_record.losses) == 3
    assert resumed_record.losses == {s: loss for s, loss in record.losses.items() if s >= 3}
    assert resumed.metrics["val_loss"] == reference.metrics["val_loss"]
    whole = dict(_tensors(load_checkpoint(reference.checkpoint)))
    again = dict(_tensors(load_checkpoint(resumed.checkpoint)))
    assert whole.keys() == again.keys()
    assert {whole[k].dtype for k in whole if k.startswith("/state_dict/")} == {dtype}
    for key in whole:  # weights and optimizer moments
        assert whole[key].dtype == again[key].dtype and torch.equal(whole[key], again[key]), key


@pytest.mark.slow  # ~4 s: a training run, then four commands on its checkpoint
def test_eval_generate_export_compare_of_a_bf16_true_run(tmp_path, capsys) -> None:
    out = tmp_path / "bf16"
    _run(out, "bf16-true")
    checkpoint = out / "last.safetensors"
    common = ["--batches", "1", "--batch-size", "2"]
    assert main(["eval", str(checkpoint), *common, "--out", str(tmp_path)]) == 0
    assert "perplexity:" in capsys.readouterr().out
    assert main(["generate", str(checkpoint), "--prompt", "def f", "--tokens", "10"]) == 0
    assert capsys.readouterr().out.startswith("def f")
    assert main(["export", str(checkpoint), str(tmp_path / "exported")]) == 0
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["dtype"] == "bfloat16"
    other = tmp_path / "other"
    shutil.copytree(out, other)
    compared = ["compare", str(out), str(other), "--out", str(tmp_path / "cmp"), "--resamples", "20"]
    assert main([*compared, *common]) == 0
    assert "| bf16 (baseline) |" in capsys.readouterr().out

    # A resume still refuses weights that are wrong in another way than their floating dtype.
    tree = load_checkpoint(checkpoint)
    tree["state_dict"]["model.norm.weight"] = tree["state_dict"]["model.norm.weight"].to(torch.int32)
    save_checkpoint(tree, checkpoint)
    assert main(["train", "--resume", f"out_dir={out}", "trainer.max_steps=8"]) == 2
    error = capsys.readouterr().err
    assert "'model.norm.weight' is torch.int32, expected torch.float32" in error
