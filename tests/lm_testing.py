"""Tiny models for tests: the run overrides of the end-to-end training tests (:data:`TINY`), a training
run killed in the middle (:func:`kill_a_training_run`), a TTT-E2E model's streamed logits
(:func:`streamed_logits`), every tensor a language model's state holds (:func:`state_tensors`), the
TTT language model the precision and compile tests compare against eager float32, an untrained run folder
(:func:`untrained_run`) and a loss's five-point difference along a direction (:func:`directional_difference`)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from innerloop.config.load import load_config, save_config
from innerloop.models import build_model
from innerloop.models.config import ModelConfig, TTTConfig
from innerloop.train.checkpoint import load_checkpoint, save_checkpoint
from innerloop.train.data import IGNORE_INDEX
from innerloop.train.module import LanguageModelModule, load_module

TINY = [
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "model.ttt.mini_batch_size=8",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.val_batches=1",
    "trainer.val_every=4",
    "trainer.checkpoint_every=2",
    "trainer.progress_bar=false",
    "trainer.num_position_buckets=4",
]
"""Overrides of a model and run small enough for a few seconds of training on a CPU."""


_HOLD_AFTER_STEP = """
import sys, time
import lightning as L
import innerloop.train.run as run_module
from innerloop.cli import main

after_step, hold_s = int(sys.argv[1]), float(sys.argv[2])


class HoldAfterStep(L.Callback):  # the run waits here to be killed, however fast or loaded the machine
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step > after_step:  # the step after after_step's checkpoint confirmed it
            time.sleep(hold_s)


train = run_module.train
run_module.train = lambda *args, callbacks=(), **kwargs: train(*args, callbacks=[*callbacks, HoldAfterStep()], **kwargs)
sys.exit(main(["train", *sys.argv[3:]]))
"""


def kill_a_training_run(
    overrides: list[str], checkpoint: Path, after_step: int = 2, timeout_s: float = 180
) -> int | None:
    """Run ``innerloop train`` with ``overrides`` in a subprocess, SIGKILL it once ``checkpoint`` holds
    ``after_step`` steps, and return the step the checkpoint it left holds (None if it finished or the
    time ran out first). The run holds once the step after ``after_step`` is done (whose finite loss
    makes a pending checkpoint ``last.safetensors``) until it is killed, so the kill lands in the middle of
    the run however fast the steps or loaded the machine (a run of a few steps could finish between two
    looks at the checkpoint)."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", _HOLD_AFTER_STEP, str(after_step), str(timeout_s), *overrides]
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    try:
        deadline = time.monotonic() + timeout_s
        while killed_at is None and time.monotonic() < deadline and process.poll() is None:
            if checkpoint.exists() and load_checkpoint(checkpoint)["global_step"] >= after_step:
                process.send_signal(signal.SIGKILL)
                process.wait()
                killed_at = load_checkpoint(checkpoint)["global_step"]
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()
    return killed_at


