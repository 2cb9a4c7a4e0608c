"""Review s22 (docs): claims of README, CONTRIBUTING, docs/ and the kernel READMEs (and the help text
and docstrings that repeat them) checked against what the code does.

Each test pins one false, stale or misleading claim: it reads the claim from the page and checks it
against the code's behaviour, so it passes once either the page or the code is fixed (strict xfail
until then). Cheap: no training run, no benchmark (~5 s, mostly imports)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _text(page: str) -> str:
    """The page's text with its line breaks joined into spaces (a claim may wrap)."""
    return " ".join((REPO / page).read_text(encoding="utf-8").split())


@pytest.mark.xfail(
    strict=True,
    reason="review s22 docs (MED): docs/training.md:363-365, compare's 'Below 6 windows no band ... a "
    "warning saying how to score more windows: `--batches`, `--batch-size`, or more text with `--data`' "
    "(and the warning itself, innerloop/train/compare.py:325-326): since 6808df9 --batch-size alone "
    "no longer changes how many windows are read (a run's own windows: data.val_batches x "
    "data.batch_size; files: 128), so following that advice scores the same windows and still gets no "
    "band",
)
def test_compare_advises_batch_size_only_where_it_scores_more_windows() -> None:
    from innerloop.train.run import default_window_count

    advises = "a warning saying how to score more windows: `--batches`, `--batch-size`" in _text(
        "docs/training.md"
    )
    batch_size_alone_adds_windows = default_window_count(64, None) > default_window_count(4, None)
    assert not advises or batch_size_alone_adds_windows


@pytest.mark.xfail(
    strict=True,
    reason="review s22 docs (MED): innerloop/cli.py:213-224 (eval) and 302-315 (compare), `--batch-size` "
    "'windows per batch (default: the run's data.batch_size ...)' and `--batches` 'number of batches of "
    "--batch-size windows': with --data files the batch size is 16 whatever the run's data.batch_size "
    "(run._windows_of_files: DEFAULT_EVAL_BATCH_SIZE), so `eval CKPT --data F --batches 1` of a run with "
    "data.batch_size=2 scores 16 windows, not 2 (reproduced with the CLI)",
)
def test_eval_batch_size_default_with_data_files_is_the_runs(tmp_path) -> None:
    from innerloop.cli import _parser
    from innerloop.config import load_config
    from innerloop.train.run import _windows_of_files

    helps = {a.dest: a.help for a in _parser()._subparsers._group_actions[0].choices["eval"]._actions}
    claims_runs_batch_size = "the run's data.batch_size" in helps["batch_size"]
    run, _ = load_config("tiny", ["data.batch_size=2", "data.seq_len=32", f"out_dir={tmp_path / 'run'}"])
    windows = _windows_of_files([str(REPO / "docs" / "training.md")], run, "", 32, None, 1, None)
    assert not claims_runs_batch_size or windows.inputs.shape[0] == run.data.batch_size


@pytest.mark.xfail(
    strict=True,
    reason="review s22 docs (LOW): docs/training.md:420-424, a resumed run logs 'the same logged rows "
    "(... the same `step` column and `train_loss` at the same steps, whether it resumes after a crash, a "
    "Ctrl-C or SIGTERM stop, or extends a finished run': since e7060a6 a finished run's last step logs "
    "its train_loss and its final validation (step=max_steps-1, val_step=max_steps) whatever "
    "log_every/val_every, so extending it with --resume trainer.max_steps=N keeps rows an uninterrupted "
    "N-step run never logs (reproduced: tiny 5 steps log_every=2 extended to 8 has train_loss at step 4 "
    "and a validation row step=4, val_step=5.0; the straight 8-step run has neither; "
    "tests/train/test_resume_logged_rows.py filters that validation row out itself)",
)
def test_extending_a_finished_run_logs_the_uninterrupted_rows() -> None:
    doc = _text("docs/training.md")
    claims_extension_is_identical = "Ctrl-C or SIGTERM stop, or extends a finished run" in doc
    own_test = (REPO / "tests" / "train" / "test_resume_logged_rows.py").read_text(encoding="utf-8")
    extension_logs_an_extra_row = "final_of_the_first_launch" in own_test
    assert not (claims_extension_is_identical and extension_logs_an_extra_row)


