"""Review s55e: the s54n mutants no test killed (T6, D13; K3 and K6 are killed by
tests/test_review_s52_s52j.py's keys table, outside s54n's harness), ``trainer.max_time`` against
Lightning's Timer, and the testing kit's default checks against deliberately wrong rules and kernels."""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch

import innerloop
from innerloop.config import trainer_args
from innerloop.kernels import dispatch, fused_torch
from innerloop.kernels.spec import KernelInputs
from innerloop.plugins.models.linear import LinearModel
from innerloop.registry import get_registry
from innerloop.testing import kernel_checks


@pytest.mark.slow  # reads Lightning's Trainer signature (its first use imports Lightning: ~3 s under load)
@pytest.mark.parametrize(("name", "value"), [("gradient_clip_algorithm", "Norm"), ("profiler", "Simple")])
def test_lightnings_text_choices_are_taken_in_any_case(name: str, value: str) -> None:
    """Lightning lower-cases ``gradient_clip_algorithm`` (Trainer.__init__) and ``profiler``
    (trainer/setup.py's _init_profiler) before it reads them: ``Norm`` and ``Simple`` train, so the
    config check takes them too (mutant T6, ``value not in choices``, refused them)."""
    trainer_args.check_lightning_arguments({name: value}, ValueError)
    with pytest.raises(ValueError, match=f"trainer.{name}='Nrom' is not valid"):
        trainer_args.check_lightning_arguments({name: "Nrom"}, ValueError)


def _block_inputs() -> KernelInputs:
    return KernelInputs(
        device=torch.device("cpu"),
        dtype=torch.float32,
        head_dim=8,
        mini_batch_size=4,
        num_tokens=8,
        requires_grad=False,
        extra={},
    )


def test_every_refusal_of_auto_names_the_kernel_it_is_about(monkeypatch: pytest.MonkeyPatch) -> None:
    """``kernel="auto"`` refusing every candidate tells each one's reason after its name (a verify's
    reason rarely names its own kernel); a reason that already starts with the name is not named twice
    (mutant D13 dropped the names: 'torch: too small; too small' said nothing of which kernel)."""
    reasons = {"first": "head_dim 8 is below 16", "second": "second: wants float64"}
    monkeypatch.setattr(dispatch, "refusal", lambda kernel, inputs, task, rule: reasons[kernel.name])
    candidates = [SimpleNamespace(name=name) for name in reasons]
    task = SimpleNamespace(model=SimpleNamespace(name="linear"), loss=SimpleNamespace(name="reconstruction"))
    rule = SimpleNamespace(name="gd")
    chosen, reason = dispatch._best(candidates, _block_inputs(), task, rule, candidates)
    assert chosen is None
    assert reason == "torch: first: head_dim 8 is below 16; second: wants float64"


# --- check_kernel's wide cases against kernels wrong only past its old default shapes ---------------

#: The fused torch path of (linear, reconstruction, dual_form): each wrong kernel below is it changed in one way.
_FUSED_LINEAR = fused_torch.kernel_spec("linear", LinearModel().stack).forward


def _last_token_sign_flipped_from_k32(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):  # noqa: ANN001, ANN202
    """The fused path, but with mini-batches of 32 or more the last token of each reads its output negated
    (a row loop whose last iteration past a tile of 16 rows is mishandled)."""
    out, new = _FUSED_LINEAR(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)
    k = tau.shape[0]
    if k >= 32:
        out = out.clone()
        out[:, :, k - 1 :: k] = -out[:, :, k - 1 :: k]
    return out, new


def _uneven_feature_tile_remainder(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):  # noqa: ANN001, ANN202
    """The fused path, but for a head dim above 8 that is no power of two, the features past the 8th read
    1% too large: a tile of 8 features whose remainder is mishandled."""
    out, new = _FUSED_LINEAR(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)
    width = out.shape[-1]
    if width > 8 and width & (width - 1):
        out = out.clone()
        out[..., 8:] *= 1.01
    return out, new


def _features_past_32_wrong(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):  # noqa: ANN001, ANN202
    """The fused path, wrong (1%) for features past a tile of 32."""
    out, new = _FUSED_LINEAR(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)
    if out.shape[-1] > 32:
        out = out.clone()
        out[..., 32:] *= 1.01
    return out, new


def _rates_clamped_at_default_base_lr(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):  # noqa: ANN001, ANN202
    """The fused path with each token's rate clamped at ``1 / head_dim``, the most the default
    ``base_lr`` 1.0 gives (``base_lr * sigmoid(.) / f``): wrong only for a larger base lr."""
    clamped = lr.clamp(max=1.0 / xq.shape[-1])
    return _FUSED_LINEAR(xq, xk, xv, clamped, tau, params, ln_weight, ln_bias, eps)


_WRONG_ONLY_WIDE = {
    "last_token_sign_from_k32": _last_token_sign_flipped_from_k32,
    "uneven_feature_tile": _uneven_feature_tile_remainder,
    "features_past_32": _features_past_32_wrong,
    "rates_clamped_at_default_base_lr": _rates_clamped_at_default_base_lr,
}


