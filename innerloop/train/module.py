"""The outer loop: a LightningModule that trains a language model (a :class:`~innerloop.models.CausalLM`,
or an :class:`~innerloop.models.E2ELM` for ``mixer: e2e``).

AdamW with decoupled weight decay (0.1 by default, on every parameter of 2 or more dimensions: the
weight matrices, and a TTT layer's per-head tensors too, its inner initial weights and biases, inner
LayerNorm and learning-rate gate; not on 1-d ones such as the blocks' norms), linear warm-up then a
decay to ``min_lr`` (``schedule``: cosine by default, see :mod:`innerloop.train.schedules`), gradient clipping
through the Trainer (``gradient_clip_val``). Each training row logs ``train_loss`` (the mean over the
optimizer step's micro-batches), ``lr`` (the rate that step applied) and ``grad_norm`` (the L2 norm of
its gradients before clipping; not under a sharding strategy). Validation logs
``val_loss`` (the mean loss per scored token, ``log(val_ppl)`` where that is finite, whatever the batches' sizes and
padding), ``val_ppl``, ``val_acc`` (next-token accuracy on scored tokens; NaN where none is), the loss by position
(``val_loss_pos/<bucket>``, bucketed up to the longest validation batch: batches may differ in length)
and, for TTT models, the inner loss before and after the updates of each layer
(``inner_loss_before/<layer>``, ``inner_loss_after/<layer>``).

A training (or, while fitting, validation) loss that is NaN or inf raises :class:`TrainingDivergedError`
with the step, the last finite loss and what to try; NaN produced inside the model is reported so too,
not as bad input of a TTT layer (the input is token ids). When the NaN first appeared in a TTT layer's
output from finite input of moderate size, with the layer's weights finite, the error is a
:class:`NonFiniteLayerOutputError` naming that layer and its plugins (the likely source) instead.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torchmetrics import Metric

from innerloop.checkpoints import (
    PLUGIN_SOURCES_KEY,
    PLUGINS_KEY,
    TOKEN_INDEX_KEY,
    TOKENIZER_KEY,
    CheckpointError,
    cast_to_stored_dtypes,
    check_held_plugins,
    check_plugin_settings,
    check_state_dict,
    checkpoint_device,
    describe_model,
    is_safetensors_file,
    load_checkpoint,
    load_weights,
    plugin_record,
    plugin_sources,
    rebuild_error,
    remake_recorded_token_index,
    run_kernels_that_work_here,
    save_checkpoint,
    saved_model_config,
    token_index_made_in,
    warn_changed_plugins,
    widest_parameter_dtype,
)
from innerloop.checkpoints import load_model as load_model  # re-exported: its old home
from innerloop.config.load import built_from_a_config, checkpoint_path_problem, setting_name
from innerloop.config.schema import FIELD_BOUNDS
from innerloop.core.callers import warning_stacklevel
from innerloop.core.compiled import is_compiled_name, plain_name, plain_names
from innerloop.core.diagnostics import inner_loss_before_after
from innerloop.core.functional import check_flag, mean_scored_cross_entropy
from innerloop.core.layer import LARGE_INPUT, is_built_in, plugin_label
from innerloop.core.wording import a_type, counted
from innerloop.models import E2ELM, CausalLM, ModelConfig, build_model
from innerloop.models.config import (
    AT_LEAST_0,
    E2E,
    FAMILY_MIXERS,
    FRACTION,
    SEQ_LEN_BOUNDS,
    Bounds,
    check_weight_decay,
    checked_number,
)
from innerloop.models.e2e import NonFiniteInnerStepError
from innerloop.models.lm import check_token_ids
from innerloop.registry.modules import OPTION, load_plugin_module, loaded_plugin_modules
from innerloop.train.data import IGNORE_INDEX, Batch
from innerloop.train.interrupt import optimizer_step_ends_here
from innerloop.train.metrics import (
    AllOrNothingAccuracy,
    Float64Perplexity,
    InnerLossDiagnostics,
    LossByPosition,
)
from innerloop.train.schedules import Schedule, make_schedule
from innerloop.train.schedules import warmup_cosine as warmup_cosine  # re-exported: its old home

SHARDING_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
"""Strategies that shard the gradients over the processes: no process sees the whole gradient."""

log = logging.getLogger(__name__)

_NUMBER_ARGUMENTS: dict[str, tuple[type, Bounds]] = {  # a config key's range is the config's (one table)
    "lr": (float, FIELD_BOUNDS["optim.lr"]),
    "weight_decay": (float, FIELD_BOUNDS["optim.weight_decay"]),
    "min_lr": (float, FIELD_BOUNDS["optim.min_lr"]),
    "warmup_steps": (int, AT_LEAST_0),
    "max_steps": (int, FIELD_BOUNDS["trainer.max_steps"]),  # it was >= 1: 10**400 was taken
    "decay_steps": (int, AT_LEAST_0),
    "num_position_buckets": (int, FIELD_BOUNDS["trainer.num_position_buckets"]),
    "diagnostics_batches": (int, FIELD_BOUNDS["trainer.diagnostics_batches"]),
}


def _checked_hyperparameters(**arguments: Any) -> dict[str, Any]:
    """:class:`LanguageModelModule`'s arguments as plain values (what its checkpoint stores), each of
    its type and in its range; ``ValueError`` naming the argument otherwise (from Python nothing else
    checks them: a NaN ``lr`` would train to NaN, a ``beta`` of 1.5 diverge)."""
    checked = dict(arguments)
    for name, (kind, bounds) in _NUMBER_ARGUMENTS.items():
        checked[name] = checked_number(name, arguments[name], kind, bounds)
    if arguments["seq_len"] is not None:
        checked["seq_len"] = checked_number("seq_len", arguments["seq_len"], int, SEQ_LEN_BOUNDS)  # data's
    betas = arguments["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas={betas!r} must be a pair (beta1, beta2), each {FRACTION.describe()}")
    checked["betas"] = tuple(
        checked_number(f"betas[{i}]", beta, float, FRACTION) for i, beta in enumerate(betas)
    )
    if checked["min_lr"] > checked["lr"] and checked["schedule"] != "constant":  # constant never reads it
        raise ValueError(
            f"min_lr={checked['min_lr']} must be <= lr={checked['lr']} (the schedule decays from lr to min_lr)"
        )
    check_weight_decay(checked["lr"], checked["weight_decay"])
    _check_phases(checked["schedule"], checked["warmup_steps"], checked["decay_steps"], checked["max_steps"])
    # a known name, and a schedule these numbers make
    make_schedule(
        checked["schedule"],
        *(checked[k] for k in ("warmup_steps", "max_steps", "lr", "min_lr", "decay_steps")),
    )
    return checked


def _check_phases(schedule: str, warmup_steps: int, decay_steps: int, max_steps: int) -> None:
    """The schedule's phases fit in ``max_steps``: ``decay_steps`` at most ``max_steps``, and a ``wsd``
    decay that starts after the warm-up (as the config's ``warmup_fraction`` and ``decay_fraction``
    make it): one that starts inside the warm-up drops the learning rate from ``lr`` at the warm-up's
    end in one step. (A warm-up longer than the run is warned of in ``configure_optimizers``.)"""
    if decay_steps > max_steps:
        raise ValueError(f"decay_steps={decay_steps} must be in [0, max_steps={max_steps}]")
    if schedule == "wsd" and warmup_steps <= max_steps < warmup_steps + decay_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} + decay_steps={decay_steps} must be <= max_steps={max_steps}: "
            f"schedule='wsd' decays over its last decay_steps steps, which here start inside the warm-up "
            f"(at step {max_steps - decay_steps}), so lr would drop at the warm-up's end in one step"
        )


class TrainingDivergedError(RuntimeError):
    """The training loss (or the weights) became NaN or inf; the message says when and what to try."""


class NonFiniteLayerOutputError(TrainingDivergedError):
    """While training, NaN or inf first appeared in a TTT layer's output from finite input of moderate
    size: the likely source is the layer's plugins not built in, unless one inner step (model.ttt.base_lr
    times a gradient) was too large; the message names the layer and its plugins, in the layer's own
    words (:meth:`~innerloop.core.layer.TTTLayer.plugin_nan_diagnosis`). (A :class:`TrainingDivergedError`, so that a run stops on it as on a divergence,
    keeping its last good checkpoint.)"""


LayerCall = tuple[str, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""One call of a checked layer while training: its name, and its input's and output's (min, max)."""


