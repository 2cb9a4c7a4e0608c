"""Review s13 (the user journey), the training side:

- M2: NaN that a TTT layer's plugin computes while training is reported naming the layer and its plugins,
  not as a divergence with learning-rate advice; a real divergence still reads as one.
- M5: ``val_loss`` is the mean per scored token (``log(val_ppl)``) whatever the batches' sizes and padding.
- M6: validation batches of differing lengths are bucketed by position (``LossByPosition``), not refused.
- L2: a plugin registered in the process whose class source changed under the same ``module.Class``
  gets a ``PluginChangedWarning`` on reload.
"""

from __future__ import annotations

import importlib
import math
import sys
import textwrap
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from plugin_testing import without_key
from torch.utils.data import DataLoader

import innerloop
from innerloop import InnerLoss, LossPairs
from innerloop.checkpoints import (
    PLUGIN_SOURCES_KEY,
    PluginChangedWarning,
    load_checkpoint,
    load_model,
    plugin_source_digest,
)
from innerloop.models import ModelConfig, TTTConfig, build_model
from innerloop.registry import reset_registry
from innerloop.train import IGNORE_INDEX, LanguageModelModule, TrainingDivergedError
from innerloop.train.metrics import LossByPosition, position_buckets
from innerloop.train.module import NonFiniteLayerOutputError, save_model_checkpoint

EXPLODING = "review_s13_exploding"


