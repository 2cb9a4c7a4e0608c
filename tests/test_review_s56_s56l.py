"""s56l: fair comparisons and evaluation (compare, eval, --no-ttt)."""

from __future__ import annotations

import shlex
import types

import pytest
import torch
from lm_testing import untrained_run

from innerloop.checkpoints import checkpoint_content_digest, innerloop_version
from innerloop.cli import _parser
from innerloop.config.load import ConfigError
from innerloop.core.layer import TTTLayer
from innerloop.models.ablation import modules_learning_at_test_time, no_test_time_training
from innerloop.plugins.optimizers.minibatch_gd import MiniBatchGD
from innerloop.train.compare import compare, comparison_id, write_comparison
from innerloop.train.run import _refuse_no_ttt_without_ttt


class _LrFloorStep(MiniBatchGD):
    """Mini-batch gradient descent at ``lr + 0.5``: a step that does not vanish at inner learning rate 0
    (as a sign step of fixed size, or a rule with a rate of its own)."""

    name = "s56l_lr_floor_step"

    def forward(self, state, task, views, lr, tau, **options):
        return super().forward(state, task, views, lr + 0.5, tau, **options)


def _layer_at_lr_0(monkeypatch, rule) -> TTTLayer:
    # the rule would be checked against a token-by-token reference at registration (seconds): not under test
    monkeypatch.setattr("innerloop.registry.check_instance", lambda kind, instance: None)
    torch.manual_seed(0)
    return TTTLayer(
        16, 2, inner_model="linear", update_rule=rule, mini_batch_size=4, base_lr=0.0, kernel="torch"
    )


@pytest.mark.slow  # 0.9 s at load 10 on 2 cores: the probe and eval's refusal, each a scan
def test_a_layer_at_lr_0_whose_rule_still_moves_the_weights_learns_at_test_time(monkeypatch):
    """A layer at base_lr 0 counted as "no test-time training" by its learning rate alone: with a rule
    that steps at lr 0, --no-ttt ran it unchanged (its weights moving) under a name saying TTT was off,
    and eval --no-ttt refused it as having "no test-time training to switch off"."""
    layer = _layer_at_lr_0(monkeypatch, _LrFloorStep())
    model = torch.nn.Sequential(layer)
    assert modules_learning_at_test_time(model) == ["0"]
    with pytest.raises(ValueError, match=r"the TTT layer '0': the update rule 's56l_lr_floor_step' .*moves"):
        with no_test_time_training(model):
            pass  # pragma: no cover
    assert layer.base_lr == 0.0

    module = types.SimpleNamespace(model=model)
    with pytest.raises(ConfigError, match=r"'run/last.safetensors': the TTT layer '0': the update rule"):
        _refuse_no_ttt_without_ttt(module, "run/last.safetensors", no_ttt=True)


def test_a_layer_at_lr_0_with_a_rule_that_keeps_the_weights_has_no_test_time_training(monkeypatch):
    layer = _layer_at_lr_0(monkeypatch, MiniBatchGD())
    model = torch.nn.Sequential(layer)
    assert modules_learning_at_test_time(model) == []
    with no_test_time_training(model) as switched:
        assert switched == 0


# -- the comparison's files: enough to reproduce it ----------------------------------------------------