@pytest.mark.slow  # ~1-2 s: the wide cases' layers, their carried states and one or two comparisons
@pytest.mark.parametrize("name", sorted(_WRONG_ONLY_WIDE))
def test_check_kernels_wide_cases_fail_a_kernel_wrong_only_past_the_other_cases(
    name: str, fresh_global_registry: None
) -> None:
    """Each kernel is right at every other default case of check_kernel (head dims 4 and 5, K = 4,
    base_lr 1.0) and, before review s55e, at its one wide case too (32 features, K = 16): each passed the
    whole default check (measured: 60-98 s each). The wide cases now (K = 32; head dims 32 and 40, the
    second at base_lr 2.5) fail each, naming the case."""
    base = fused_torch.kernel_spec("linear", get_registry().inner_model("linear").stack)
    spec = dataclasses.replace(base, name=name, priority=100, forward=_WRONG_ONLY_WIDE[name])
    innerloop.register_kernel(spec)
    config = kernel_checks._layer_config(spec, None, None, None, {})
    report = kernel_checks.KernelCheckReport(name)
    with pytest.raises(AssertionError, match=rf"check_kernel\('{name}'\): head_dim (32|40) .*the wide case"):
        kernel_checks._check_wide_case(
            spec, config, torch.float64, torch.device("cpu"), 0, 1e-10, report, False
        )


@pytest.mark.slow  # ~1 s: the checkers' carried states at 32 and 40 features
def test_check_kernels_wide_cases_meet_k32_an_uneven_head_dim_and_another_base_lr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wide cases' layers: mini-batches of 32 (unless given), head dims 32 and 40 (no power of two),
    the second at base_lr 2.5 unless given; a given mini_batch_size and base_lr are kept."""
    ran = []
    monkeypatch.setattr(
        kernel_checks._Checker,
        "run",
        lambda self, case: ran.append(
            (case.head_dim, self.mini_batch_size, self.reference.base_lr, str(case))
        ),
    )
    spec = fused_torch.kernel_spec("linear", LinearModel().stack)
    for options, given in (({}, False), ({"mini_batch_size": 8, "base_lr": 0.5}, True)):
        config = kernel_checks._layer_config(spec, None, None, None, options)
        report = kernel_checks.KernelCheckReport("k")
        kernel_checks._check_wide_case(
            spec, config, torch.float64, torch.device("cpu"), 0, 1e-10, report, given
        )
    assert [entry[:3] for entry in ran] == [(32, 32, 1.0), (40, 32, 2.5), (32, 8, 0.5), (40, 8, 0.5)]
    assert "base_lr 2.5" in ran[1][3] and "base_lr" not in ran[3][3]


# --- trainer.max_time: Lightning's DD:HH:MM:SS as YAML reads it ------------------------------------


@pytest.mark.parametrize(("written", "read"), [("1:00:00:00", 216000), ("10:00:00:00", 2160000)])
def test_a_max_time_yaml_read_as_a_base_60_number_is_refused_saying_how_to_write_it(
    written: str, read: int
) -> None:
    """Lightning's Timer takes ``(\\d+):(\\d\\d):(\\d\\d):(\\d\\d)`` (days of any digits), and innerloop the same
    pattern; but YAML (PyYAML's and OmegaConf's) reads an unquoted ``1:00:00:00`` or ``10:00:00:00``, whose
    first digit is not 0, as one base-60 number. The error named only that number ('216000 (int) is not a
    time limit'), which the user never wrote; it now says how YAML read it and how to write it."""
    from omegaconf import OmegaConf

    assert OmegaConf.from_dotlist([f"trainer.max_time={written}"]).trainer.max_time == read
    with pytest.raises(ValueError, match=rf"trainer.max_time={read} .*{written}.*quote it") as error:
        trainer_args.check_lightning_arguments({"max_time": read}, ValueError)
    assert "DD:HH:MM:SS" in str(error.value)
    trainer_args.check_lightning_arguments({"max_time": f"0{written}"}, ValueError)  # a leading 0: text


@pytest.mark.parametrize(
    ("written", "read", "limit"),
    [
        ("1:00:00", 3600, timedelta(hours=1)),
        ("1:00:00:00", 216000, timedelta(days=1)),
        ("12:30:00:00", 2700000, timedelta(days=12, hours=30)),
    ],
)
def test_the_form_a_base_60_max_time_error_tells_is_taken_as_the_time_written(
    written: str, read: int, limit: timedelta
) -> None:
    """The form the error tells is Lightning's D:HH:MM:SS led by a 0 and means what the user wrote: for an
    ``H:MM:SS`` read as base 60 it told ``0{written}`` (``01:00:00``), which Lightning's pattern refuses."""
    from omegaconf import OmegaConf

    with pytest.raises(ValueError) as error:
        trainer_args.check_lightning_arguments({"max_time": read}, ValueError)
    told = re.search(r"write D:HH:MM:SS with the days led by a 0, ([0-9:]+)", str(error.value)).group(1)
    as_yaml_reads_it = OmegaConf.from_dotlist([f"trainer.max_time={told}"]).trainer.max_time
    assert as_yaml_reads_it == told
    trainer_args.check_lightning_arguments({"max_time": told}, ValueError)
    assert trainer_args._time_limit(told, ValueError) == limit


@pytest.mark.slow  # builds Lightning's Timer (its first use imports Lightning: ~3 s under load)
def test_a_max_time_stop_past_ten_days_suggests_a_limit_yaml_reads_as_text() -> None:
    """A run given 6 days and stopped by it is told ``trainer.max_time`` = 12 days: written ``12:00:00:00``,
    YAML read that as the number 2592000 and the told command was refused; the days now keep a leading 0."""
    from omegaconf import OmegaConf
    from test_review_s54_s54a import _stopped_timer

    from innerloop.train import run as run_module

    six_days = 6 * 86400
    trainer = SimpleNamespace(callbacks=[_stopped_timer(six_days, 0, six_days)])
    said = run_module._continuing(SimpleNamespace(out_dir="runs/x"), trainer)
    suggested = re.search(r"trainer\.max_time=([0-9:]+)", said).group(1)
    read = OmegaConf.from_dotlist([f"trainer.max_time={suggested}"]).trainer.max_time
    assert read == "012:00:00:00", said
    trainer_args.check_lightning_arguments({"max_time": read}, ValueError)