def _trainer(**options) -> L.Trainer:
    quiet = dict(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    return L.Trainer(accelerator="cpu", devices=1, **quiet, **options)


def _module(num_layers: int = 1, inner_loss: str = "reconstruction") -> LanguageModelModule:
    torch.manual_seed(0)
    ttt = TTTConfig(mini_batch_size=8, inner_loss=inner_loss)
    config = ModelConfig(vocab_size=64, hidden_size=16, num_layers=num_layers, num_heads=2, ttt=ttt)
    return LanguageModelModule(config, lr=1e-3, max_steps=2, warmup_steps=0)


def _batch(batch_size: int = 2, length: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 64, (batch_size, length + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


# -- M2: NaN from a plugin, or a divergence --------------------------------------------------------------


class Exploding(InnerLoss):
    """Passes registration; once ``armed`` its gradient is NaN (a plugin fault only real data triggers)."""

    name = EXPLODING
    armed = False

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss(self, prediction, target):
        return 0.5 * (prediction - target).pow(2).sum(-1)

    def token_loss_grad(self, prediction, target):
        gradient = prediction - target
        return gradient * float("nan") if self.armed else gradient


@pytest.fixture
def exploding(fresh_global_registry, monkeypatch):
    innerloop.register_inner_loss(Exploding())
    monkeypatch.setattr(Exploding, "armed", True)
    return Exploding


def _assert_names_the_layer_and_its_plugins(message: str, layer: str) -> None:
    assert f"in the output of the TTT layer {layer!r}" in message, message
    assert f"inner loss {EXPLODING!r}" in message and "test_review_s13_train.Exploding" in message
    assert "inner model 'linear'" in message and "update rule" in message
    assert "training diverged" not in message
    # the layer's own diagnosis, one text (s54a; was "..., not the learning rate", silent on base_lr)
    assert "not the learning rate" not in message, message
    assert (
        "unless the step (inner learning rate times gradient) was too large: lower model.ttt.base_lr (now 1)"
        in message
    )


def test_a_plugins_nan_at_the_first_step_names_the_layer_and_its_plugins(exploding) -> None:
    module = _module(num_layers=2, inner_loss=EXPLODING)
    with pytest.raises(NonFiniteLayerOutputError) as error:
        module.training_step(_batch(), 0)
    message = str(error.value)
    _assert_names_the_layer_and_its_plugins(message, "model.blocks.0.mixer")  # the first of the two
    assert message.startswith("the training loss is nan after 0 optimizer steps")
    assert "rising before" not in message  # no finite loss yet: no divergence to suspect
    assert isinstance(error.value, TrainingDivergedError)  # a run stops on it as on a divergence
    assert all(layer.non_finite == "raise" for _, layer in module._checked_layers)  # checks back on


def test_a_plugins_nan_after_finite_steps_also_says_what_a_divergence_would_look_like(exploding) -> None:
    module = _module(inner_loss=EXPLODING)
    exploding.armed = False
    module.training_step(_batch(), 0)  # a finite loss first
    exploding.armed = True
    with pytest.raises(NonFiniteLayerOutputError) as error:
        module.training_step(_batch(seed=1), 1)
    _assert_names_the_layer_and_its_plugins(str(error.value), "model.blocks.0.mixer")
    assert "if the training loss was rising before (last finite " in str(error.value)


@pytest.mark.filterwarnings(
    "ignore:You defined a .validation_step. but have no .val_dataloader."
)  # the first fit
def test_a_plugins_nan_while_fitting_names_the_plugin_in_training_and_in_validation(exploding) -> None:
    module = _module(inner_loss=EXPLODING)
    loader = DataLoader([_batch()], batch_size=None)
    with pytest.raises(NonFiniteLayerOutputError, match="the training loss is nan after 0 optimizer steps"):
        _trainer(max_steps=1, limit_val_batches=0).fit(module, loader)

    class ArmAtValidation(L.Callback):
        def on_validation_start(self, trainer, pl_module) -> None:
            exploding.armed = True

    exploding.armed = False
    with pytest.raises(NonFiniteLayerOutputError) as error:
        _trainer(max_steps=1, num_sanity_val_steps=0, callbacks=[ArmAtValidation()]).fit(
            module, loader, loader
        )
    assert str(error.value).startswith("the validation loss is not finite after 1 optimizer step")
    _assert_names_the_layer_and_its_plugins(str(error.value), "model.blocks.0.mixer")


def test_train_keeps_the_plugin_error_and_adds_the_checkpoint_note(exploding, tmp_path) -> None:
    """``train()`` appends what became of the checkpoint to a divergence error; it keeps the class, so a
    caller of train() can tell a plugin's NaN from a divergence."""
    from innerloop.config import load_config
    from innerloop.train import train

    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    overrides = [
        f"model.ttt.inner_loss={EXPLODING}",
        "model.hidden_size=16",
        "model.num_heads=2",
        "model.num_layers=1",
        "data.seq_len=32",
        "data.batch_size=2",
        "trainer.max_steps=1",
        "trainer.progress_bar=false",
        f"data.paths=[{text}]",
        f"out_dir={tmp_path / 'run'}",
    ]
    run, config = load_config("tiny", overrides)
    with pytest.raises(NonFiniteLayerOutputError) as error:
        train(run, config)
    _assert_names_the_layer_and_its_plugins(str(error.value), "model.blocks.0.mixer")
    assert "no checkpoint was written" in str(error.value)


def _diverged(module: LanguageModelModule) -> str:
    with pytest.raises(TrainingDivergedError) as error:
        module.training_step(_batch(), 0)
    assert not isinstance(error.value, NonFiniteLayerOutputError), error.value
    message = str(error.value)
    assert (
        message.startswith("training diverged: the training loss is nan") and "so lr, its warm-up" in message
    )
    return message


def test_nan_reaching_a_ttt_layers_input_from_earlier_is_a_divergence() -> None:
    module = _module(num_layers=2)
    with torch.no_grad():
        module.model.blocks[0].mlp.down_proj.weight.fill_(float("inf"))  # block 1's TTT layer sees inf
    _diverged(module)


def test_a_loss_that_blows_up_after_finite_ttt_layers_is_a_divergence() -> None:
    module = _module()
    with torch.no_grad():
        module.model.norm.weight.fill_(float("inf"))  # after every layer: the logits
    _diverged(module)


def test_a_ttt_layer_whose_own_weights_turned_non_finite_is_a_divergence() -> None:
    module = _module()
    with torch.no_grad():
        module.model.blocks[0].mixer.learnable_ttt_lr_bias.fill_(float("nan"))  # an optimizer step wrote it
    message = _diverged(module)
    assert "the weights of the TTT layer 'model.blocks.0.mixer' hold NaN or inf" in message


def test_a_ttt_layer_that_overflows_on_huge_input_is_a_divergence() -> None:
    module = _module()
    with torch.no_grad():
        module.model.blocks[0].mixer_norm.weight.fill_(1e30)  # the activations grew out of range
    _diverged(module)


# -- M5: val_loss per scored token -----------------------------------------------------------------------


def test_val_loss_is_the_mean_per_scored_token_with_uneven_and_padded_batches() -> None:
    module = _module()
    inputs, targets = _batch(batch_size=5, length=16)
    targets = targets.clone()
    targets[2, 5:] = IGNORE_INDEX  # a padded window in the first batch
    targets[4, 3:] = IGNORE_INDEX  # the second batch: one window with 3 scored tokens
    batches = [(inputs[:4], targets[:4]), (inputs[4:], targets[4:])]
    result = _trainer().validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]
    with torch.no_grad():
        logits = module.eval()(inputs)
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX)  # scored mean
    assert result["val_loss"] == pytest.approx(float(per_token), rel=1e-6)  # was 5.5654 vs 5.5596 in j7
    # the same float64 sums; val_loss is logged in float32 (rounded by at most half its epsilon)
    assert result["val_loss"] == pytest.approx(
        math.log(result["val_ppl"]), rel=torch.finfo(torch.float32).eps
    )


# -- M6: validation batches of differing lengths -----------------------------------------------------------


def test_validation_batches_of_differing_lengths_are_bucketed_by_position() -> None:
    module = _module()
    batches = [_batch(batch_size=3, length=12, seed=1), _batch(batch_size=2, length=20, seed=2)]
    result = _trainer().validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]
    sums, counts = torch.zeros(20, dtype=torch.float64), torch.zeros(20, dtype=torch.float64)
    with torch.no_grad():
        for inputs, targets in batches:
            loss = F.cross_entropy(module.eval()(inputs).transpose(1, 2), targets, reduction="none")
            sums[: inputs.shape[1]] += loss.double().sum(0)
            counts[: inputs.shape[1]] += inputs.shape[0]
    for b, (start, end) in enumerate(position_buckets(20, module.hparams.num_position_buckets)):
        expected = float(sums[start:end].sum() / counts[start:end].sum())
        assert result[f"val_loss_pos/{b}"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("order", [(6, 4), (4, 6)])
def test_loss_by_position_of_varying_lengths_does_not_depend_on_their_order(order) -> None:
    metric = LossByPosition(num_buckets=3, varying_lengths=True)
    for length in order:
        metric.update(torch.arange(length, dtype=torch.float32).repeat(2, 1))
    assert metric.seq_len == 6 and metric.buckets() == [(0, 2), (2, 4), (4, 6)]
    # positions 0..3 are in both batches (loss = the position), 4 and 5 only in the 6-long one
    torch.testing.assert_close(metric.compute(), torch.tensor([0.5, 2.5, 4.5]))
    torch.testing.assert_close(metric.count, torch.tensor([8.0, 8.0, 4.0], dtype=torch.float64))


def test_loss_by_position_without_varying_lengths_says_how_to_allow_them() -> None:
    metric = LossByPosition(num_buckets=2)
    metric.update(torch.ones(1, 4))
    with pytest.raises(ValueError, match="got length 5; construct it with varying_lengths=True"):
        metric.update(torch.ones(1, 5))


def test_loss_by_position_syncs_processes_that_saw_different_lengths() -> None:
    """Two processes whose longest batches differ: the per-position sums are extended to the longest
    before torchmetrics stacks them (a fake all-gather stands for the second process)."""
    here, there = LossByPosition(2, varying_lengths=True), LossByPosition(2, varying_lengths=True)
    here.update(torch.full((1, 2), 1.0))
    there.update(torch.full((1, 4), 3.0))
    gathered = iter([torch.tensor([4]), there.loss_by_position, there.count_by_position])

    def all_gather(tensor, group=None):
        return [tensor, next(gathered)]

    here._sync_dist(all_gather)
    torch.testing.assert_close(here.compute(), torch.tensor([2.0, 3.0]))  # (1+1+3+3)/4, (3+3)/2


def test_loss_by_position_forward_of_another_length_adds_to_the_sums() -> None:
    metric = LossByPosition(2, varying_lengths=True)
    metric.update(torch.full((1, 2), 1.0))
    batch_value = metric(torch.full((1, 4), 3.0))  # torchmetrics' forward: this batch, then merged
    torch.testing.assert_close(batch_value, torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(metric.compute(), torch.tensor([2.0, 3.0]))


# -- L2: a plugin's source changed under the same class ---------------------------------------------------

PLUGIN_MODULE = "review_s13_plugin_source"
PLUGIN_SOURCE = """
    from innerloop import InnerLoss, LossPairs

    class Recon(InnerLoss):
        name = "review_s13_recon"

        def pairs(self, views, carry):
            return LossPairs(views.key, views.value)

        def token_loss(self, prediction, target):
            return {body}
"""
SQUARED = "0.5 * (prediction - target).pow(2).sum(-1)"


def _plugin_class(tmp_path, body: str) -> type:
    """The class ``review_s13_plugin_source.Recon`` with ``token_loss`` returning ``body``, (re)imported
    from its file in ``tmp_path``."""
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(textwrap.dedent(PLUGIN_SOURCE.format(body=body)))
    sys.modules.pop(PLUGIN_MODULE, None)
    importlib.invalidate_caches()
    return importlib.import_module(PLUGIN_MODULE).Recon


@pytest.fixture
def plugin_file(tmp_path, monkeypatch, fresh_global_registry):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop(PLUGIN_MODULE, None)


def _saved_with(cls: type, path) -> object:
    innerloop.register_inner_loss(cls())
    config = ModelConfig(
        vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, ttt=TTTConfig(inner_loss=cls.name)
    )
    torch.manual_seed(0)
    return save_model_checkpoint(build_model(config), path)


def _plugin_warnings(path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(path)
    return [str(w.message) for w in caught if issubclass(w.category, PluginChangedWarning)]


def test_a_plugin_whose_source_changed_under_the_same_class_is_warned_about(plugin_file) -> None:
    path = _saved_with(_plugin_class(plugin_file, SQUARED), plugin_file / "c.safetensors")
    reset_registry()
    innerloop.register_inner_loss(_plugin_class(plugin_file, SQUARED.replace("0.5", "2.0"))())
    messages = _plugin_warnings(path)
    assert len(messages) == 1, messages
    assert "inner loss 'review_s13_recon'" in messages[0] and f"{PLUGIN_MODULE}.Recon" in messages[0]
    assert "source" in messages[0] and "its code changed" in messages[0]


def test_the_same_source_loads_quietly_and_is_recorded(plugin_file) -> None:
    cls = _plugin_class(plugin_file, SQUARED)
    path = _saved_with(cls, plugin_file / "c.safetensors")
    digest = plugin_source_digest(cls)
    assert digest is not None and len(digest) == 64
    assert load_checkpoint(path)[PLUGIN_SOURCES_KEY] == {"inner_loss": {"review_s13_recon": digest}}
    reset_registry()
    innerloop.register_inner_loss(_plugin_class(plugin_file, SQUARED)())  # imported again, unchanged
    assert _plugin_warnings(path) == []


def test_a_run_records_the_source_it_started_with_when_the_file_is_edited_during_it(plugin_file) -> None:
    """A plugin file edited while a run goes on (to prepare the next experiment) does not change what
    the run's checkpoints record: the source is read when the run's module is built."""
    cls = _plugin_class(plugin_file, SQUARED)
    innerloop.register_inner_loss(cls())
    started_with = plugin_source_digest(cls)
    config = ModelConfig(
        vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, ttt=TTTConfig(inner_loss=cls.name)
    )
    module = LanguageModelModule(config, lr=1e-3, max_steps=2, warmup_steps=0)
    (plugin_file / f"{PLUGIN_MODULE}.py").write_text(
        textwrap.dedent(PLUGIN_SOURCE.format(body=SQUARED.replace("0.5", "2.0")))
    )
    assert plugin_source_digest(cls) != started_with  # the file now reads otherwise
    path = save_model_checkpoint(module.model, plugin_file / "c.safetensors")
    assert load_checkpoint(path)[PLUGIN_SOURCES_KEY] == {"inner_loss": {"review_s13_recon": started_with}}


def test_a_checkpoint_without_source_digests_loads_quietly(plugin_file) -> None:
    path = _saved_with(_plugin_class(plugin_file, SQUARED), plugin_file / "c.safetensors")
    old = without_key(path, plugin_file / "old.safetensors", PLUGIN_SOURCES_KEY)
    reset_registry()
    innerloop.register_inner_loss(_plugin_class(plugin_file, SQUARED.replace("0.5", "2.0"))())
    assert _plugin_warnings(old) == []
    assert len(_plugin_warnings(path)) == 1  # the same change, recorded


def test_a_class_without_readable_source_records_no_digest(fresh_global_registry, tmp_path) -> None:
    namespace: dict = {}
    exec(textwrap.dedent(PLUGIN_SOURCE.format(body=SQUARED)), namespace)  # no file to read
    cls = namespace["Recon"]
    assert plugin_source_digest(cls) is None
    path = _saved_with(cls, tmp_path / "c.safetensors")
    assert load_checkpoint(path)[PLUGIN_SOURCES_KEY] == {}
    assert _plugin_warnings(path) == []


# -- a batch with no scored target (review s14) ----------------------------------------------------------


def test_a_batch_with_no_scored_target_is_a_zero_loss_not_a_divergence() -> None:
    # Before: the mean over nothing, NaN, stopped the run as "the training loss is nan".
    module = _module()
    inputs, targets = _batch()
    loss = module.training_step((inputs, torch.full_like(targets, IGNORE_INDEX)), 0)
    assert loss.item() == 0.0 and loss.requires_grad
    partly = targets.clone()
    partly[0] = IGNORE_INDEX
    logits = module(inputs)
    expected = F.cross_entropy(logits.flatten(0, 1), partly.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(module.training_step((inputs, partly), 0), expected)


def test_a_nan_from_a_layer_of_built_in_plugins_reads_as_a_divergence_naming_the_layer() -> None:
    # Before: the built-in plugins were named the likely source, "not the learning rate" (review s14).
    module = _module()
    with torch.no_grad():
        # finite, but the inner weights' products overflow (a q_proj this large no longer does: the
        # query's huge output rows are normalised exactly since review s30b, as in float64)
        module.model.blocks[0].mixer.k_proj.weight.mul_(1e37)
    with pytest.raises(TrainingDivergedError) as error:
        module.training_step(_batch(), 0)
    message = str(error.value)
    assert not isinstance(error.value, NonFiniteLayerOutputError)
    assert "output of the TTT layer 'model.blocks.0.mixer'" in message
    assert "plugins are all built in" in message and "so lr, its warm-up" in message
