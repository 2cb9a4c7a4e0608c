"""review s20 (docs): behavioural claims of README.md, docs/training.md, docs/family.md and docs/e2e.md
that a user acts on, checked by running them, where no other test pinned them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import innerloop
from innerloop.models import ModelConfig, build_model, generate
from innerloop.ops import scan

F64 = torch.float64


def _greedy(model, prompt, steps, **kwargs) -> list[list[int]]:
    return torch.stack([t for t, _ in generate(model, prompt, steps, temperature=0, **kwargs)], 1).tolist()


def _ended_on_the_second_of_two_eos_ids():
    """A model, a prompt, ``[a, b]`` and the step at which row 0 first samples ``b``; no row samples ``a``."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, num_heads=2, num_layers=1, intermediate_size=64)).eval()
    prompt = torch.randint(0, 256, (3, 4))
    free = _greedy(model, prompt, 20)
    unseen = next(t for t in range(256) if all(t not in row for row in free))
    second = free[0][2]
    return model, prompt, [unseen, second], free[0].index(second)


def test_a_row_ended_on_any_listed_eos_id_repeats_the_first_listed() -> None:
    # generate's docstring: a row that has sampled one of several eos ids "yields the first of them from
    # then on" (as transformers pads a finished row with one id).
    model, prompt, eos, step = _ended_on_the_second_of_two_eos_ids()
    row = _greedy(model, prompt, 20, eos_token_id=eos)[0]
    assert row[step] == eos[1] and set(row[step + 1 :]) == {eos[0]}


def test_the_docs_say_an_ended_row_repeats_the_first_listed_eos_id() -> None:
    """review s20 (LOW): docs/training.md said a row that has ended "repeats its end-of-sequence id"; with
    several ids it repeats the first listed (the test above), which the docs now say."""
    docs = " ".join((Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text().split())
    assert "repeats its end-of-sequence id (the first of `eos_token_id` when several are given" in docs


def test_scan_of_a_partial_last_mini_batch_returns_the_weights_its_last_token_read() -> None:
    # docs/family.md "What scan computes": for a partial last mini-batch scan returns "the weights it
    # read", i.e. out_t = q_t W_t of its last token, not the weights at the mini-batch's start.
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 4, dtype=F64) for _ in range(3))
    lr = 0.3 * torch.rand(1, 2, 10, dtype=F64)
    options = dict(inner_model="matrix", mini_batch_size=4, inner_norm=False, inner_residual=False)
    out, weights = scan(q, k, v, lr, **options)
    _, at_boundary = scan(q[:, :, :8], k[:, :, :8], v[:, :, :8], lr[:, :, :8], **options)
    torch.testing.assert_close(out[:, :, -1], (q[:, :, -1, None] @ weights["W"])[:, :, 0], rtol=0, atol=1e-12)
    assert not torch.allclose(weights["W"], at_boundary["W"])


@pytest.mark.parametrize("K", [1, 3, 4])
def test_momentum_rule_without_momentum_is_dual_form_at_tau_one(K: int) -> None:
    # docs/family.md: "With momentum=None it equals dual_form with tau = 1, for any K and decay" (T = 10
    # is no multiple of 3 or 4: a partial last mini-batch too).
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 10, 4, dtype=F64) for _ in range(3))
    lr, decay = 0.3 * torch.rand(1, 2, 10, dtype=F64), 0.2 * torch.rand(1, 2, 10, dtype=F64)
    common = dict(decay=decay, inner_model="matrix", mini_batch_size=K)
    momentum, _ = scan(q, k, v, lr, update_rule="momentum", **common)
    dual, _ = scan(q, k, v, lr, update_rule="dual_form", token_scale=torch.ones(K, dtype=F64), **common)
    torch.testing.assert_close(momentum, dual, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["GatedDeltaNetLayer", "TitansLayer"])
def test_family_base_lr_zero_neither_steps_nor_decays(name: str) -> None:
    # docs/family.md: "base_lr=0 turns a member's test-time training off altogether: Gated DeltaNet and
    # Titans then neither step nor decay."
    from innerloop.core import family_layers

    torch.manual_seed(2)
    layer = getattr(family_layers, name)(hidden_size=16, num_heads=2, base_lr=0.0).double()
    x = torch.randn(1, 20, 16, dtype=F64)
    start = layer.init_state(1, like=x).scan_weights()
    _, state = layer(x)
    end = state.scan_weights()
    for key, value in start.items():
        assert torch.equal(end[key], value), key


