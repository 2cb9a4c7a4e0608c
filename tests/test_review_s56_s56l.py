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
