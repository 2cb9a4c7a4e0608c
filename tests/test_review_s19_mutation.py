"""Kill tests for the mutants of the s19 code (abede27..73ff3d8) that the suite let survive (review_s19_mutation)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from innerloop.config.load import load_config, save_config
from innerloop.kernels import first_use
from innerloop.registry import isolated_registry, manager
from innerloop.train.bootstrap import (
    MIN_BAND_WINDOWS,
    bootstrap_difference,
    expanded_tail,
    student_t_quantile,
)
from innerloop.train.checkpoint import save_checkpoint
from innerloop.train.compare import ComparedModel, Comparison, LengthResult, _add_length, compare, size_notes
from innerloop.train.module import LanguageModelModule

# Student's t 0.975 quantiles (published tables; scipy.stats.t.ppf)
T975 = {2: 4.302652729749462, 5: 2.5705818356363146, 10: 2.228138851986274, 30: 2.0422724563012378}


@pytest.mark.parametrize("dof", sorted(T975))
def test_expanded_tail_is_phi_of_minus_sqrt_n_over_n_minus_1_times_t_n_minus_1(dof) -> None:
    """B1 (t with n dof) and B2 (sqrt(n/(n-1)) dropped) keep every suite test green."""
    n = dof + 1
    expected = 0.5 * math.erfc(math.sqrt(n / (n - 1)) * T975[dof] / math.sqrt(2))
    assert expanded_tail(n, 0.95) == pytest.approx(expected, rel=1e-9)


def test_the_median_of_students_t_is_zero() -> None:
    """B16 (probability <= 0.5 mirrored): 0.5 recursed forever."""
    assert student_t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9)


def test_the_band_starts_at_six_windows_as_the_docs_say() -> None:
    """B5 (MIN_BAND_WINDOWS 5): the module docstring and the warning say 6 (5-6% miss from 6 on)."""
    assert MIN_BAND_WINDOWS == 6
    _, low, _ = bootstrap_difference(torch.randn(5, 1), torch.ones(5, 1))
    assert math.isnan(low[0])
    _, low, _ = bootstrap_difference(torch.randn(6, 1), torch.ones(6, 1))
    assert not math.isnan(low[0])


def _model(name: str, parameters: int, tokens: int | None = 64) -> ComparedModel:
    return ComparedModel(name, Path(f"{name}.safetensors"), None, parameters, tokens, None)  # type: ignore[arg-type]


def test_a_smaller_model_is_named_too() -> None:
    """C6 (abs dropped): a model 2.5x smaller than the baseline was not named."""
    notes = size_notes([_model("attn", 302_720), _model("ttt", 118_760)], 0)
    assert notes == [
        "ttt has 118,760 parameters; the baseline attn has 2.55x as many, 302,720: its difference is also one "
        "of size"
    ]


def test_exactly_five_percent_more_parameters_is_not_named() -> None:
    """C5 (> -> >=): 'by more than SIZE_TOLERANCE'."""
    assert size_notes([_model("a", 1000), _model("b", 1050)], 0) == []
    assert len(size_notes([_model("a", 1000), _model("b", 1051)], 0)) == 1


def _length(windows: int, models: int) -> LengthResult:
    generator = torch.Generator().manual_seed(1)
    sums = torch.rand(models, windows, 2, generator=generator, dtype=torch.float64) * 8
    counts = torch.randint(1, 6, (windows, 2), generator=generator).double()
    return LengthResult(8, [(0, 4), (4, 8)], sums, counts, windows)


def test_the_bands_use_the_comparisons_confidence_and_seed(caplog) -> None:
    """C14 (confidence not passed), C15 (seed not passed)."""
    comparison = Comparison([_model("a", 1), _model("b", 1)], 0, [], {}, 0.5, 200, 3, "w")
    result = _length(12, 2)
    _add_length(comparison, result)
    d = result.loss_sums[1] - result.loss_sums[0]
    expected = bootstrap_difference(d, result.counts, 200, 0.5, 3)
    for got, want in zip(comparison.bands[8][1], expected, strict=True):
        torch.testing.assert_close(got, want)
    whole = bootstrap_difference(d.sum(1, keepdim=True), result.counts.sum(1, keepdim=True), 200, 0.5, 3)
    assert comparison.overall[8][1] == pytest.approx(tuple(float(v[0]) for v in whole))


def test_one_model_alone_gets_no_too_few_windows_warning(caplog) -> None:
    """C2: with no model to compare there is no band to warn about."""
    comparison = Comparison([_model("a", 1)], 0, [], {}, 0.95, 50, 0, "w")
    with caplog.at_level(logging.WARNING, logger="innerloop.train.compare"):
        _add_length(comparison, _length(3, 1))
    assert caplog.records == []


def test_inner_verdicts_and_deferrals_do_not_outlive_the_block(monkeypatch) -> None:
    """F1, F2 (restore without clearing), F3 (saved_verdicts hands out the live dicts), F4 (deferrals not restored), R2: the suite's test made no verdict
    inside the block and had no deferral outside it."""
    outer_key, inner_key = ("s19-mutation-outer",), ("s19-mutation-inner",)
    first_use._DEFERRALS[outer_key] = 2
    try:
        before = (dict(first_use._VERDICTS), dict(first_use._DEFERRALS))  # copies: F3 returned the live dicts
        with isolated_registry():
            first_use._VERDICTS[inner_key] = "inner verdict"
            first_use._DEFERRALS[inner_key] = 1
        assert (dict(first_use._VERDICTS), dict(first_use._DEFERRALS)) == before
        assert first_use._DEFERRALS[outer_key] == 2
    finally:
        first_use._DEFERRALS.pop(outer_key, None)
        first_use._VERDICTS.pop(inner_key, None)
        first_use._DEFERRALS.pop(inner_key, None)


def test_isolated_registry_refuses_to_start_while_the_registry_is_built(monkeypatch) -> None:
    """R5 (guard removed)."""
    monkeypatch.setattr(manager, "_BUILDING", object())
    with pytest.raises(RuntimeError, match="cannot start while the registry is being built"):
        with isolated_registry():
            pass


def _run(out: Path, hidden: int, data: Path) -> Path:
    overrides = [
        f"model.hidden_size={hidden}", "model.num_heads=2", "model.num_layers=1", "model.intermediate_size=32",
        "model.window=4", "data.seq_len=16", "data.batch_size=2", "data.val_batches=1",
        "trainer.num_position_buckets=4", f"out_dir={out}", f"data.paths=[{data}]",
    ]  # fmt: skip
    run, cfg = load_config("tiny-swa", overrides)
    torch.manual_seed(0)
    module = LanguageModelModule(model=asdict(run.model), seq_len=16, num_position_buckets=4)
    tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}
    save_checkpoint(tree, out / "last.safetensors")
    save_config(cfg, out / "config.yaml")
    return out


def test_compare_logs_a_model_of_another_size(tmp_path, caplog) -> None:
    """C13 (size_notes not called by compare()): only size_notes itself was tested."""
    data = tmp_path / "text.txt"
    data.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(60)))
    small, large = _run(tmp_path / "small", 16, data), _run(tmp_path / "large", 32, data)
    with caplog.at_level(logging.WARNING, logger="innerloop.train.compare"):
        compare([small, large], paths=[str(data)], resamples=10, batches=1)
    assert any("x the baseline small's" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]


def test_exactly_min_band_windows_get_a_band_and_no_warning(caplog) -> None:
    """C1 (warning at windows <= MIN_BAND_WINDOWS): 6 windows have a band, so no 'no band' warning."""
    comparison = Comparison([_model("a", 1), _model("b", 1)], 0, [], {}, 0.95, 50, 0, "w")
    with caplog.at_level(logging.WARNING, logger="innerloop.train.compare"):
        _add_length(comparison, _length(MIN_BAND_WINDOWS, 2))
    assert caplog.records == []
    assert not math.isnan(comparison.overall[8][1][1])


def test_the_table_marks_the_baseline_given_by_name_not_the_first_model() -> None:
    """C9 (_difference_cell's '-' for model 0): with --baseline the second model, the table gave the
    first model '-' and the baseline a difference to itself."""
    from innerloop.train.compare import format_table

    comparison = Comparison([_model("a", 1), _model("b", 1)], 1, [], {}, 0.95, 50, 0, "w")
    _add_length(comparison, _length(12, 2))
    rows = {
        line.split(" | ")[0]: line for line in format_table(comparison).splitlines() if line.startswith("| ")
    }
    assert rows["| b (baseline)"].endswith(" | - |")
    mean, low, high = comparison.overall[8][0]
    assert rows["| a"].endswith(f" | {mean:+.4f} ({low:+.4f} to {high:+.4f}, holds 0) |") and mean != 0


def test_the_tables_note_says_below_how_many_windows_there_is_no_band() -> None:
    """C12 (the note's window count not MIN_BAND_WINDOWS)."""
    from innerloop.train.compare import format_table

    comparison = Comparison([_model("a", 1), _model("b", 1)], 0, [], {}, 0.9, 50, 0, "w")
    _add_length(comparison, _length(12, 2))
    assert (
        f"with its 90% band, a paired bootstrap over windows (none below {MIN_BAND_WINDOWS} windows, or"
        in (format_table(comparison))
    )


def test_the_block_starts_without_the_processs_verdicts() -> None:
    """R3 (verdicts not forgotten on entry): the suite's test had no verdict outside the block to see."""
    key = ("s19-mutation-outer-verdict",)
    first_use._VERDICTS[key] = "outer verdict"
    try:
        with isolated_registry():
            assert first_use.saved_verdicts() == ({}, {})
        assert first_use._VERDICTS.get(key) == "outer verdict"
    finally:
        first_use._VERDICTS.pop(key, None)


def test_an_interpolation_in_a_yaml_file_is_checked_once_resolved(tmp_path) -> None:
    """L5 (the source's interpolated keys dropped): `progress_bar: ${seed}` loaded silently as False."""
    from innerloop.config.load import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  progress_bar: ${seed}\n")
    with pytest.raises(
        ConfigError,
        match=r"'trainer.progress_bar' in file .*resolves to 0 \(int\), which is not true or false",
    ):
        load_config(str(path))


def test_config_differences_read_a_lightning_named_key_of_the_file(tmp_path) -> None:
    """L6 (container and routed swapped in _Source): the difference was not reported."""
    from innerloop.config.load import config_differences

    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  log_every_n_steps: 7\n")
    run, _ = load_config("tiny")
    assert run.trainer.log_every != 7
    assert config_differences(str(path), [], run) == [f"trainer.log_every ({run.trainer.log_every} -> 7)"]


def test_a_key_two_sections_down_is_suggested_by_its_own_name() -> None:
    """M9 (by_name keyed by partition, not rpartition): only the fuzzy fallback found 'ttt.base_lr',
    and 'model.family.base_lr' was lost."""
    from innerloop.config.load import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config("tiny", ["model.base_lr=0.1"])
    assert str(caught.value).endswith("; did you mean 'model.ttt.base_lr', 'model.family.base_lr'?")
