"""Review s37d (grader of issues 5, 15, 12, 14): regression tests for what the review found."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from innerloop.interop.ttt_e2e import OfficialConfigError, model_config
from innerloop.models import E2EConfig, ModelConfig, build_model

E2E_CONFIG = json.loads((Path(__file__).parent / "data" / "e2e" / "config.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "key, value, valid",
    [
        ("rms_norm_eps", 1.5, "in [1.1754943508222875e-38, 1)"),
        ("num_hidden_layers", 10**6, "in [1, 65536]"),
        ("num_attention_heads", 0, ">= 1"),
        ("sliding_window_size", 0, "must be in [1, "),
        ("vocab_size", 2**30, "in [1, 16777216]"),
        ("rope_theta", 0.5, ">= 1"),
        ("initializer_range", float("inf"), ">= 1.1754943508222875e-38"),  # float32's smallest normal (s51c)
        ("mini_batch_size", 0, "must be in [1, "),
    ],
)
def test_an_official_config_value_out_of_range_is_named_by_its_official_field(key, value, valid) -> None:
    """The official loader names the field of the config the user gave (model.rms_norm_eps), not the
    innerloop field it becomes (model.norm_eps was named, a key the official config does not have)."""
    config = copy.deepcopy(E2E_CONFIG)
    config["model"][key] = value
    with pytest.raises(OfficialConfigError) as caught:
        model_config(config)
    message = str(caught.value)
    assert message.startswith(f"model.{key}="), message
    assert valid in message and "\n" not in message, message


@pytest.mark.parametrize(
    "key, value, valid",
    [
        ("rms_norm_eps", 1.5, r"a finite number in \[1\.1754943508222875e-38, 1\)"),
        ("num_hidden_layers", 10**6, r"an integer in \[1, 65536\]"),
        ("vocab_size", 2**30, r"an integer in \[1, 16777216\]"),
        ("rope_theta", 0.5, r"a finite number >= 1"),
    ],
)
def test_a_reference_config_value_out_of_range_is_named_by_its_reference_field(key, value, valid) -> None:
    """The same for ttt-lm-pytorch's TTTConfig: refused by its field's name (it was accepted, and building
    the model named innerloop's model.norm_eps / model.num_layers)."""
    from innerloop.interop.ttt_lm_pytorch import model_config as reference_model_config

    config = dict(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    with pytest.raises(ValueError, match=rf"^config field '{key}' must be {valid}"):
        reference_model_config({**config, key: value})


@pytest.mark.parametrize("progress", [None, 1j, torch.tensor([0.5, 0.2]), torch.tensor(True), [0.5]])
def test_set_outer_progress_names_progress_for_what_is_not_one_number(progress) -> None:
    """None, a complex, a tensor of two values, a bool tensor or a list raised float()'s or torch's own
    message ("float() argument must be a string or a real number, not 'NoneType'", "only one element
    tensors can be converted to Python scalars"), naming neither the argument nor what is valid."""
    model = _e2e_model()
    model.set_outer_progress(0.25)
    with pytest.raises(TypeError, match=r"^progress must be a number in \[0, 1\], got "):
        model.set_outer_progress(progress)
    assert float(model.outer_progress) == 0.25  # unchanged
    for number in (np.float32(0.5), torch.tensor(0.75), 1):  # one number of any kind is still read
        model.set_outer_progress(number)
        assert float(model.outer_progress) == float(number)


def _e2e_model():
    config = ModelConfig(
        mixer="e2e", vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8, window=4,
        e2e=E2EConfig(chunk_size=2),
    )  # fmt: skip
    return build_model(config)


@pytest.mark.parametrize("outer_loss", ["chunk_mean", "token_mean"])
def test_the_e2e_training_loss_reads_int32_targets_and_names_bad_ones(outer_loss) -> None:
    """E2ELM.training_loss (both outer losses; the model reads int32 ids) took int32 targets to torch's
    "expected target dtype to be Long or Byte", float targets the same, and token_mean a length off by
    one to "Expected input batch_size (18) to match target batch_size (16)"."""
    model = _e2e_model()
    model.config.e2e.outer_loss = outer_loss
    logits, targets = torch.randn(2, 9, 16), torch.randint(0, 16, (2, 9))
    expected = model.training_loss(logits, targets, -100)
    assert torch.equal(model.training_loss(logits, targets.int(), -100), expected)
    with pytest.raises(
        TypeError, match=r"^targets must be a tensor of integer token ids .*got dtype torch.float32"
    ):
        model.training_loss(logits, targets.float(), -100)
    with pytest.raises(ValueError, match=r"^logits must be \[.*got logits \(2, 9, 16\) and targets \(2, 8\)"):
        model.training_loss(logits, targets[:, :8], -100)


def test_stream_losses_and_the_next_token_loss_read_int32_ids() -> None:
    """The model reads int32 token ids (forward, stream); stream_losses of int32 pieces, and the registered
    next_token inner loss given int32 ids, raised torch's "expected target dtype to be Long or Byte"."""
    model = _e2e_model()
    ids = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = torch.cat(list(model.stream_losses(ids.split(3, dim=1))), dim=1)
    assert torch.equal(torch.cat(list(model.stream_losses(ids.int().split(3, dim=1))), dim=1), expected)
    logits = torch.randn(2, 2, 16)
    assert torch.equal(
        model.inner_loss.chunk_loss(logits, ids[:, :3].int()), model.inner_loss.chunk_loss(logits, ids[:, :3])
    )


def test_the_official_config_may_be_hydras_own_dictconfig() -> None:
    """Hydra hands its user a DictConfig, whose lists are ListConfigs: load_model(..., cfg) was refused with
    "training.spec_inner must be a list of strings, got ['language_model.**...']" (a list of strings, as
    printed). It now reads as its YAML file does, interpolations resolved where they resolve."""
    from omegaconf import OmegaConf

    assert model_config(OmegaConf.create(E2E_CONFIG)) == model_config(E2E_CONFIG)
    config = copy.deepcopy(E2E_CONFIG)
    config["training"]["ilr_warmup_steps"] = "${training.total_steps}"
    assert model_config(OmegaConf.create(config)).e2e.inner_lr_warmup_fraction == 1.0
    cfg = OmegaConf.create(config)  # a mapping of Hydra's sections reads the same
    assert model_config({"model": cfg.model, "training": cfg.training}).e2e.inner_lr_warmup_fraction == 1.0