def test_readme_non_finite_ignore_spreads_over_the_whole_mini_batch_and_depends_on_the_split() -> None:
    # README: with non_finite="ignore" a NaN reaches "the outputs of its whole mini-batch, earlier tokens
    # included, and all later ones, so the outputs before it depend on how the sequence was split".
    torch.manual_seed(3)
    layer = innerloop.TTTLayer(16, 2, inner_model="linear", mini_batch_size=4, non_finite="ignore").double()
    x = torch.randn(1, 12, 16, dtype=F64)
    x[0, 6] = float("nan")
    whole, state = layer(x)
    assert torch.isnan(whole[0]).any(-1).nonzero().flatten().tolist() == list(range(4, 12))
    assert not state.is_finite()
    before, _ = layer(x[:, :6])
    assert bool(torch.isfinite(before).all())


def _tiny_run(out: Path, *extra: str) -> None:
    from innerloop.cli import main

    common = ["trainer.max_steps=2", "data.seq_len=32", "data.batch_size=2", "data.val_batches=1"]
    assert (
        main(["train", "--config", "tiny", *common, "trainer.progress_bar=false", *extra, f"out_dir={out}"])
        == 0
    )


@pytest.mark.slow  # two tiny training runs and three evaluations, ~6 s
def test_eval_names_windows_and_reproduces_the_run_validation(tmp_path) -> None:
    # docs/training.md "The main job": the run's files; eval reads the run's validation windows
    # (val_batches x batch_size) at the trained seq_len and gives the run's val_ppl; a checkpoint copied
    # elsewhere evaluates at the same length; --data files edited since give new files beside the old.
    import csv

    from innerloop.cli import main

    run = tmp_path / "run"
    _tiny_run(run)
    for name in ("last.safetensors", "config.yaml", "loss_by_position.png", "loss_by_position.csv"):
        assert (run / name).is_file(), name
    assert (run / "logs" / "version_0" / "metrics.csv").is_file()
    rows = [r for r in csv.DictReader(open(run / "logs" / "version_0" / "metrics.csv")) if r["val_ppl"]]
    assert main(["eval", str(run / "last.safetensors")]) == 0
    (evaluated,) = run.glob("eval_last-*_default-val_T32_n2.csv")
    assert (run / "loss_by_position.csv").read_text() == evaluated.read_text()
    assert float(rows[-1]["val_ppl"]) == pytest.approx(
        2.718281828459045 ** float(rows[-1]["val_loss"]), rel=1e-5
    )

    copied = tmp_path / "copied"
    copied.mkdir()
    shutil.copy(run / "last.safetensors", copied)
    assert main(["eval", str(copied / "last.safetensors"), "--batches", "1", "--batch-size", "2"]) == 0
    assert len(list(copied.glob("eval_last-*_default-val_T32_n2.csv"))) == 1

    data, out = tmp_path / "a.txt", tmp_path / "evals"
    data.write_text("hello world, this is text for evaluation. " * 20)
    assert (
        main(
            ["eval", str(run / "last.safetensors"), "--data", str(data), "--out", str(out), "--batches", "1"]
        )
        == 0
    )
    first = sorted(p.name for p in out.iterdir())
    assert (
        main(
            ["eval", str(run / "last.safetensors"), "--data", str(data), "--out", str(out), "--batches", "1"]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == first  # same settings, same data: its own files
    with open(data, "a") as f:
        f.write("more text. " * 5)
    os.utime(data, (1, 1))
    assert (
        main(
            ["eval", str(run / "last.safetensors"), "--data", str(data), "--out", str(out), "--batches", "1"]
        )
        == 0
    )
    assert len(list(out.iterdir())) == 2 * len(first)


@pytest.mark.slow  # a 4-step e2e-tiny run, ~3 s
def test_e2e_checkpoint_after_two_of_four_steps_runs_at_the_documented_inner_lr(tmp_path) -> None:
    # docs/e2e.md: "with max_steps=4 model.e2e.inner_lr_warmup_fraction=0.9 a checkpoint after 2 steps:
    # progress 0.5, inner lr 0.6"; a finished run is saved at 1.
    import lightning as L

    from innerloop.config import load_config
    from innerloop.train import load_model, train

    out, mid = tmp_path / "run", tmp_path / "mid.safetensors"

    class Grab(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 3 and not mid.exists():
                pending = out / ".last.safetensors.pending"
                shutil.copy(pending if pending.exists() else out / "last.safetensors", mid)

    overrides = [
        "trainer.max_steps=4",
        "trainer.checkpoint_every=2",
        "data.seq_len=48",
        "data.batch_size=2",
        "data.val_batches=1",
        "trainer.progress_bar=false",
        "model.e2e.inner_lr_warmup_fraction=0.9",
        f"out_dir={out}",
    ]
    run, config = load_config("e2e-tiny", overrides)
    train(run, config, callbacks=[Grab()])
    model = load_model(mid)
    assert float(model.outer_progress) == 0.5 and model.inner_lr() == pytest.approx(0.6)
    assert float(load_model(out / "last.safetensors").outer_progress) == 1.0