@contextmanager
def _non_finite_propagates(
    layers: list[tuple[str, torch.nn.Module]], calls: list[LayerCall]
) -> Iterator[None]:
    """Let NaN and inf through the input and output checks of ``layers`` (``(name, TTT layer)`` with
    ``non_finite='raise'``), appending to ``calls`` the range of each call's input and output.

    In training the model's input is token ids, so NaN reaching a layer's input is the run diverging,
    where the layer's input check would blame the input. A non-finite loss is traced through ``calls``
    instead (:func:`_first_non_finite_output`). Recording costs one reduction of each input and output
    (as the layer's own checks do) and no device sync: the ranges are read only when the loss is not
    finite.
    """

    def record(name: str) -> Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = args[0] if args else kwargs.get("x")
            y = output[0] if isinstance(output, tuple) else output
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.numel() and y.numel():
                calls.append((name, torch.aminmax(x.detach()), torch.aminmax(y.detach())))

        return hook

    hooks = [layer.register_forward_hook(record(name), with_kwargs=True) for name, layer in layers]
    for _, layer in layers:
        layer.non_finite = "ignore"
    try:
        yield
    finally:
        for (_, layer), hook in zip(layers, hooks, strict=True):
            layer.non_finite = "raise"
            hook.remove()


def _largest(value_range: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The largest magnitude in a tensor, from its ``(min, max)``: NaN if it holds NaN, inf if inf."""
    low, high = (float(v) for v in value_range)
    return math.nan if math.isnan(low) or math.isnan(high) else max(-low, high)


@contextmanager
def _inner_step_non_finite_diverges(steps: int, fitting: bool = True, model: Any = None) -> Iterator[None]:
    """While ``fitting``, a TTT-E2E plugin's non-finite inner step (:class:`NonFiniteInnerStepError`,
    ``model.e2e.non_finite="raise"``) is a :class:`TrainingDivergedError` with its message (``steps``: the
    optimizer steps taken), as a TTT layer's plugin NaN is: the run stops on it keeping its last good
    checkpoint, not promoting the pending one, whose next loss is the NaN, as after a crash. While
    fitting, ``model``'s own diagnosis of an inner loop gone NaN without a plugin's fault
    (``E2ELM.diagnoses_its_inner_loop``) is off: the loss check, agreed by every process, says it (one
    process raising alone would leave the others waiting at the next collective)."""
    diagnoses = getattr(model, "diagnoses_its_inner_loop", None)
    if fitting and diagnoses is not None:
        model.diagnoses_its_inner_loop = False
    try:
        yield
    except NonFiniteInnerStepError as error:
        if not fitting:
            raise
        raise TrainingDivergedError(f"after {counted(steps, 'optimizer step')}, {error}") from error
    finally:
        if fitting and diagnoses is not None:
            model.diagnoses_its_inner_loop = diagnoses


def _first_non_finite_output(calls: list[LayerCall]) -> tuple[str, float] | None:
    """``(layer name, largest |input|)`` of the first call in ``calls`` whose output holds NaN or inf
    while its input is finite and of moderate size (below :data:`~innerloop.core.layer.LARGE_INPUT`,
    where an overflow cannot be the cause); None when there is none, or when the first non-finite
    output came from non-finite or huge input (the run diverging before that layer)."""
    for name, input_range, output_range in calls:
        if math.isfinite(_largest(output_range)):
            continue
        largest_input = _largest(input_range)
        if math.isfinite(largest_input) and largest_input < LARGE_INPUT:
            return name, largest_input
        return None
    return None


def inner_lr_key(config: Any) -> str | None:
    """The config key of the inner learning rate of a model of ``config`` (a :class:`ModelConfig`):
    ``model.ttt.base_lr``, ``model.family.base_lr`` for the family's mixers, ``model.e2e.inner_lr``;
    None for a mixer without one (attention)."""
    mixer = getattr(config, "mixer", None)
    if mixer in FAMILY_MIXERS:
        return "model.family.base_lr"
    return {"ttt": "model.ttt.base_lr", E2E: "model.e2e.inner_lr"}.get(mixer)


def _config_value(config: Any, key: str) -> Any:
    """The value of ``key`` (``model.ttt.base_lr``) in the model config ``config``."""
    node = config
    for part in key.split(".")[1:]:
        node = getattr(node, part)
    return node


def _compile_free_names(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """A state-dict hook: the names of the weights of a part compiled in place
    (``module.model = torch.compile(module.model)``, or one block) without torch.compile's ``_orig_mod``
    segment (:func:`~innerloop.checkpoints.plain_names`), so that every checkpoint of the module
    (Lightning's, :func:`save_model_checkpoint`) names them as the uncompiled model does and loads into
    one (``innerloop eval``, ``load_from_checkpoint``)."""
    if not any(map(is_compiled_name, state_dict)):  # no part compiled: the names are the plain ones
        return
    ours = {key: state_dict.pop(key) for key in [key for key in state_dict if key.startswith(prefix)]}
    state_dict.update(plain_names(ours, "the module's state_dict"))


def _compiled_names(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """A load-state-dict pre-hook, :func:`_compile_free_names` undone: weights named as the uncompiled
    model names them, or with ``_orig_mod`` segments (a file of an earlier innerloop, a user's
    ``torch.save(compiled.state_dict())``), load into the module whether its parts are compiled or not
    (a resume with ``ckpt_path``)."""
    ours = {key: state_dict.pop(key) for key in [key for key in state_dict if key.startswith(prefix)]}
    state_dict.update(plain_names(ours, "the state_dict given"))
    names = [name for name, _ in module.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in module.named_buffers(remove_duplicate=False)]
    for name in names:
        plain = prefix + plain_name(name)
        if plain != prefix + name and plain in state_dict:
            state_dict[prefix + name] = state_dict.pop(plain)


def _per_item(values: torch.Tensor) -> torch.Tensor:
    """A metric's per-bucket or per-layer values as a 1-d tensor: torchmetrics squeezes a one-element
    result to 0-d (one layer, one position bucket), which cannot be indexed or iterated."""
    return values.reshape(-1)


def _rewind_to_the_last_optimizer_step(checkpoint: dict[str, Any], accumulate: int) -> None:
    """Make a Lightning checkpoint written in the middle of a gradient accumulation (after a validation
    that ``val_check_interval``, counted in batches, placed there; or ``ModelCheckpoint``'s
    ``train_time_interval``) record the batches of its last optimizer step only.

    Its weights and optimizer are those after ``global_step`` steps; the micro-batches read since are
    in no saved state (their gradient is not saved). Lightning restores its count of batches read, while
    the data resumes at ``global_step * accumulate_grad_batches``: the first resumed step would take
    fewer micro-batches and every later step pair other batches. With the count rewound to the step
    boundary, the resume reads those micro-batches again and continues as the uninterrupted run (the
    validation after them runs again, on the same weights). A checkpoint whose loop state is not
    Lightning's usual layout is left as it is."""
    loops = checkpoint.get("loops")
    fit_loop = loops.get("fit_loop") if isinstance(loops, dict) else None
    progress = fit_loop.get("epoch_loop.batch_progress") if isinstance(fit_loop, dict) else None
    if accumulate <= 1 or not isinstance(progress, dict) or progress.get("is_last_batch"):
        return  # the epoch's last batch ends its accumulation whatever the count
    try:
        # batches whose training step ran (a checkpoint written in on_train_batch_end has not counted its
        # batch as completed yet, and Lightning completes it on restart)
        surplus = int(progress["current"]["processed"]) % accumulate
        counts = [progress["total"], progress["current"]]
        # (one written in on_train_batch_end at an epoch's first batch has completed 0 < surplus: its
        # count goes to -1, which Lightning's restart completes to the step boundary, 0)
        if surplus and all(int(c["processed"]) >= surplus for c in counts):
            loop_state = fit_loop["epoch_loop.state_dict"]
            stepped = int(loop_state["_batches_that_stepped"])
            # Lightning's restart of one written in on_train_batch_end (its batch not completed) counts the
            # completed batch's optimizer step in its loggers' step (now at a step boundary): counted already
            if int(progress["total"]["completed"]) == int(progress["total"]["processed"]) - 1:
                stepped -= 1
            for c in counts:
                c.update({key: int(value) - surplus for key, value in c.items()})
            loop_state["_batches_that_stepped"] = stepped
    except (KeyError, TypeError, AttributeError, ValueError):
        return


class _ModuleSchedule(torch.optim.lr_scheduler.LambdaLR):
    """The ``LambdaLR`` that :meth:`LanguageModelModule.configure_optimizers` builds (the same state, so
    the same checkpoints): its own class marks it, so that ``on_train_start`` re-applies the module's
    hyperparameters to it and never to a subclass's own optimizer and scheduler."""


class LanguageModelModule(L.LightningModule):
    """Trains a causal LM with next-token cross-entropy.

    Args:
        model: the model's configuration (a :class:`ModelConfig` or its ``to_dict()`` form).
        lr: peak learning rate.
        weight_decay: AdamW weight decay, applied to parameters with 2 or more dims.
        betas: AdamW betas.
        warmup_steps: optimizer steps of linear warm-up.
        max_steps: the step at which the schedule reaches ``min_lr``: the Trainer's ``max_steps`` (a fit
            whose Trainer will take another number of optimizer steps logs a warning).
        min_lr: final learning rate.
        schedule: ``cosine``, ``linear``, ``constant`` or ``wsd`` (:mod:`innerloop.train.schedules`).
        decay_steps: the steps over which ``wsd`` decays (its last ones before ``max_steps``).
        num_position_buckets: buckets of the loss-by-position metric.
        diagnostics_batches: validation batches per epoch on which the inner-loss diagnostics run
            (0 turns them off; they cost one extra pass of each TTT layer).
        seq_len: tokens per example the model is trained on, recorded in the checkpoint (the default
            length of ``innerloop eval``); ``None``: the longest training batch's, recorded once a
            training step has run (a checkpoint saved before any records none).
    """

    def __init__(
        self,
        model: ModelConfig | dict[str, Any],
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        max_steps: int = 1000,
        min_lr: float = 1e-5,
        num_position_buckets: int = 16,
        diagnostics_batches: int = 1,
        seq_len: int | None = None,
        schedule: str = "cosine",
        decay_steps: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(model, ModelConfig):
            model = asdict(model)  # hyperparameters are plain values (the checkpoint stores no objects)
        arguments = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        hyperparameters = _checked_hyperparameters(**arguments)
        self.save_hyperparameters(hyperparameters)
        self.model = build_model(ModelConfig.from_dict(model))  # CausalLM, or E2ELM for mixer='e2e'
        self._from_a_config = built_from_a_config()  # its messages name optim.lr, else lr
        self._register_state_dict_hook(_compile_free_names)  # torch.compile(module.model): plain names
        self._register_load_state_dict_pre_hook(_compiled_names, with_module=True)
        plugin_sources(model)  # read the plugins' sources now: the checkpoints record the code that ran
        plugin_record(model)  # and their settings, read at each save: a settings() that fails, fails here
        self.val_ppl = Float64Perplexity(ignore_index=IGNORE_INDEX)
        # given the logits' argmax ids (_evaluate_batch), so a one-token vocabulary (vocab_size=1, which
        # torchmetrics refuses as num_classes) counts as one of two classes, the second never seen
        self.val_acc = AllOrNothingAccuracy(
            num_classes=max(2, self.model.config.vocab_size), average="micro", ignore_index=IGNORE_INDEX
        )
        self.val_loss_by_position = LossByPosition(num_position_buckets, varying_lengths=True)
        self.inner_diagnostics = InnerLossDiagnostics(self.model.config.num_layers)
        self._inner_loss_before_after = None
        # the loader being evaluated (None before its first batch), and the metrics of those before it
        self._evaluating_loader: int | None = None
        self._finished_loaders: list[tuple[int, list[tuple[str, Any, dict[str, Any]]]]] = []
        self._logged_loaders: set[int] = set()  # of several loaders, those logged at their last batch
        self._last_finite_loss: tuple[int, torch.Tensor] | None = None  # (global step, training loss)
        self._step_losses: tuple[int, list[torch.Tensor]] = (-1, [])  # this optimizer step's micro-batches
        self._checked_layers = [
            (f"model.{name}", m)
            for name, m in self.model.named_modules()
            if getattr(m, "non_finite", None) == "raise"
        ]
        self._stop_deferred = False  # a stop asked for mid-accumulation (on_train_batch_end)
        self._trained_seq_len: int | None = None  # the longest training batch, for seq_len=None
        # the plugin modules loaded with `innerloop -p` here, for the processes ddp_spawn starts (setup)
        self._plugin_modules = [origin.removeprefix(f"{OPTION} ") for origin in loaded_plugin_modules()]
        if diagnostics_batches > 0 and self.model.config.mixer == "ttt":
            self._inner_loss_before_after = inner_loss_before_after

    def setup(self, stage: str) -> None:
        """Register the plugin modules loaded with ``innerloop -p`` where the module was built, in this
        process too (a no-op there): a process ``ddp_spawn`` starts builds its registry afresh, with the
        installed plugins only, so its checkpoints recorded no origin of a ``-p`` module's plugin."""
        for name in getattr(self, "_plugin_modules", []):  # a module pickled by an older version: none
            load_plugin_module(name)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike[str] | IO[bytes],
        map_location: Any = None,
        hparams_file: str | os.PathLike[str] | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> LanguageModelModule:
        """Lightning's ``load_from_checkpoint``, which also reads innerloop's own checkpoints.

        The files ``innerloop train`` and :class:`~innerloop.train.SafetensorsCheckpointIO` write (also
        under Lightning's ``.ckpt`` names) are safetensors, which Lightning's loader (``torch.load``)
        cannot read. For them the module is rebuilt from the hyperparameters the file holds (keyword
        arguments replace some, as in Lightning) and loaded with its weights, every key and shape
        checked; weights stored in bfloat16 or float16 load upcast to float32
        (:func:`~innerloop.checkpoints.load_weights`). ``map_location`` names the device to put it on
        (a mapping or function of devices does not apply: the file records none, and the module stays
        on the CPU). ``hparams_file`` is refused for them (the file carries its hyperparameters), and
        ``strict=False`` too (a checkpoint must fit the model it describes). Other files (pickled
        Lightning checkpoints, file objects) go to Lightning's loader unchanged.
        """
        is_path = isinstance(checkpoint_path, (str, os.PathLike))
        if is_path and os.path.isdir(checkpoint_path):  # torch.load's bare IsADirectoryError said only that
            raise CheckpointError(str(checkpoint_path_problem(checkpoint_path)))
        if is_path and os.path.isfile(checkpoint_path) and os.path.getsize(checkpoint_path) == 0:
            raise CheckpointError(  # torch.load's bare EOFError named neither the file nor the problem
                f"{str(checkpoint_path)!r} is empty (0 bytes): not a checkpoint (a write that never finished, "
                "or the wrong file); give the last.safetensors a run wrote"
            )
        if not (is_path and is_safetensors_file(checkpoint_path)):
            return super().load_from_checkpoint(
                checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs
            )
        name = repr(str(checkpoint_path))
        if hparams_file is not None:
            raise ValueError(
                f"hparams_file={str(hparams_file)!r}: {name} is an innerloop checkpoint, which carries its "
                "hyperparameters; pass the ones to change as keyword arguments"
            )
        if strict is False:
            raise ValueError(
                f"strict=False: {name} is an innerloop checkpoint, loaded only into the model it describes "
                "(every key and shape checked); leave strict unset or True"
            )
        module = _module_from_checkpoint(cls, checkpoint_path, kwargs, keep_dtype=False)
        if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
            module = module.to(checkpoint_device(map_location))
        return module

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint written inside a gradient accumulation records the batches of its last optimizer
        step only (:func:`_rewind_to_the_last_optimizer_step`), so that its resume is the uninterrupted run. A
        module built without ``seq_len`` records the length it trained on (``innerloop eval``'s default).
        Every checkpoint records its plugins (:data:`~innerloop.checkpoints.PLUGINS_KEY`, with their
        settings, and their source digests) here, also one Lightning's own IO pickles (``.ckpt``)."""
        if self._trainer is not None:
            _rewind_to_the_last_optimizer_step(checkpoint, self.trainer.accumulate_grad_batches)
        hyperparameters = checkpoint.get("hyper_parameters")
        trained = self._trained_seq_len
        if isinstance(hyperparameters, dict) and hyperparameters.get("seq_len") is None and trained:
            hyperparameters["seq_len"] = trained  # eval's default length
        # the plugin record, as save_checkpoint writes it: also in a pickled .ckpt (Lightning's own IO)
        check_held_plugins("the checkpoint being saved", self.model)
        checkpoint[PLUGINS_KEY] = plugin_record(self.hparams.model, checkpoint.get(PLUGINS_KEY))
        checkpoint[PLUGIN_SOURCES_KEY] = plugin_sources(
            self.hparams.model, checkpoint.get(PLUGIN_SOURCES_KEY)
        )
        record_token_index(checkpoint, self.model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with one :class:`~innerloop.checkpoints.CheckpointError` line, a checkpoint whose
        weights do not fit this model (e.g. an attention run's resumed into a TTT run), before Lightning
        loads them. A pickled checkpoint's plugin record is checked here as
        :func:`~innerloop.checkpoints.load_checkpoint` checks innerloop's own: a plugin registered with
        other settings is refused, another plugin under a recorded name warned of.

        The weights of a ``*-true`` precision run (bfloat16, float16 or float64 ones where this module,
        as built, has float32) fit. Lightning restores them before it casts the module to the run's
        precision; so a ``*-true`` run's module is cast here first, as Lightning casts it next (a cast
        it then repeats as a no-op): the weights load in the precision they were trained in without a
        round trip through float32 (which would round float64 ones), and a run resumed in its precision
        continues bit-identically. (Strategies that restore after the cast, e.g. FSDP, load into the
        cast module already.) A resume in another precision loads them cast to that one.

        Outside a fit (Lightning's ``load_from_checkpoint`` of a pickled checkpoint, a ``64-true`` run of
        the user's own Trainer), the module takes the dtypes :func:`~innerloop.checkpoints.load_weights`
        gives: float64 weights load in float64, not rounded to float32, as from innerloop's own format.

        A checkpoint written inside a gradient accumulation by an innerloop from before the rewind on save
        (:meth:`on_save_checkpoint`) is rewound here, as it would have been written today (one written
        since, at a step boundary, is unchanged).
        """
        path = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
        theirs = (checkpoint.get("hyper_parameters") or {}).get("model")
        written_for = f"; it was written for ({describe_model(theirs)})" if isinstance(theirs, dict) else ""
        model = f"this run's model ({describe_model(self.hparams.model)}){written_for}"
        if isinstance(checkpoint.get("state_dict"), dict):  # an earlier innerloop's of a compiled model
            checkpoint["state_dict"] = plain_names(checkpoint["state_dict"], f"{str(path)!r}'s state_dict")
        check_state_dict(self.state_dict(), checkpoint.get("state_dict"), path, model)
        trainer = self._trainer
        if trainer is None or not is_safetensors_file(
            path
        ):  # a pickled .ckpt: load_checkpoint checked no record
            source = "the checkpoint" if trainer is None else repr(str(path))
            warn_changed_plugins(
                source, checkpoint.get(PLUGINS_KEY), sources=checkpoint.get(PLUGIN_SOURCES_KEY)
            )
            check_plugin_settings(source, checkpoint.get(PLUGINS_KEY))
        if trainer is None:  # Lightning's load_from_checkpoint of a pickled checkpoint: no precision given
            cast_to_stored_dtypes(self, checkpoint["state_dict"])
        if trainer is not None:  # written inside an accumulation by an innerloop before the rewind on save
            _rewind_to_the_last_optimizer_step(checkpoint, trainer.accumulate_grad_batches)
        if trainer is not None and not trainer.strategy.restore_checkpoint_after_setup:
            probe = torch.nn.Module()  # no layer a plugin would replace: only its cast shows
            probe.register_parameter("weight", torch.nn.Parameter(torch.zeros((), dtype=torch.float32)))
            precision_dtype = trainer.precision_plugin.convert_module(probe).weight.dtype
            if precision_dtype != torch.float32:  # a *-true precision
                self.to(dtype=precision_dtype)
        # the float64 token index as the module saved held it (exact or rounded), which no cast can tell
        remake_recorded_token_index(self, checkpoint, path)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, T]`` → ``logits [B, T, V]``."""
        return self.model(input_ids)[0]

    def predict_step(
        self, batch: Batch | torch.Tensor, batch_idx: int, dataloader_idx: int = 0
    ) -> torch.Tensor:
        """``trainer.predict``: the logits ``[B, T, V]`` of a batch of token ids ``[B, T]``, or of the
        inputs of an ``(inputs, targets)`` pair (a DataModule's validation batches)."""
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(inputs)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        inputs, targets = _input_target_pair(batch)
        targets = checked_targets(targets, self.model.config.vocab_size)
        self._trained_seq_len = max(self._trained_seq_len or 0, inputs.shape[1])
        if hasattr(self.model, "set_outer_progress"):  # TTT-E2E: its inner lr warms up with the outer steps
            # counting this step as done, as the official schedule does: min(1, (step + 1) / warm-up steps)
            self.model.set_outer_progress((self.global_step + 1) / self.hparams.max_steps)
        calls: list[LayerCall] = []
        with (
            _non_finite_propagates(self._checked_layers, calls),
            _inner_step_non_finite_diverges(self.global_step, model=self.model),
        ):
            logits = self(inputs)
        # 0 for a batch with no scored target, not NaN (which would read as a divergence). A model may
        # weigh its targets its own way (TTT-E2E: the official per-chunk mean, E2ELM.training_loss).
        training_loss = getattr(self.model, "training_loss", None)
        if training_loss is not None:
            loss = training_loss(logits, targets, IGNORE_INDEX)
        else:
            loss = mean_scored_cross_entropy(logits, targets, IGNORE_INDEX)
        if not self._finite_on_every_process(loss):
            what = f"the training loss is {self._describe(loss)} after {counted(self.global_step, 'optimizer step')}"
            raise self._non_finite_error(what, calls)
        self._last_finite_loss = (self.global_step, loss.detach())
        # the mean over every process's batch too (sync_dist: one all-reduce per step, only with several)
        self.log("train_loss", self._optimizer_step_loss(loss), prog_bar=True, sync_dist=True)
        if self._trainer is not None and self.trainer.optimizers:  # the rate this optimizer step applies
            self.log("lr", float(self.trainer.optimizers[0].param_groups[0]["lr"]), batch_size=1)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log ``grad_norm``, the L2 norm of every gradient this optimizer step applies, before clipping
        (``optim.grad_clip`` clips it to that value) and after a float16 run's unscaling. Not under a
        sharding strategy (FSDP, DeepSpeed, model parallel), where each process holds a shard of them.

        A norm that is NaN or inf, from a loss that was finite (a plugin's backward: a sqrt or a division
        at 0), stops the run as diverged before the step applies it: clipped, or in AdamW's moments, it
        made every weight NaN, and the run stopped a step later blaming a NaN loss. Under a float16 run's
        loss scaling, whose scaler skips such a step and halves its scale, only once that scale is below 1
        (:meth:`_non_finite_at_every_scale`)."""
        if self._trainer is None or isinstance(self.trainer.strategy, SHARDING_STRATEGIES):
            return
        grads = [
            p.grad.detach() for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)  # one fused pass in the gradients' own dtype, as clipping
        self.log("grad_norm", norm, batch_size=1)
        # every process holds the same all-reduced gradients (and scale): each stops alike, without a collective
        if not bool(torch.isfinite(norm)) and self._non_finite_at_every_scale():
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            scaled = (
                ""
                if scaler is None
                else f" at every loss scale down to {scaler.get_scale():g} (16-mixed's scaler skipped each such "
                "step, halving its scale)"
            )
            raise self.diverged(
                f"the gradients of optimizer step {self.global_step + 1} hold {float(norm)} (their norm){scaled}, "
                "from a finite training loss; the step was not applied. A finite loss whose backward is not comes "
                "from a plugin's backward (a sqrt, log or division at 0) or gradients beyond the dtype's range"
            )

    def _non_finite_at_every_scale(self) -> bool:
        """Whether non-finite gradients stop the run: always without a loss scaler; with one (16-mixed),
        once its scale is below 1. The scaler skips a step whose gradients are not finite and halves its
        scale, which a run with gradients beyond float16's range meets a few times; gradients still not
        finite at a scale below 1 (17 halvings of its initial 65536) are so at every scale (a plugin's NaN
        backward), and every step was skipped since, the weights untouched, silently."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler is None or not scaler.is_enabled() or scaler.get_scale() < 1.0

    def _optimizer_step_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The mean loss of this optimizer step's micro-batches so far: under gradient accumulation the
        step is on their mean, and the row logged at its last micro-batch shows that mean (not the last
        micro-batch's own loss). The micro-batches of one step share ``global_step``."""
        step, losses = self._step_losses
        if step != self.global_step:
            losses = []
        losses.append(loss.detach())
        self._step_losses = (self.global_step, losses)
        return torch.stack(losses).mean()

    def _finite_on_every_process(self, values: torch.Tensor) -> bool:
        """Whether ``values`` are finite here and on every other process of the run (all processes
        must stop together: one stopping alone would leave the others waiting in a collective)."""
        finite = bool(torch.isfinite(values).all())
        if self._trainer is None:
            return finite
        return self.trainer.strategy.reduce_boolean_decision(finite, all=True)

    @staticmethod
    def _describe(loss: torch.Tensor) -> str:
        """``nan``/``inf``, or what a finite loss is when another process's is not."""
        value = float(loss.detach())
        return f"finite here ({value:.4f}) but not on another process" if math.isfinite(value) else str(value)

    def diverged(self, what: str) -> TrainingDivergedError:
        """The error for a run that diverged: ``what`` happened, the last finite loss, what to try. Before
        any optimizer step the outer optimizer has not acted, so the model as built (or loaded) is named
        instead (:meth:`_before_any_step`)."""
        if self.global_step == 0 and self._last_finite_loss is None:
            return TrainingDivergedError(f"training diverged: {what}; {self._before_any_step()}")
        if self._last_finite_loss is None:
            last = "no finite training loss before"
        else:
            step, loss = self._last_finite_loss
            last = f"last finite training loss {float(loss):.4f}, after {counted(step, 'step')}"
        clip = self.trainer.gradient_clip_val if self._trainer is not None else None
        lr, min_lr = (setting_name(f"optim.{p}", p, self._from_a_config) for p in ("lr", "min_lr"))
        clipping = "optim.grad_clip" if self._from_a_config else "the Trainer's gradient_clip_val"
        warmup = setting_name("optim.warmup_fraction", "warmup_steps", self._from_a_config)
        return TrainingDivergedError(
            f"training diverged: {what} ({last}); {self._float16_cause()}try a lower {lr} (now "
            f"{self.hparams.lr:g}; {min_lr} may not exceed it), "
            f"gradient clipping ({clipping}, now {clip or 'off'}) or a longer warm-up "
            f"({warmup}, now {self.hparams.warmup_steps} steps)"
        )

    def _before_any_step(self) -> str:
        """Why a loss is NaN or inf before the first optimizer step, in words: not the learning rate, its
        warm-up or gradient clipping (none has acted yet; "try a lower learning rate" was said), but the
        weights as built (the model config's ``init_std``) or loaded, or the model's inner learning rate."""
        config = self.model.config
        inner = inner_lr_key(config)
        inner_now = (
            ""
            if inner is None
            else f", or its inner learning rate {self._model_setting(inner)} (now {_config_value(config, inner):g})"
        )
        if inner == "model.e2e.inner_lr":
            start = self._model_setting("model.e2e.inner_lr_start")
            inner_now += f" and its warm-up's start {start} (now {config.e2e.inner_lr_start:g})"
        return (
            f"no optimizer step has run, so {setting_name('optim.lr', 'lr', self._from_a_config)}, its warm-up "
            "and gradient clipping have not acted: the model as built (or loaded) gave it in its first forward; "
            f"check {self._model_setting('model.init_std')} (now {config.init_std:g}, the std of the weights "
            f"as built){inner_now}"
        )

    def _model_setting(self, key: str) -> str:
        """How a message names the model setting ``key`` (``model.init_std``): the run config's key for a
        module built from one, else the field of the ``ModelConfig`` its user built (``the model config's
        init_std``)."""
        return key if self._from_a_config else f"the model config's {key.removeprefix('model.')}"

    def _float16_cause(self) -> str:
        """The likely cause of a divergence when the module's weights are float16 (a module cast by hand,
        or a float16 ``*-true`` precision, which the config refuses), before the usual remedies; "" otherwise."""
        if not any(p.dtype == torch.float16 for p in self.parameters()):
            return ""
        lr = setting_name("optim.lr", "lr", self._from_a_config)
        precision = "trainer.precision=" if self._from_a_config else "the Trainer's precision="
        return (
            f"the module's weights are float16, where AdamW cannot train at any {lr} (its eps 1e-8 rounds "
            "to 0 and its second moments underflow, so a step divides 0 by 0): train with float32 weights "
            f"({precision}16-mixed, bf16-mixed or 32-true) or in bf16-true or 64-true; beyond that, "
        )

    def _non_finite_error(self, what: str, calls: list[LayerCall]) -> TrainingDivergedError:
        """The error for a non-finite loss (``what`` says which): :class:`NonFiniteLayerOutputError`
        naming the TTT layer and its plugins when the NaN or inf first appeared in such a layer's
        output from finite input of moderate size (``calls``, see :func:`_non_finite_propagates`),
        that layer's weights are finite and not all its plugins are built in; otherwise the run
        diverged (:meth:`diverged`, which then says where the NaN or inf first appeared)."""
        found = _first_non_finite_output(calls)
        if found is None:
            return self.diverged(what)
        name, largest_input = found
        layer = self.get_submodule(name)
        if not all(bool(torch.isfinite(p).all()) for p in layer.parameters()):
            return self.diverged(f"{what}; the weights of the TTT layer {name!r} hold NaN or inf")
        kinds = [kind for kind in ("inner_model", "inner_loss", "update_rule") if getattr(layer, kind, None)]
        plugins = ", ".join(plugin_label(kind, getattr(layer, kind)) for kind in kinds)
        if all(is_built_in(kind, getattr(layer, kind)) for kind in kinds):
            largest = max(float(p.detach().abs().max()) for p in layer.parameters() if p.numel())
            return self.diverged(
                f"{what}; it first appeared in the output of the TTT layer {name!r} from finite input "
                f"(largest |input| {largest_input:.1e}), and that layer's plugins are all built in ({plugins}), "
                f"so its own weights (largest |weight| {largest:.1e}) more likely grew until its inner "
                "model overflowed"
            )
        earlier = ""
        if self._last_finite_loss is not None:
            step, loss = self._last_finite_loss
            earlier = (
                f"; if the training loss was rising before (last finite {float(loss):.4f}, after {step} "
                f"steps), the run may be diverging instead: then try a lower optim.lr (now {self.hparams.lr:g})"
            )
        base_lr = inner_lr_key(self.model.config) or "model.ttt.base_lr"  # a TTT layer's: ttt or family
        try:  # the configured rate, not the warm-up's current layer.base_lr (optim.ttt_base_lr_warmup)
            configured = float(_config_value(self.model.config, base_lr))
        except (AttributeError, TypeError, ValueError):  # a model config without that key
            configured = None
        diagnose = getattr(layer, "plugin_nan_diagnosis", None)  # the layer's own words (TTTLayer's)
        diagnosis = (
            diagnose(base_lr, configured)
            if callable(diagnose)
            else f"the likely source is a NaN or inf computed by the layer's plugins not built in ({plugins}); "
            f"unless the step (inner learning rate times gradient) was too large: lower {base_lr}"
        )
        return NonFiniteLayerOutputError(  # the layer's own diagnosis of this case: one text for both
            f"{what}: the NaN or inf first appeared in the output of the TTT layer {name!r} "
            f"({type(layer).__name__}), from finite input of moderate size (largest |input| "
            f"{largest_input:.1e}), with finite weights: {diagnosis}{earlier}"
        )

    def on_train_start(self) -> None:
        self._apply_optimizer_hyperparameters()
        self._warn_of_a_schedule_of_another_length()
        self._stop_deferred = False
        # a new fit's first step may share its global_step with the last one of an earlier fit of this
        # module (a fit on a fresh Trainer, a resume from a checkpoint): its logged mean is its own
        self._step_losses = (-1, [])

    def _warn_of_a_schedule_of_another_length(self) -> None:
        """One warning when the Trainer will take another number of optimizer steps than this module's
        ``max_steps``, over which its learning-rate schedule (and TTT-E2E's inner-lr warm-up) runs: a
        Trainer of the user's own with ``max_steps=5000`` on a module left at ``max_steps=1000`` would
        train its last 4000 steps at ``min_lr``. (``innerloop train`` sets both from
        ``trainer.max_steps``.)"""
        hp, trainer = self.hparams, self.trainer
        steps = trainer.max_steps
        if steps is None or steps < 0:  # epochs decide: Lightning's estimate, when the data has a length
            try:
                steps = trainer.estimated_stepping_batches
            except Exception:  # an iterable without a length: nothing to compare
                return
        if (
            not math.isfinite(steps)
            or int(steps) == hp.max_steps
            or not getattr(trainer, "is_global_zero", True)
        ):
            return
        own_schedule = self._own_schedule() is not None and hp.schedule != "constant"
        uses_length = own_schedule or hasattr(self.model, "set_outer_progress")
        if uses_length:
            log.warning(
                "the Trainer will take %d optimizer steps, but this module's learning-rate schedule "
                "(schedule=%s) runs over max_steps=%d: build the module with max_steps=%d (innerloop train "
                "sets both from trainer.max_steps)",
                int(steps), hp.schedule, hp.max_steps, int(steps),
            )  # fmt: skip

    @property
    def stop_deferred_to_this_step(self) -> bool:
        """Whether a stop asked for inside the current gradient accumulation waits for its last micro-batch
        (:meth:`on_train_batch_end`, which sets ``trainer.should_stop`` there, after every callback's hook:
        the checkpoint callback reads this to save that step where it saves a periodic one)."""
        return self._stop_deferred

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        """A stop asked for in the middle of a gradient accumulation (``trainer.max_time``, a callback
        setting ``trainer.should_stop``) waits for the accumulation's last micro-batch: a run stopped
        between micro-batches would save a half-accumulated step, and its resume would pair other batches
        into every later step. (This hook runs after every callback's. Ctrl-C and SIGTERM wait the same
        way in :class:`~innerloop.train.interrupt.StopOnInterrupt`.)"""
        trainer = self.trainer
        at_step_boundary = optimizer_step_ends_here(trainer, batch_idx)  # an epoch's last batch too
        if trainer.should_stop and not at_step_boundary:
            trainer.should_stop, self._stop_deferred = False, True
        elif at_step_boundary and self._stop_deferred:
            trainer.should_stop, self._stop_deferred = True, False

    def _apply_optimizer_hyperparameters(self) -> None:
        """Make the optimizer and the schedule follow this module's hyperparameters from the step reached.

        A resumed run restores the checkpoint's param groups (lr, betas, weight decay) and the schedule's
        base lr; a resume that changes them (``--resume optim.lr=0.3``) must run with the new values, on
        the schedule the new ``lr``, ``min_lr``, ``warmup_steps`` and ``max_steps`` define. (A new run
        is unchanged by this.) Only the optimizer and schedule that :meth:`configure_optimizers` builds
        are touched: a subclass's own (its learning rates, param groups, scheduler) are left as it made them.
        """
        schedule = self._own_schedule()
        if schedule is None:  # a subclass's own optimizer or scheduler: its settings are the user's
            return
        hp = self.hparams
        optimizer = schedule.optimizer
        # the lr as the schedule computes it at every step (base lr times its factor, the new
        # hyperparameters' since configure_optimizers built it), to the last bit: a resume continues
        # exactly the run it resumes
        lrs = [hp.lr * factor(schedule.last_epoch) for factor in schedule.lr_lambdas]
        self._warn_of_a_learning_rate_jump(schedule.last_epoch, optimizer.param_groups[0]["lr"], lrs[0])
        for group, lr, weight_decay in zip(optimizer.param_groups, lrs, (hp.weight_decay, 0.0), strict=True):
            group.update(lr=lr, initial_lr=hp.lr, weight_decay=weight_decay, betas=tuple(hp.betas))
        schedule.base_lrs = [hp.lr] * len(optimizer.param_groups)

    def _warn_of_a_learning_rate_jump(self, step: int, restored: float, now: float) -> None:
        """On a resume whose config changes the schedule (``trainer.max_steps``, ``optim.*``), one warning
        when the lr at the resume step is not the one the checkpoint's schedule would have run: extending
        a decaying schedule recomputes it for the new length, and the lr jumps."""
        main_process = getattr(self.trainer, "is_global_zero", True)
        if step == 0 or math.isclose(restored, now, rel_tol=1e-9, abs_tol=0.0) or not main_process:
            return
        hp = self.hparams
        settings = (
            "this config's optim.schedule=%s, optim.lr=%g and trainer.max_steps=%d"
            if self._from_a_config
            else "the module's schedule=%s, lr=%g and max_steps=%d"  # a user's own, resumed by their Trainer
        )
        log.warning(
            "resuming at step %d: the learning rate is now %.3g, where the checkpoint's schedule was at %.3g "
            f"(%.3gx): {settings} define the schedule "
            "from this step, so the run goes on as none that was never interrupted would",
            step, now, restored, now / restored if restored else math.inf, hp.schedule, hp.lr, hp.max_steps,
        )  # fmt: skip

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """One validation batch. Several validation loaders are scored each on its own (Lightning reads
        them one after another): their metrics are logged as ``val_loss/dataloader_idx_<i>``, ... (the
        names Lightning gives a metric of one loader), never one number over the loaders together."""
        self._switch_loader(dataloader_idx, "val_", "")
        self._evaluate_batch(batch, batch_idx)

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """``trainer.test(module, dataloaders=...)`` on ``(inputs, targets)`` batches (e.g. a held-out
        split's): the validation metrics under ``test_`` names (``test_loss``, ``test_ppl``, ...; of
        several loaders, each its own, as in :meth:`validation_step`)."""
        self._switch_loader(dataloader_idx, "test_", "test_")
        self._evaluate_batch(batch, batch_idx)

    def on_validation_batch_end(
        self, outputs: Any, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._log_a_loader_at_its_last_batch(batch_idx, dataloader_idx, "val_", "")

    def on_test_batch_end(self, outputs: Any, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._log_a_loader_at_its_last_batch(batch_idx, dataloader_idx, "test_", "test_")

    def _log_a_loader_at_its_last_batch(
        self, batch_idx: int, dataloader_idx: int, prefix: str, diagnostics_prefix: str
    ) -> None:
        """Of several loaders, log a loader's metrics at its last batch (where its length is known), while
        Lightning files what is logged under that loader: logged at the evaluation's end, every loader's
        numbers went into every loader's dict of ``trainer.validate``'s results, and the table Lightning
        prints (which drops the ``/dataloader_idx_<i>`` suffix) showed the last loader's in every column.
        A loader of unknown length is logged at the evaluation's end, as before."""
        if self._trainer is None or self._evaluation_loader_count() < 2:
            return
        try:
            batches = self.trainer._evaluation_loop.max_batches[dataloader_idx]
        except (AttributeError, AssertionError, IndexError, RuntimeError, TypeError):
            return
        if batch_idx + 1 != batches or self._evaluating_loader != dataloader_idx:
            return
        for name, value, options in self._evaluation_values(prefix, diagnostics_prefix):
            self.log_synced(
                f"{name}/dataloader_idx_{dataloader_idx}", value, add_dataloader_idx=False, **options
            )
        self._evaluating_loader = None
        self._logged_loaders.add(dataloader_idx)

    def _switch_loader(self, dataloader_idx: int, prefix: str, diagnostics_prefix: str) -> None:
        """At the first batch of another loader, compute the metrics of the loader before it (logged at
        the evaluation's end, :meth:`_log_evaluation`) and reset them. A loader of no batch (Lightning
        runs none of it) has no metrics to log."""
        if dataloader_idx != self._evaluating_loader:
            if self._evaluating_loader is not None:
                values = self._evaluation_values(prefix, diagnostics_prefix)
                self._finished_loaders.append((self._evaluating_loader, values))
            self._evaluating_loader = dataloader_idx

    def _evaluate_batch(self, batch: Batch, batch_idx: int) -> None:
        """One batch of validation or test: the scored tokens' losses into the evaluation metrics."""
        inputs, targets = _input_target_pair(batch)
        targets = checked_targets(targets, self.model.config.vocab_size)
        captured = self._capture_mixer_inputs() if batch_idx < self.hparams.diagnostics_batches else None
        # While fitting, NaN here is the run diverging (see training_step); a model evaluated on its own
        # keeps the layers' input check.
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        calls: list[LayerCall] = []
        try:
            with (
                _non_finite_propagates(self._checked_layers if fitting else [], calls),
                _inner_step_non_finite_diverges(self.global_step, fitting, self.model),
            ):
                # The metrics accumulate in at least float32 whatever the precision of the forward: under
                # bf16-mixed the logits are bf16, and a perplexity computed from them disagrees with the
                # loss in the third digit; a float64 model's stay float64.
                logits = self(inputs)  # [B, T, V]
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        finally:
            hooks = captured[1] if captured else []
            for hook in hooks:
                hook.remove()
        token_loss = F.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )  # [B, T]
        scored = targets != IGNORE_INDEX
        if not self._finite_on_every_process(token_loss[scored]):
            if not fitting:  # an evaluation's perplexity would be NaN or inf without a word
                raise ValueError(
                    f"evaluation batch {batch_idx}: the model's loss is not finite (its logits hold NaN or "
                    "inf: its weights or activations overflowed or hold NaN), so no loss or perplexity can "
                    "be told"
                )
            what = f"the validation loss is not finite after {counted(self.global_step, 'optimizer step')}"
            raise self._non_finite_error(what, calls)
        self.val_ppl.update(logits, targets)
        self.val_acc.update(logits.flatten(0, 1).argmax(dim=-1), targets.flatten())  # as of the logits
        self.val_loss_by_position.update(token_loss, scored)
        kept = scored.any(dim=1)  # [B]: a row that scores nothing (multi-process padding) is not diagnosed
        if captured and bool(kept.any()):
            self._update_inner_diagnostics({i: x[kept] for i, x in captured[0].items()})

    def on_validation_epoch_start(self) -> None:
        self._own_metric_states()

    def on_test_epoch_start(self) -> None:
        self._own_metric_states()

    def _own_metric_states(self) -> None:
        """Reset every evaluation metric (their states are their defaults between evaluations: a no-op but
        for memory) so that this process updates states of its own. ddp_spawn sends the module to its
        processes through shared memory, and Lightning copies out only the parameters and buffers: the
        metric states stayed one memory for every process until their first reset, so in a run's first
        evaluation one process's updates landed in the other's states (a shard's number logged for the
        whole, or the sync counting tokens twice)."""
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()
        self._evaluating_loader, self._finished_loaders, self._logged_loaders = None, [], set()

    def on_validation_epoch_end(self) -> None:
        self.log_synced("val_step", float(self.trainer.global_step) if self._trainer is not None else 0.0)
        self._log_evaluation("val_", diagnostics_prefix="")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test_", diagnostics_prefix="test_")

    def _log_evaluation(self, prefix: str, diagnostics_prefix: str) -> None:
        """Log the evaluation metrics under ``prefix`` (``val_loss``, ``test_loss``, ...) and reset them;
        of several loaders given (an empty one counted, as Lightning counts it), each scored loader's under
        the names Lightning gives them (``val_loss/dataloader_idx_1``)."""
        loaders = list(self._finished_loaders)
        if self._evaluating_loader is not None or not (loaders or self._logged_loaders):
            current = self._evaluating_loader or 0
            loaders.append((current, self._evaluation_values(prefix, diagnostics_prefix)))
        several = len(loaders) + len(self._logged_loaders) > 1 or self._evaluation_loader_count() > 1
        for loader, values in loaders:
            suffix = f"/dataloader_idx_{loader}" if several else ""
            for name, value, options in values:
                self.log_synced(f"{name}{suffix}", value, add_dataloader_idx=False, **options)
        self._evaluating_loader, self._finished_loaders, self._logged_loaders = None, [], set()

    def _evaluation_loader_count(self) -> int:
        """How many loaders the running evaluation was given (1 outside a Trainer's evaluation)."""
        try:
            return int(self.trainer._evaluation_loop.num_dataloaders)
        except (AttributeError, AssertionError, RuntimeError):
            return 1

    def _evaluation_values(
        self, prefix: str, diagnostics_prefix: str
    ) -> list[tuple[str, Any, dict[str, Any]]]:
        """The evaluation metrics as ``(name, value, log options)`` (synced across processes), reset."""
        values: list[tuple[str, Any, dict[str, Any]]] = []

        def log(name: str, value: Any, **options: Any) -> None:
            values.append((name, value, options))

        # val_loss is the mean over scored tokens (not over batches, which may differ in size or padding),
        # from the float64 sums (synced across processes once); val_ppl = exp(val_loss), inf once the mean
        # passes about 709.8 nats, where log(val_ppl) would be too (val_loss logged in float32, as before)
        mean_loss, scored_tokens = self._perplexity_sums_combined(prefix)
        # float64 where the weights are (64-true), not rounded to float32 beside a float64 val_ppl
        logged = torch.promote_types(widest_parameter_dtype(self) or torch.float32, torch.float32)
        log(f"{prefix}loss", mean_loss.to(logged), prog_bar=True)
        log(f"{prefix}ppl", torch.exp(mean_loss), prog_bar=True)
        # torchmetrics' accuracy of no scored token is 0/0 -> 0.0, a number beside the loss's NaN
        log(f"{prefix}acc", self._accuracy().to(logged) if scored_tokens > 0 else math.nan)
        self.val_ppl.reset()
        self.val_acc.reset()
        for b, loss in enumerate(_per_item(self.val_loss_by_position.means().to(logged))):
            log(f"{prefix}loss_pos/{b}", loss)
        self.val_loss_by_position.reset()
        if self._inner_loss_before_after is not None:
            diagnostics = {name: means.to(logged) for name, means in self.inner_diagnostics.means().items()}
            before, after = _per_item(diagnostics["before"]), _per_item(diagnostics["after"])
            for layer in range(self.model.config.num_layers):
                log(f"{diagnostics_prefix}inner_loss_before/{layer}", before[layer])
                log(f"{diagnostics_prefix}inner_loss_after/{layer}", after[layer])
        self.inner_diagnostics.reset()
        return values

    def _accuracy(self) -> torch.Tensor:
        """``val_acc``'s accuracy (micro: correct over scored tokens, over every process) in float64,
        from its counts: its ``compute()`` divides in float32 (4/21 came 3.5e-9 off)."""
        with self.val_acc.sync_context():
            correct, wrong = self.val_acc.tp.sum(), self.val_acc.fn.sum()
            return correct.double() / (correct + wrong).double()

    def _perplexity_sums_combined(self, prefix: str) -> tuple[torch.Tensor, int]:
        """``val_ppl``'s mean loss (float64) and count of scored tokens over every process, from one sync
        of its sums (each state's sync is a collective: the loss, the count and the check below synced
        them three times), checked combined (:meth:`_check_metrics_combined`)."""
        own = self.val_ppl.count.detach().clone()
        with self.val_ppl.sync_context():
            total, count = self.val_ppl.total_log_probs.clone(), self.val_ppl.count.clone()
        self._check_metrics_combined(prefix, own, count)
        return total / count, int(count)

    def _check_metrics_combined(self, prefix: str, own: torch.Tensor, synced: torch.Tensor) -> None:
        """Under several processes, raise unless the evaluation metrics' count of scored tokens, ``synced``
        across the processes, is the sum of every process's ``own`` count (an all-reduce apart from
        torchmetrics' sync): one process's shard must never be logged as the whole evaluation's number."""
        if self._trainer is None or self.trainer.world_size < 2:
            return
        summed = self.trainer.strategy.reduce(own.clone(), reduce_op="sum")  # reduced in place
        if int(summed) != int(synced):
            raise RuntimeError(
                f"the {prefix}* metrics were not combined across the {self.trainer.world_size} processes: they "
                f"count {int(synced)} scored tokens where the processes scored {int(summed)} together (this "
                f"process {int(own)}); the metric states did not sync (torchmetrics' sync_context), so no "
                "number of this evaluation is logged"
            )

    def log_synced(self, name: str, value: Any, **options: Any) -> None:
        """``self.log`` of an epoch-level value that is already the same on every process (its metric
        synced it): Lightning is told so (``sync_dist`` with ``max``, which gives back that value
        exactly), instead of warning once per metric and validation that it should be synced."""
        self.log(name, value, sync_dist=True, reduce_fx="max", **options)

    def _capture_mixer_inputs(self) -> tuple[dict[int, torch.Tensor], list] | None:
        """Record the input of every TTT mixer during the next forward (for the inner diagnostics)."""
        if self._inner_loss_before_after is None:
            return None
        inputs: dict[int, torch.Tensor] = {}
        hooks = []
        for i, block in enumerate(self.model.blocks):

            def record(
                module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i
            ) -> None:
                inputs[i] = args[0].detach()

            hooks.append(block.mixer.register_forward_pre_hook(record, with_kwargs=True))
        return inputs, hooks

    def _update_inner_diagnostics(self, mixer_inputs: dict[int, torch.Tensor]) -> None:
        for i, x in mixer_inputs.items():
            before, after = self._inner_loss_before_after(self.model.blocks[i].mixer, x)
            self.inner_diagnostics.update(i, before, after)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=hp.betas,
        )
        if hp.warmup_steps > hp.max_steps:  # from Python: a run's config sizes it by warmup_fraction
            last_lr = self._schedule()(hp.max_steps - 1)
            warnings.warn(
                f"warmup_steps={hp.warmup_steps} is more than max_steps={hp.max_steps}: the learning rate "
                f"is still warming up when training ends and peaks at {last_lr:.3g}, not "
                f"lr={hp.lr:g}; give warmup_steps <= max_steps (its default is 100)",
                UserWarning,
                stacklevel=warning_stacklevel(),
            )
        lr_at = self._schedule()
        schedule = _ModuleSchedule(optimizer, lambda step: lr_at(step) / hp.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _own_schedule(self) -> _ModuleSchedule | None:
        """The schedule :meth:`configure_optimizers` built, of the Trainer's first optimizer; None when a
        subclass configured its own optimizer or scheduler (or none is set up)."""
        trainer = self.trainer
        if not trainer.optimizers or not trainer.lr_scheduler_configs:
            return None
        schedule = trainer.lr_scheduler_configs[0].scheduler
        if not isinstance(schedule, _ModuleSchedule) or schedule.optimizer is not trainer.optimizers[0]:
            return None
        return schedule

    def _schedule(self) -> Schedule:
        """The learning rate as a function of the optimizer step, from the hyperparameters."""
        hp = self.hparams
        return make_schedule(hp.schedule, hp.warmup_steps, hp.max_steps, hp.lr, hp.min_lr, hp.decay_steps)


def _input_target_pair(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A training, validation or test batch as ``(inputs [B, T], targets [B, T])``; else a TypeError saying
    what came (a batch of token ids alone unpacked into its rows, or failed as "too many values to unpack")."""
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and all(isinstance(t, torch.Tensor) for t in batch)
        and batch[0].shape == batch[1].shape
    ):
        return batch[0], batch[1]
    if isinstance(batch, torch.Tensor):
        got = f"a tensor of shape {tuple(batch.shape)}"
    elif isinstance(batch, (tuple, list)):
        got = f"{a_type(batch)} of " + ", ".join(
            f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in batch
        )
    else:
        got = a_type(batch)
    raise TypeError(
        "trainer.fit / trainer.validate / trainer.test batches must be (inputs [B, T], targets [B, T]) pairs of token-id "
        f"tensors of one shape (a DataModule's val_dataloader() gives them), got {got}; trainer.predict "
        "takes batches of token ids alone"
    )


def checked_targets(targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``targets`` as int64 (the dtype cross-entropy takes; int32 ids, which the model reads, came to
    torch's "expected target dtype to be Long or Byte"), or an error naming ``targets``
    (:func:`~innerloop.models.lm.check_token_ids`): integer ids in ``0..vocab_size - 1`` or
    :data:`IGNORE_INDEX` (one out of range was torch's bare "Target 70 is out of bounds", and a
    device-side assert on a GPU). One min/max pass and one device sync."""
    check_token_ids(targets, vocab_size, "targets", not_scored=(IGNORE_INDEX, "IGNORE_INDEX"))
    return targets.long()


def load_module(path: str | os.PathLike[str], keep_dtype: bool = False) -> LanguageModelModule:
    """The :class:`~innerloop.train.module.LanguageModelModule` stored in a training checkpoint
    (hyperparameters and weights), in eval mode.

    The weights of a ``*-true`` precision run load as :func:`~innerloop.checkpoints.load_model` loads
    them (:func:`~innerloop.checkpoints.load_weights`): bfloat16 and float16 ones upcast to float32,
    float64 ones in float64, or with ``keep_dtype`` in their stored dtype. So ``innerloop eval`` and
    ``compare`` compute such a run in float32 (or float64), as every other run.

    Raises :class:`~innerloop.checkpoints.CheckpointError` if the file is not an innerloop training checkpoint or its weights
    do not fit the model its hyperparameters describe (missing or unexpected keys, shapes, dtypes).
    """
    check_flag("keep_dtype", keep_dtype)  # 'false' would keep a bf16 run's weights in bfloat16
    return _module_from_checkpoint(LanguageModelModule, path, {}, keep_dtype).eval()


def _module_from_checkpoint(
    cls: type[LanguageModelModule], path: str | os.PathLike[str], overrides: dict[str, Any], keep_dtype: bool
) -> LanguageModelModule:
    """``cls`` built from an innerloop checkpoint's hyperparameters (``overrides`` replacing some) and
    loaded with its weights (:func:`~innerloop.checkpoints.load_weights`), in train mode."""
    checkpoint = load_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters")
    if (
        not isinstance(hparams, dict)
        or not isinstance(hparams.get("model"), dict)
        or "state_dict" not in checkpoint
    ):
        raise CheckpointError(
            f"{str(path)!r} is an innerloop checkpoint without a model (no hyper_parameters['model'] or "
            "state_dict); pass a checkpoint written by `innerloop train`"
        )
    hparams = {**hparams, **overrides}
    if isinstance(hparams["model"], dict):
        hparams["model"] = saved_model_config(path, hparams["model"])
    try:
        module = cls(**hparams)
    except (TypeError, ValueError, RuntimeError) as err:
        if overrides:  # the keyword arguments may be what is wrong: say which were given
            given = ", ".join(f"{key}={value!r}" for key, value in overrides.items())
            raise ValueError(f"{str(path)!r} loaded with {given} in place of its own: {err}") from None
        raise rebuild_error(path, err) from None
    description = f"the model its hyperparameters describe ({describe_model(module.hparams.model)})"
    check_state_dict(module.state_dict(), checkpoint["state_dict"], path, description)
    load_weights(module, checkpoint["state_dict"], keep_dtype)
    remake_recorded_token_index(module, checkpoint, path)
    run_kernels_that_work_here(module, path)
    return module


def record_token_index(checkpoint: dict[str, Any], model: torch.nn.Module) -> None:
    """Record in ``checkpoint`` the dtype ``model``'s float64 TTT token index was made in
    (:func:`~innerloop.checkpoints.token_index_made_in`), which the weights do not hold: the loaders make
    it so again (:func:`~innerloop.checkpoints.remake_token_index`); nothing where nothing tells."""
    record = token_index_made_in(model)
    if record is not None:
        checkpoint[TOKEN_INDEX_KEY] = record
    else:
        checkpoint.pop(TOKEN_INDEX_KEY, None)


def save_model_checkpoint(
    model: CausalLM | E2ELM, path: str | os.PathLike[str], tokenizer: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (e.g. one converted from another implementation) as an innerloop checkpoint at
    ``path``: the hyperparameters (its config, the training defaults) and weights that
    :func:`load_module` reads, so ``innerloop generate`` and ``innerloop eval`` take it, and with
    ``tokenizer`` (a :meth:`~innerloop.data.tokenizer.Tokenizer.to_state`) the tokenizer it reads
    (:data:`~innerloop.checkpoints.TOKENIZER_KEY`; none recorded reads as bytes). Written atomically
    (see :func:`~innerloop.checkpoints.save_checkpoint`); returns the path.

    The weights are stored in one dtype (a checkpoint of several is refused when loaded): the model's,
    or for a model of several (a bfloat16 model with float32 norms) the widest of them, so that no
    weight is rounded."""
    model.check_built_fields()  # a config changed since the build would be recorded, not the model
    check_held_plugins(str(path), model)  # and so would a plugin registered since under a name it holds
    module = LanguageModelModule(model=model.config.to_dict())
    dtype = widest_parameter_dtype(model)
    # Parameters only, not .to(dtype): buffers keep their dtype (E2E's float64 progress counter).
    for parameter in module.model.parameters():
        parameter.data = parameter.data.to(dtype)
    module.model.load_state_dict(plain_names(model.state_dict(), "the model's state_dict"), strict=True)
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    if tokenizer is not None:
        checkpoint[TOKENIZER_KEY] = tokenizer
    record_token_index(checkpoint, model)
    return save_checkpoint(checkpoint, path)
