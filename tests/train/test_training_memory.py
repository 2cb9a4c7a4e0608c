"""A model whose weights fit but whose training does not (gradients and AdamW's two moments are three
times the weights more) is refused with one line before the run writes or trains anything: such a run was
stopped by the out-of-memory killer at its first step, without a message."""

from __future__ import annotations

import importlib

import pytest
import torch
from lm_testing import TINY  # the tiny run of the end-to-end tests

import innerloop.core.layer as core_layer
from innerloop.config import load_config
from innerloop.core.layer import ModelTooLargeError, device_memory_bytes
from innerloop.train import train
from innerloop.train.run import training_bytes_at_least

run_module = importlib.import_module("innerloop.train.run")  # `innerloop.train.run` the attribute is not it


def test_training_needs_weights_gradients_and_two_moments() -> None:
    module = torch.nn.Linear(3, 2)  # 8 float32 parameters
    module.register_buffer("steps", torch.zeros(5, dtype=torch.float64))
    assert training_bytes_at_least(module) == 8 * 4 + 5 * 8 + 8 * 4 + 2 * 8 * 4
    module.bias.requires_grad_(False)  # frozen: no gradient, no moments
    assert training_bytes_at_least(module) == 8 * 4 + 5 * 8 + 6 * 4 + 2 * 6 * 4


def test_the_device_memory_is_the_machines_on_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(core_layer, "machine_memory_bytes", lambda: 12345)
    assert device_memory_bytes(torch.device("cpu")) == 12345
    assert device_memory_bytes(torch.device("meta")) is None


@pytest.mark.slow  # builds the run's LanguageModelModule from a preset: ~0.3 s
def test_a_model_too_large_to_train_is_refused_before_training(tmp_path, monkeypatch) -> None:
    (tmp_path / "corpus.txt").write_text("abcdefgh " * 400)
    out = tmp_path / "run"
    run, cfg = load_config("tiny", [*TINY, f"data.paths=[{tmp_path / 'corpus.txt'}]", f"out_dir={out}"])
    module = run_module.build_module(run)
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    # room for the weights (the model is built), not for training them
    monkeypatch.setattr(core_layer, "machine_memory_bytes", lambda: 2 * weights)
    monkeypatch.setattr(run_module, "_fit", lambda *a, **k: pytest.fail("started the fit"))
    refused = (
        r"training this model \([\d,]+ parameters\) needs at least [\d.]+ [KMG]iB on cpu \(its weights, their "
        r"gradients and AdamW's two moments\), more than the [\d.]+ [KMG]iB there; give smaller model sizes"
    )
    with pytest.raises(ModelTooLargeError, match=refused):
        train(run, cfg)
    assert not (out / "config.yaml").exists() and not (out / "last.safetensors").exists()


def test_memory_sizes_in_messages_keep_a_digit_before_the_point() -> None:
    """The memory refusals printed '0.0 GiB' for amounts under about 50 MiB (review s38a)."""
    from innerloop.core.layer import memory_size

    assert memory_size(0) == "0 bytes"
    assert memory_size(1023) == "1,023 bytes"
    assert memory_size(1024) == "1.0 KiB"
    assert memory_size(1_000_000) == "976.6 KiB"
    assert memory_size(3 * 2**20) == "3.0 MiB"
    assert memory_size(1.5 * 2**30) == "1.5 GiB"
    assert memory_size(2**50) == "1,048,576.0 GiB"