def streamed_logits(model: torch.nn.Module, ids: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """The logits ``[B, N, V]`` of ``model.stream`` (a TTT-E2E model) fed ``ids [B, N]`` in the pieces
    between consecutive ``cuts`` (from 0 to N; equal cuts make empty pieces), without autograd."""
    pieces = [ids[:, a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    with torch.no_grad():
        return torch.cat([logits for logits, _ in model.stream(pieces)], dim=1)


def state_tensors(state: object, path: str = "state") -> dict[str, torch.Tensor]:
    """Every tensor of a language model's state (an ``LMState`` or ``E2EState``: dataclasses, dicts,
    lists and tuples of tensors), by its path in the state, e.g. ``state.blocks[1].mixer.key``."""
    if isinstance(state, torch.Tensor):
        return {path: state}
    if is_dataclass(state) and not isinstance(state, type):
        items = [(f".{f.name}", getattr(state, f.name)) for f in fields(state)]
    elif isinstance(state, dict):
        items = [(f"[{key!r}]", value) for key, value in state.items()]
    elif isinstance(state, (list, tuple)):
        items = [(f"[{i}]", value) for i, value in enumerate(state)]
    else:
        return {}  # a number (a position, a chunk size) or None
    return {name: t for suffix, value in items for name, t in state_tensors(value, path + suffix).items()}


def tiny_ttt_lm(inner_model: str, backbone: str = "transformer") -> torch.nn.Module:
    """Two blocks of width 32, 2 heads, mini-batch 4; the paper's base lr (1 linear, 0.1 MLP)."""
    config = ModelConfig(
        backbone=backbone,
        hidden_size=32,
        num_heads=2,
        intermediate_size=64,
        num_layers=2,
        ttt=TTTConfig(
            inner_model=inner_model, mini_batch_size=4, base_lr=1.0 if inner_model == "linear" else 0.1
        ),
    )
    return build_model(config)


class RecordLosses(L.Callback):
    """Training loss at each optimizer step; optionally crash right after step ``crash_after``."""

    def __init__(self, crash_after: int | None = None):
        self.losses: dict[int, float] = {}
        self.crash_after = crash_after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        if trainer.global_step == self.crash_after:
            raise RuntimeError("simulated crash")


class PressCtrlC(L.Callback):
    """Sends this process SIGINT (what Ctrl-C does) right after optimizer step ``at_step``."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGINT)


def direct_perplexity(checkpoint: Path, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The perplexity of ``checkpoint``'s model on ``inputs [N, T]`` / ``targets [N, T]``, computed directly
    (float64 cross-entropy over the scored tokens): the reference eval and compare are checked against."""
    model = load_module(checkpoint).model.eval()
    with torch.no_grad():
        logits = model(inputs)[0]
    loss = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    return math.exp(float(loss))


def perturbed_in_float64(module: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """``module`` in float64 with every parameter moved off its init (zeros, ones) by ``scale`` times a
    seeded normal draw, so that each one matters to a gradient check."""
    generator = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


def two_process_config(out_dir: Path, *overrides: str) -> tuple:
    """``load_config("tiny", ...)`` of a :data:`TINY` run on two CPU processes (``ddp_spawn``), with
    ``overrides`` after TINY's (a later key wins), writing into ``out_dir``."""
    from innerloop.config import load_config

    return load_config(
        "tiny", [*TINY, *overrides, "trainer.devices=2", "trainer.strategy=ddp_spawn", f"out_dir={out_dir}"]
    )


UNTRAINED_MODEL = {"hidden_size": 16, "num_heads": 2, "num_layers": 2, "intermediate_size": 32}
"""The model of :func:`untrained_run` (and ``model.ttt.mini_batch_size=4`` or ``model.window=4``)."""


def untrained_run(
    out: Path, corpus: Path, mixer: str, seed: int, seq_len: int, batch_size: int, val_batches: int
) -> Path:
    """A run folder ``out`` as `innerloop train` leaves it (config.yaml and last.safetensors), untrained:
    a :data:`UNTRAINED_MODEL` of ``mixer`` (seeded with ``seed``) reading ``corpus``."""
    overrides = [f"model.{k}={v}" for k, v in UNTRAINED_MODEL.items()] + [
        f"model.mixer={mixer}", "model.ttt.mini_batch_size=4" if mixer == "ttt" else "model.window=4",
        f"data.paths=[{corpus}]", f"data.seq_len={seq_len}", f"data.batch_size={batch_size}",
        f"data.val_batches={val_batches}", "trainer.num_position_buckets=4", f"out_dir={out}",
    ]  # fmt: skip
    run, config = load_config("tiny", overrides)
    torch.manual_seed(seed)
    module = LanguageModelModule(model=asdict(run.model), seq_len=seq_len, num_position_buckets=4)
    tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}
    save_checkpoint(tree, out / "last.safetensors")
    save_config(config, out / "config.yaml")
    return out


def directional_difference(
    params: Sequence[torch.Tensor],
    direction: Sequence[torch.Tensor],
    loss: Callable[[], torch.Tensor],
    h: float = 1e-5,
) -> float:
    """Five-point central difference of ``loss()`` along ``direction`` (one tensor per parameter of
    ``params``, moved in place and put back): error O(h^4)."""

    def at(t: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(t * d)
            value = loss().item()
            for p, d in zip(params, direction, strict=True):
                p.sub_(t * d)
        return value

    return (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)


def kill_a_forked_training_run(
    server, overrides: list[str], checkpoint: Path, folder: Path, after_step: int = 2, timeout_s: float = 180
) -> int | None:
    """:func:`kill_a_training_run`, the run forked from the warm interpreter ``server`` (the
    ``block_server`` fixture, tests/block_server.py: a process of its own, killed with SIGKILL as a fresh
    one is, without the ~10 s of CPU a fresh interpreter spends importing Lightning), its script and
    output in ``folder``. Where the server does not fork, :func:`kill_a_training_run` as before."""
    if not server.forks:
        return kill_a_training_run(overrides, checkpoint, after_step, timeout_s)
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "hold.py"
    argv = ["hold", str(after_step), str(timeout_s), *overrides]
    script.write_text(f"import sys\nsys.argv = {argv!r}\n" + _HOLD_AFTER_STEP)
    job = server.start(script, folder / "output.txt", timeout_s=timeout_s + 60)
    killed_at = None
    try:
        deadline = time.monotonic() + timeout_s
        while killed_at is None and time.monotonic() < deadline and job.poll() is None:
            if checkpoint.exists() and load_checkpoint(checkpoint)["global_step"] >= after_step:
                job.kill()
                assert job.wait(timeout=60) == -signal.SIGKILL, "the run ended before its kill"
                killed_at = load_checkpoint(checkpoint)["global_step"]
            time.sleep(0.02)
    finally:
        job.kill()
        job.wait(timeout=60)
    return killed_at
