"""Review s22 (docs): claims of README, CONTRIBUTING, docs/ and the kernel READMEs (and the help text
and docstrings that repeat them) checked against what the code does.

Each test pins one false, stale or misleading claim: it reads the claim from the page and checks it
against the code's behaviour, so it passes once either the page or the code is fixed (strict xfail
until then). Cheap: no training run, no benchmark (~5 s, mostly imports)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _text(page: str) -> str:
    """The page's text with its line breaks joined into spaces (a claim may wrap)."""
    return " ".join((REPO / page).read_text(encoding="utf-8").split())


# review s22 docs (MED, fixed)
def test_compare_advises_batch_size_only_where_it_scores_more_windows() -> None:
    from innerloop.train.run import default_window_count

    # s50d: this read ``assert not advises or batch_size_alone_adds_windows``, and the page had since been
    # reworded: ``advises`` was False and the test passed whatever the code did. The page's advice is now
    # pinned, and held against the code: ``--batches`` scores ``--batches`` x ``--batch-size`` windows, and
    # ``--batch-size`` alone scores no more (it is how many go through the model at once).
    advice = (
        "a warning saying how to score more windows: `--batches` (`--batches` x `--batch-size` windows), "
        "or more text with `--data`"
    )
    assert advice in _text("docs/training.md")
    assert default_window_count(3, 5) == 15
    assert default_window_count(64, None) == default_window_count(4, None)


# review s22 docs (MED, fixed)
def test_eval_batch_size_default_with_data_files_is_the_runs(tmp_path) -> None:
    from innerloop.cli import _parser
    from innerloop.config import load_config
    from innerloop.train.run import _windows_of_files

    helps = {a.dest: a.help for a in _parser()._subparsers._group_actions[0].choices["eval"]._actions}
    assert "16 on --data files" in helps["batch_size"]  # the help says what the code does:
    run, _ = load_config("tiny", ["data.batch_size=2", "data.seq_len=32", f"out_dir={tmp_path / 'run'}"])
    windows = _windows_of_files([str(REPO / "docs" / "training.md")], run, "", 32, None, 1, None)
    assert windows.inputs.shape[0] == 16  # one batch of 16 windows, whatever the run's data.batch_size


# review s22 docs (LOW, fixed)
def test_extending_a_finished_run_logs_the_uninterrupted_rows() -> None:
    doc = _text("docs/training.md")
    own_test = (REPO / "tests" / "train" / "test_resume_logged_rows.py").read_text(encoding="utf-8")
    assert "final_of_the_first_launch" in own_test  # an extension logs its first launch's last rows
    assert "except that a finished run extended keeps the rows of its first launch's last step" in doc


def _ttt_parameters_by_decay() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """The shapes of a TTT layer's parameters, by name: those LanguageModelModule's AdamW decays (its
    first param group), then the others."""
    from innerloop.config import load_config
    from innerloop.train.run import build_module

    run, _ = load_config("tiny", ["model.num_layers=1", "out_dir=/tmp/unused-review-s22-docs"])
    module = build_module(run)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    optimizer = optimizer[0][0] if isinstance(optimizer, tuple) else optimizer
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert optimizer.param_groups[0]["weight_decay"] > 0
    mixer = {name.split("mixer.", 1)[1]: p for name, p in module.named_parameters() if ".mixer." in name}
    by_decay = ({}, {})
    for name, p in mixer.items():
        by_decay[id(p) not in decayed][name] = tuple(p.shape)
    return by_decay


# review s22 docs (LOW, fixed)
def test_science_weight_decay_setting_names_what_is_decayed() -> None:
    # s50d: this read ``assert not says_matrices or not not_matrices``; the page no longer says "on
    # matrices", so it passed whatever the optimizer decayed. What the page says now is checked.
    page = _text("docs/science.md")
    assert "weight decay 0.1 on parameters of 2 or more dimensions" in page
    assert "innerloop decays parameters with 2 or more dims" in page
    decayed, kept = _ttt_parameters_by_decay()
    assert decayed and all(len(shape) >= 2 for shape in decayed.values()), decayed
    assert kept and all(len(shape) < 2 for shape in kept.values()), kept


# review s22 docs (LOW, fixed)
def test_science_list_of_decayed_ttt_parameters_is_complete() -> None:
    # s50d: this read ``assert listed is None or not unlisted``; the page's list had been reworded, so
    # ``listed`` was None and the test passed whatever the optimizer decayed. The list the page gives now
    # is checked, both ways.
    page = _text("docs/science.md")
    assert (
        "that is W0 and b0 (the inner model's initial weights and biases, stored per head), the lr gate's "
        "weight and bias, the inner LayerNorm's weight and bias, q/k/v/o), not the 1-d ones (the blocks' "
        "norms, the token-position offsets)"
    ) in page
    decayed, kept = _ttt_parameters_by_decay()
    assert set(decayed) == {
        "initial_params.W1",  # W0
        "initial_params.b1",  # b0
        "learnable_ttt_lr_weight",
        "learnable_ttt_lr_bias",
        "ttt_norm_weight",
        "ttt_norm_bias",
        *(f"{projection}_proj.weight" for projection in "qkvo"),
    }
    assert set(kept) == {"post_norm.weight", "post_norm.bias", "learnable_token_idx"}


# review s22 docs (LOW, fixed)
def test_trainer_config_docstring_states_auto_precision() -> None:
    from innerloop.config.load import concrete_precision
    from innerloop.config.schema import TrainerConfig

    float16_autocast = re.compile(r"(?<!bf)16-mixed")  # not bf16-mixed
    code_gives_16_mixed = float16_autocast.search(concrete_precision.__doc__ or "") is not None
    assert not code_gives_16_mixed or float16_autocast.search(TrainerConfig.__doc__ or "") is not None


# review s22 docs (LOW, fixed)
def test_readme_main_job_time_is_the_measured_range() -> None:
    low, high = (int(x) for x in re.search(r"\((\d+)-(\d+) s measured", _text("README.md")).groups())
    results = (REPO / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    section = results.split("## The main job", 1)[1].split("\n## ", 1)[0]
    table_wall = re.search(r"\| [\d.]+ nats/byte \| [\d.]+ \| (\d+) s \|", section)
    measured = {int(table_wall.group(1))} | {int(s) for s in re.findall(r"(\d+) s wall", section)}
    assert (low, high) == (min(measured), max(measured))