@pytest.mark.slow  # two comparisons of two tiny models at two lengths (~1 s idle; 6 s at load 10 on 2 cores)
def test_the_comparison_table_records_how_to_reproduce_it_and_the_command_does(tmp_path):
    """compare-<id>.md held the table and notes but not the bootstrap seed or resamples, the window batch
    size, the versions or which checkpoint content was compared: a rerun could not be told apart from
    another comparison. Its "Reproduce" lines now hold them, and the command they give scores the same."""
    corpus = tmp_path / "corpus.py"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120)))
    runs = [
        untrained_run(tmp_path / n, corpus, m, s, 16, 3, 2) for n, m, s in (("a", "ttt", 0), ("b", "swa", 1))
    ]
    comparison = compare(runs, seq_lens=[8, 16], baseline="b", resamples=50, seed=3, batch_size=2)
    text = write_comparison(comparison, tmp_path / "out")[2].read_text()
    reproduce = text[text.index("Reproduce:") :]
    assert f"innerloop {innerloop_version()}, torch {torch.__version__}" in reproduce
    assert "bootstrap seed 3, 50 resamples" in reproduce
    for run in runs:
        assert checkpoint_content_digest(run / "last.safetensors")[:16] in reproduce
    command = reproduce.split("`innerloop ", 1)[1].split("`", 1)[0]
    args = _parser().parse_args(shlex.split(command))
    again = compare(
        args.models, args.seq_len, args.baseline, args.data, args.batch_size, args.batches,
        no_ttt=args.no_ttt, resamples=args.resamples, seed=args.seed, split=args.split, held_out=args.held_out,
    )  # fmt: skip
    assert comparison_id(again) == comparison_id(comparison)
    for first, second in zip(comparison.lengths, again.lengths, strict=True):
        assert torch.equal(first.loss_sums, second.loss_sums) and first.windows == second.windows == 6
    assert again.overall == comparison.overall


# -- compare names every training setting that differs from the baseline's ------------------------------


def _run_as_trained(out, corpus, mixer: str, seq_len: int, batch_size: int):
    """A run folder whose checkpoint records the schedule its config.yaml gives (as `innerloop train`
    writes it, untrained: 10 steps recorded)."""
    from dataclasses import asdict

    from innerloop.config.load import load_config, save_config
    from innerloop.train.checkpoint import save_checkpoint
    from innerloop.train.module import LanguageModelModule
    from innerloop.train.run import schedule_arguments

    overrides = [
        "model.hidden_size=16", "model.num_heads=2", "model.num_layers=1", "model.intermediate_size=32",
        f"model.mixer={mixer}", f"data.paths=[{corpus}]", f"data.seq_len={seq_len}",
        f"data.batch_size={batch_size}", f"out_dir={out}",
        *(["model.window=4"] if mixer == "swa" else []),  # (a TTT model warns that it reads no window)
    ]  # fmt: skip
    run, config = load_config("tiny", overrides)
    torch.manual_seed(0)
    module = LanguageModelModule(model=asdict(run.model), seq_len=seq_len, **schedule_arguments(run))
    tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 10}
    save_checkpoint(tree, out / "last.safetensors")
    save_config(config, out / "config.yaml")
    return out


@pytest.mark.slow  # four tiny checkpoints loaded (~0.4 s idle)
def test_a_model_trained_at_another_context_length_or_precision_is_named(tmp_path):
    """Two runs that took the same steps on the same tokens but at data.seq_len 16 and 32 (batch 4 and 2),
    or one in bf16-mixed and one in 32-true, were compared without a word: compare named other optim.*,
    max_steps, tokens and steps, not the training context length or precision."""
    from innerloop.train.compare import load_compared_model, optimizer_notes

    corpus = tmp_path / "corpus.py"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120)))
    short = _run_as_trained(tmp_path / "short", corpus, "swa", 16, 4)
    long = _run_as_trained(tmp_path / "long", corpus, "ttt", 32, 2)
    same = _run_as_trained(tmp_path / "same", corpus, "ttt", 16, 4)

    def models(*runs):
        return [load_compared_model(run / "last.safetensors", run.name, False) for run in runs]

    assert optimizer_notes(models(short, same), 0) == []
    (note,) = optimizer_notes(models(short, long), 0)
    assert note.startswith("long trained with data.seq_len=32, the baseline short with 16: its difference")
    config = same / "config.yaml"
    config.write_text(config.read_text().replace("precision: 32-true", "precision: bf16-mixed"))
    (note,) = optimizer_notes(models(short, same), 0)
    assert note.startswith(
        "same trained with trainer.precision='bf16-mixed', the baseline short with '32-true'"
    )
    # 'auto' chose by the machine that trained (bf16-mixed on a GPU, 32-true on a CPU): not known to differ
    config.write_text(config.read_text().replace("precision: bf16-mixed", "precision: auto"))
    assert optimizer_notes(models(short, same), 0) == []