def _decayed_ttt_parameters() -> dict[str, tuple[int, ...]]:
    """The parameters of a TTT layer that LanguageModelModule's AdamW decays (its first param group)."""
    from innerloop.config import load_config
    from innerloop.train.run import build_module

    run, _ = load_config("tiny", ["model.num_layers=1", "out_dir=/tmp/unused-review-s22-docs"])
    module = build_module(run)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    optimizer = optimizer[0][0] if isinstance(optimizer, tuple) else optimizer
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert optimizer.param_groups[0]["weight_decay"] > 0
    return {
        name.split("mixer.", 1)[1]: tuple(p.shape)
        for name, p in module.named_parameters()
        if id(p) in decayed and ".mixer." in name
    }


@pytest.mark.xfail(
    strict=True,
    reason="review s22 docs (LOW): docs/science.md:36-37, the studies' AdamW has 'weight decay 0.1 on "
    "matrices': it decays every parameter of 2 or more dimensions (LanguageModelModule, p.dim() >= 2), "
    "among them a TTT layer's lr-gate bias [H, 1], inner bias b1 [H, 1, f] and inner LayerNorm [H, f] "
    "(fb869c9 fixed training.md's wording, not this page's)",
)
def test_science_weight_decay_setting_names_what_is_decayed() -> None:
    says_matrices = "weight decay 0.1 on matrices" in _text("docs/science.md")
    vectors = ("learnable_ttt_lr_bias", "initial_params.b1", "ttt_norm_weight", "ttt_norm_bias")  # per head
    not_matrices = [n for n in _decayed_ttt_parameters() if n in vectors]
    assert not says_matrices or not not_matrices


@pytest.mark.xfail(
    strict=True,
    reason="review s22 docs (LOW): docs/science.md:93-95, 'innerloop decays parameters with 2 or more "
    "dims (matrices; among the TTT layer's parameters that is W0, the lr gate's weight, the inner "
    "LayerNorm's weight and bias, q/k/v/o), not the vectors': the lr gate's bias "
    "(learnable_ttt_lr_bias [H, 1]) and the inner bias b1 ([H, 1, f]; b2 too for TTT-MLP) are decayed "
    "as well",
)
def test_science_list_of_decayed_ttt_parameters_is_complete() -> None:
    page = _text("docs/science.md")
    listed = re.search(
        r"that is W0, the lr gate's weight, the inner LayerNorm's weight and bias, q/k/v/o\)", page
    )
    decayed = _decayed_ttt_parameters()
    unlisted = [n for n in decayed if n in ("learnable_ttt_lr_bias", "initial_params.b1")]
    assert listed is None or not unlisted


@pytest.mark.xfail(
    strict=True,
    reason="review s22 docs (LOW): TrainerConfig's docstring (innerloop/config/schema.py:102-104) says "
    "precision 'auto' is 'bf16-mixed on a CUDA GPU, 32-true otherwise'; concrete_precision (and "
    "docs/training.md:192-197) give 16-mixed on a GPU that only emulates bfloat16 (before Ampere); "
    "it also says 'any Lightning precision', while 16-true and transformer-engine-float16 are refused",
)
def test_trainer_config_docstring_states_auto_precision() -> None:
    from innerloop.config.load import concrete_precision
    from innerloop.config.schema import TrainerConfig

    float16_autocast = re.compile(r"(?<!bf)16-mixed")  # not bf16-mixed
    code_gives_16_mixed = float16_autocast.search(concrete_precision.__doc__ or "") is not None
    assert not code_gives_16_mixed or float16_autocast.search(TrainerConfig.__doc__ or "") is not None


@pytest.mark.xfail(
    strict=True,
    reason="review s22 docs (LOW): README.md:17, the main job runs 'in about a minute on 2 idle CPU cores "
    "(25-56 s measured, see benchmarks/RESULTS.md, \"The main job\")': RESULTS.md's main job records "
    "27 s (Intel Xeon) and 56 s (AMD EPYC) wall; no 25 s",
)
def test_readme_main_job_time_is_the_measured_range() -> None:
    low, high = (int(x) for x in re.search(r"\((\d+)-(\d+) s measured", _text("README.md")).groups())
    results = (REPO / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    section = results.split("## The main job", 1)[1].split("\n## ", 1)[0]
    table_wall = re.search(r"\| [\d.]+ nats/byte \| [\d.]+ \| (\d+) s \|", section)
    measured = {int(table_wall.group(1))} | {int(s) for s in re.findall(r"(\d+) s wall", section)}
    assert (low, high) == (min(measured), max(measured))
