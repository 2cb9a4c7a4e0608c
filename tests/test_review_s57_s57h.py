"""Review s57h: the official TTT-E2E loader under configs the tests did not name.

A ``training`` field the official code reads but a config leaves out is read at the official default
(``ttt.config.TrainingConfig`` / ``SGDOptimizerConfig``, the structured config Hydra merges every run's
config into), as the loader already read an absent ``train_mode``, ``ilr_warmup_steps``, ``ilr_init``
and the ``model`` section's optional fields.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from innerloop.interop.ttt_e2e import OfficialConfigError, model_config, special_token_ids

CONFIG = json.loads(
    (Path(__file__).resolve().parent / "data" / "e2e" / "config.json").read_text(encoding="utf-8")
)


def _without(section_path: tuple[str, ...], key: str) -> dict:
    config = copy.deepcopy(CONFIG)
    node = config
    for part in section_path:
        node = node[part]
    del node[key]
    return config


def test_an_absent_total_steps_is_the_official_default_not_zero() -> None:
    """With a warm-up and no total_steps the loader said 'needs training.total_steps >= 1, got 0' (none
    was given; the official code runs 2500 steps): the warm-up is now 480 of the official 2500."""
    assert CONFIG["training"]["ilr_warmup_steps"] == 480
    e2e = model_config(_without(("training",), "total_steps")).e2e
    assert e2e.inner_lr_warmup_fraction == 480 / 2500
    assert (e2e.inner_lr_start, e2e.inner_lr) == (0.1, 1.0)  # the config's own ilr_init and lr


def test_an_absent_inner_optimizer_or_field_is_the_official_sgd_default() -> None:
    """An absent optimizer_inner was refused as 'must be a mapping, got None', an absent lr or
    clip_gradient as 'lr=None must be a finite number': the official code runs SGDOptimizerConfig's
    lr 0.01 and clip_gradient 0.0 (no clip) there, its optimizer_type sgd."""
    e2e = model_config(_without(("training",), "optimizer_inner")).e2e
    assert (e2e.inner_lr, e2e.inner_grad_clip) == (0.01, 0.0)
    inner = ("training", "optimizer_inner")
    assert model_config(_without(inner, "lr")).e2e.inner_lr == 0.01
    assert model_config(_without(inner, "clip_gradient")).e2e.inner_grad_clip == 0.0
    assert (
        model_config(_without(inner, "optimizer_type")).e2e.inner_lr
        == CONFIG["training"]["optimizer_inner"]["lr"]
    )
    given_none = copy.deepcopy(CONFIG)
    given_none["training"]["optimizer_inner"] = None  # the official type allows None; meta mode then fails
    with pytest.raises(OfficialConfigError, match=r"training\.optimizer_inner must be a mapping, got None"):
        model_config(given_none)


def test_an_absent_eos_id_is_the_official_default() -> None:
    """special_token_ids (what a converted export's generate stops at) gave no EOS for a config without
    model.eos_token_id, where the official ModelConfig has 2 (and BOS its default 1, as it did)."""
    config = _without(("model",), "eos_token_id")
    del config["model"]["bos_token_id"]
    assert special_token_ids(config) == {"bos_token_id": 1, "eos_token_id": 2}
