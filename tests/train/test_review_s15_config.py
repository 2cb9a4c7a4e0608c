"""Review s15 (config): model keys that change nothing for the resolved model are reported like the
others (L1), and ``innerloop params --budget --adjust hidden_size`` searches the width even where the
config's own width does not fit its heads (L6)."""

from __future__ import annotations

import re
import warnings
from dataclasses import replace

import pytest

from innerloop.cli import main
from innerloop.config import load_config
from innerloop.models.config import E2E_INNER_LOOP_KEYS, E2EConfig, ModelConfig, TTTConfig, unread_model_keys


def _unread_warnings(preset: str, overrides: list[str]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(preset, overrides, model_only=True)
    return [str(w.message) for w in caught if "is not read by this model" in str(w.message)]


# -- L1: model.ttt.conv_kernel without a shared Q/K projection ------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "share_qk", "reads_conv_kernel"),
    [
        ("transformer", None, False),  # the transformer backbone shares no Q/K projection
        ("transformer", False, False),
        ("transformer", True, True),
        ("mamba", None, True),  # mamba turns share_qk on
        ("mamba", False, False),
    ],
)
def test_ttt_conv_kernel_is_unread_exactly_when_share_qk_resolves_false(
    backbone, share_qk, reads_conv_kernel
):
    config = ModelConfig(backbone=backbone, ttt=TTTConfig(share_qk=share_qk))
    assert ("model.ttt.conv_kernel" not in unread_model_keys(config)) == reads_conv_kernel


def test_a_ttt_conv_kernel_override_without_q_k_convs_is_warned_about() -> None:
    (message,) = _unread_warnings("tiny", ["model.ttt.conv_kernel=100"])
    assert message.startswith("model.ttt.conv_kernel (override 'model.ttt.conv_kernel=100') is not read")
    assert "model.ttt.share_qk=true" in message and message.endswith("so it changes nothing")
    assert _unread_warnings("tiny", ["model.ttt.conv_kernel=8", "model.backbone=mamba"]) == []


# -- L1: TTT-E2E keys of the inner loop with test-time training off, and of a warm-up that is off ---------


def test_e2e_inner_loop_keys_are_unread_without_test_time_training() -> None:
    config = ModelConfig(mixer="e2e")
    assert not any(key.startswith("model.e2e.") for key in unread_model_keys(config))  # all read by default
    off = replace(config, e2e=E2EConfig(test_time_training=False))
    unread = unread_model_keys(off)
    inner_only = {f"model.e2e.{key}" for key in E2E_INNER_LOOP_KEYS} - {"model.e2e.skip_target_id"}
    assert inner_only <= unread.keys()
    assert "model.e2e.skip_target_id" not in unread  # the chunk_mean training loss skips it as a target
    assert "model.e2e.chunk_size" not in unread  # relative RoPE: the blocks still attend chunk by chunk
    for read in ("suffix_fraction", "prime_intermediate_size", "rope_positions", "compute_dtype"):
        assert f"model.e2e.{read}" not in unread  # the network itself, prime MLPs fixed or not
    absolute = E2EConfig(test_time_training=False, rope_positions="absolute")
    assert "model.e2e.chunk_size" not in unread_model_keys(replace(config, e2e=absolute))  # chunk_mean
    token_mean = replace(absolute, outer_loss="token_mean")
    unread = unread_model_keys(replace(config, e2e=token_mean))
    assert {"model.e2e.chunk_size", "model.e2e.skip_target_id"} <= unread.keys()


def test_e2e_inner_lr_start_is_unread_without_a_warm_up() -> None:
    no_warm_up = ModelConfig(mixer="e2e", e2e=E2EConfig(inner_lr_warmup_fraction=0.0))
    assert set(k for k in unread_model_keys(no_warm_up) if k.startswith("model.e2e.")) == {
        "model.e2e.inner_lr_start"
    }


def test_e2e_overrides_that_change_nothing_are_warned_about() -> None:
    off = "model.e2e.test_time_training=false"
    (message,) = _unread_warnings("e2e-tiny", [off, "model.e2e.inner_lr=3"])
    assert message.startswith("model.e2e.inner_lr (override 'model.e2e.inner_lr=3') is not read")
    assert "test_time_training=false" in message
    (message,) = _unread_warnings(
        "e2e-tiny", ["model.e2e.inner_lr_warmup_fraction=0", "model.e2e.inner_lr_start=0.5"]
    )
    assert message.startswith("model.e2e.inner_lr_start (override")
    assert _unread_warnings("e2e-tiny", [off]) == []  # the preset's own keys are not warned about


# -- L6: params --budget --adjust hidden_size from a width the heads do not divide --------------------------


ARGUMENTS = ["params", "--budget", "100000", "--adjust", "hidden_size", "model.num_heads=3"]


@pytest.mark.slow  # ~0.7 s: a search over widths
def test_params_adjusts_hidden_size_where_the_configs_width_does_not_fit_the_heads(capsys) -> None:
    assert main(ARGUMENTS) == 0
    first, sized = capsys.readouterr().out.strip().splitlines()
    assert "model.hidden_size=64 must be divisible by model.num_heads=3" in first
    assert "--adjust hidden_size replaces model.hidden_size" in first
    width = int(re.match(r"model\.hidden_size=(\d+): ", sized).group(1))
    assert width % 6 == 0  # 3 heads of an even width (RoPE)
    # the search's answer is the one a valid start gives, and an invalid width given as an override too
    for start in ("model.hidden_size=60", "model.hidden_size=64"):
        assert main([*ARGUMENTS, start]) == 0
        assert capsys.readouterr().out.strip().splitlines()[1] == sized


def test_params_still_refuses_what_the_searched_width_does_not_explain(capsys) -> None:
    assert main(["params", "model.num_heads=3"]) == 2  # no --budget: the config as given, which is invalid
    assert "model.hidden_size=64 must be divisible by model.num_heads=3" in capsys.readouterr().err
    assert main([*ARGUMENTS, "model.mixer=bogus"]) == 2
    assert "model.mixer='bogus' is not a mixer" in capsys.readouterr().err
    assert main(["params", "--budget", "100000", "model.num_heads=3"]) == 2  # --adjust intermediate_size
    assert "model.hidden_size=64 must be divisible by model.num_heads=3" in capsys.readouterr().err
