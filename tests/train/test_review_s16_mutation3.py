"""Review s16, mutation round 3: fast checks that pin what the surviving mutants of the outer optimizer
and its schedules changed.

- ``configure_optimizers`` puts every matrix (2 or more dims) in the decayed group and every vector
  in the group without weight decay;
- a resume's ``_apply_optimizer_hyperparameters`` gives the decayed group ``optim.weight_decay`` and
  the other 0, and the lr of the step the schedule reached (not the next step's);
- ``TTTBaseLRWarmup`` sets the TTT layers' base lr back to its peak for validation;
- a resume starts from the pending checkpoint a killed run left (the launch kept it only when it is
  later than ``last.safetensors``), not from the older ``last.safetensors``;
- ``compare`` divides each model's loss by the scored (not ignored) targets only;
- every validation logs the metrics of its own batches (``val_loss``/``val_ppl`` start afresh);
- an export's ``special_tokens`` (a converted model's own ids) win over its tokenizer's end of text;
- ``INNERLOOP_PLUGINS`` selects entry points by their name (not by the module they point to).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from innerloop.core.layer import TTTLayer
from innerloop.data.tokenizer import ByteTokenizer
from innerloop.hf.export import export_model
from innerloop.models import ModelConfig, build_model
from innerloop.registry import manager
from innerloop.train.compare import _evaluate_length, token_losses
from innerloop.train.data import IGNORE_INDEX
from innerloop.train.module import LanguageModelModule
from innerloop.train.run import _resume_checkpoint
from innerloop.train.run_dir import CHECKPOINT_FILE, PENDING_CHECKPOINT
from innerloop.train.schedules import TTTBaseLRWarmup, warmup_cosine

SMALL = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}


def _module(**hparams) -> LanguageModelModule:
    torch.manual_seed(0)
    return LanguageModelModule(model=SMALL, **hparams)


def test_weight_decay_applies_to_exactly_the_parameters_with_two_or_more_dims() -> None:
    module = _module(weight_decay=0.25)
    optimizer = module.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.25 and no_decay["weight_decay"] == 0.0
    matrices = {id(p) for p in module.parameters() if p.requires_grad and p.dim() >= 2}
    vectors = {id(p) for p in module.parameters() if p.requires_grad and p.dim() < 2}
    assert any(p.dim() == 2 for p in module.parameters())  # the embedding, the projections
    assert any(p.dim() > 2 for p in module.parameters())  # TTT's inner weights [heads, in, out]
    assert {id(p) for p in decay["params"]} == matrices
    assert {id(p) for p in no_decay["params"]} == vectors


def test_a_resume_applies_weight_decay_to_the_matrices_and_the_lr_of_the_step_reached() -> None:
    # The checkpoint's param groups are restored first: here, those of another lr and weight decay.
    module = _module(lr=0.3, min_lr=0.01, weight_decay=0.05, warmup_steps=2, max_steps=10)
    configured = module.configure_optimizers()
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    for _ in range(4):  # the resumed run reached optimizer step 4
        optimizer.step()
        schedule.step()
    for group in optimizer.param_groups:
        group.update(lr=123.0, weight_decay=0.5)
    module._trainer = SimpleNamespace(
        optimizers=[optimizer], lr_scheduler_configs=[SimpleNamespace(scheduler=schedule)]
    )
    module._apply_optimizer_hyperparameters()

    lr = warmup_cosine(4, 2, 10, 0.3, 0.01)
    decay, no_decay = optimizer.param_groups
    assert (decay["lr"], decay["weight_decay"]) == (pytest.approx(lr, rel=1e-15), 0.05)
    assert (no_decay["lr"], no_decay["weight_decay"]) == (pytest.approx(lr, rel=1e-15), 0.0)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])


def test_the_ttt_base_lr_warm_up_validates_at_the_peak_base_lr() -> None:
    module = _module()
    layers = [m for m in module.modules() if isinstance(m, TTTLayer)]
    assert layers
    warmup = TTTBaseLRWarmup(init=0.0, peak=1.0, warmup_steps=10)
    trainer = SimpleNamespace(global_step=3)
    warmup.on_train_batch_start(trainer, module, None, 0)
    assert [layer.base_lr for layer in layers] == [0.3] * len(layers)
    warmup.on_validation_start(trainer, module)
    assert [layer.base_lr for layer in layers] == [1.0] * len(layers)


def test_a_resume_starts_from_the_kept_pending_checkpoint_not_the_older_last_one(tmp_path) -> None:
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"step 4")
    assert _resume_checkpoint(tmp_path) == tmp_path / CHECKPOINT_FILE
    (tmp_path / PENDING_CHECKPOINT).write_bytes(b"step 6")  # kept by settle_pending_checkpoint
    assert _resume_checkpoint(tmp_path) == tmp_path / PENDING_CHECKPOINT


def test_compare_perplexity_counts_only_the_scored_targets() -> None:
    module = _module().eval()
    inputs = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(inputs, -1, dims=1)
    targets[0, :5] = IGNORE_INDEX  # e.g. a window's first tokens that an earlier one scored
    targets[2, -1] = IGNORE_INDEX
    model = SimpleNamespace(module=module, no_ttt=False, name="m")
    with torch.no_grad():
        result = _evaluate_length([model], inputs, targets, 2, 2, ByteTokenizer())
        losses = token_losses(module, inputs, targets, 2)
    scored = targets != IGNORE_INDEX
    assert int(result.counts.sum()) == int(scored.sum()) == 24 - 6
    mean = float(losses[scored].sum() / scored.sum())
    assert result.perplexity(0) == pytest.approx(math.exp(mean), rel=1e-12)


class _EntryPoint:
    """An installed entry point whose loading is recorded (and fails, so that nothing registers)."""

    def __init__(self, name: str, value: str, loaded: list[str]):
        self.name, self.value, self.dist, self._loaded = name, value, None, loaded

    def load(self):
        self._loaded.append(self.name)
        raise ImportError("not a real plugin")


def test_innerloop_plugins_loads_only_the_entry_points_it_names(monkeypatch) -> None:
    loaded: list[str] = []
    points = [_EntryPoint(n, f"pkg_{n}.plugin", loaded) for n in ("first", "chosen", "last")]
    monkeypatch.setattr(manager, "_entry_points", lambda: points)
    monkeypatch.delenv(manager.DISABLE_ENV, raising=False)
    monkeypatch.setenv(manager.ALLOW_ENV, " chosen ,")
    with pytest.warns(manager.PluginLoadWarning):
        manager.load_entry_point_plugins(manager.Registry())
    assert loaded == ["chosen"]


def test_each_validation_logs_the_loss_of_its_own_batches_only() -> None:
    module = _module(diagnostics_batches=0).eval()
    logged: dict[str, float] = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    batches = [torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    means = []
    with torch.no_grad():
        for ids in batches:  # two validations, one batch each
            inputs, targets = ids[:, :-1], ids[:, 1:]
            module.validation_step((inputs, targets), 0)
            module.on_validation_epoch_end()
            logits = module(inputs).float()
            means.append(float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets)))
            assert logged["val_loss"] == pytest.approx(means[-1], rel=1e-6)
            # val_ppl is exp of the mean loss: held to the loss's own tolerance (rel 1e-6 on val_ppl against
            # exp(means) would ask the loss for 1e-6 absolute, ~2e-7 relative: float32 logits on AVX2 are off by 2.2e-7)
            assert logged["val_ppl"] == pytest.approx(math.exp(logged["val_loss"]), rel=1e-6)
    assert abs(means[0] - means[1]) > 1e-3  # the two validations differ, so an accumulated mean would too


def test_an_exports_given_special_token_ids_win_over_the_tokenizers_end_of_text(tmp_path) -> None:
    # vocab_size 300 holds the byte tokenizer's end of text (id 256), which the export would write
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({**SMALL, "vocab_size": 300}))
    own = export_model(model, tmp_path / "own", tokenizer="bytes")
    assert json.loads((own / "config.json").read_text())["eos_token_id"] == 256
    given = export_model(model, tmp_path / "given", tokenizer="bytes", special_tokens={"eos_token_id": 7})
    for name in ("config.json", "generation_config.json"):
        assert json.loads((given / name).read_text())["eos_token_id"] == 7, name
