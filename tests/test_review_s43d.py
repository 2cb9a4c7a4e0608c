"""Review s43d: the grader of issues 3 (training via Lightning, configs, the CLI) and 9 (trust), with
presets, overrides, interruptions and files the other tests do not use.

Checked and found right (no test kept: each repeats a promise another test already holds): a run with
``trainer.accumulate_grad_batches=2``, ``bf16-mixed``, active gradient clipping (``optim.grad_clip=0.05``),
the ``wsd`` schedule and ``data.seq_len=40`` off the mini-batch grid, stopped by SIGTERM at its first
step, right after a checkpoint and near its end, or by ``trainer.max_time``, and resumed, equals the
uninterrupted run bit for bit (every tensor of the checkpoint) with the same logged rows; the printed
perplexity and the loss by position of ``innerloop eval --data`` equal an independent float64
computation over the windows ``spread_windows`` promises; a ``bf16-true`` mamba run with an untied head
exports to a Hugging Face folder whose logits and greedy ``generate`` equal the checkpoint's model.

Kept here, each a finding (the commit that fixes it names it):

- The parameter count a run prints (and ``innerloop params``) counted an untied LM head twice:
  ``138,964 parameters (embedding 32,768; ...; head 16,384; ...)``, its parts summing to 16,384 more
  than the total.
- A resume from a ``config.yaml`` edited (or replaced) to another ``trainer.accumulate_grad_batches``
  went on without a word, its data stream continuing at batch ``step x`` the new value: batches skipped
  (or read twice) and a run that no longer equals the uninterrupted one. ``--resume`` refuses that
  change as an override, and ``data.*`` and ``seed`` edited by hand were refused already; the checkpoint
  now records what moves the stream (and, for text and recall data, the processes' count) as well.
- The command a stopped (or diverged) run prints to continue it, ``innerloop train --resume
  out_dir=runs/a b``, was not quoted for the shell: pasted, it named another folder (``runs/a``) and an
  argument ``b``. Every such command quotes ``out_dir=...`` where the path needs it.
- A run started where SIGINT is ignored (``innerloop train ... &`` in a batch script: a shell without job
  control starts background commands so) was killed by a SIGTERM that came before its first step (the
  data and the model being set up: a scheduler's stop, a preemption), with no line and its config.yaml
  left without a checkpoint, so the requeued ``--resume`` had nothing to continue and a plain rerun was
  refused; it now stops after its first step and saves it, as where SIGINT has its default handler.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from innerloop.config.load import ConfigError, load_config
from innerloop.models import ModelConfig
from innerloop.models.params import count_config_parameters


def test_the_printed_parts_of_a_model_with_an_untied_head_add_up_to_its_total() -> None:
    config = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 24}
    counts = count_config_parameters(ModelConfig.from_dict({**config, "tie_embeddings": False}))
    line = counts.describe()
    numbers = dict(re.findall(r"([a-z_]+) ([\d,]+)(?=[;)])", line))
    shown = {part: int(n.replace(",", "")) for part, n in numbers.items() if part != "x"}
    mixer = re.search(r"mixer (\d+) x ([\d,]+)", line)
    assert mixer is not None, line
    shown["mixer"] = int(mixer[1]) * int(mixer[2].replace(",", ""))
    assert shown["embedding"] == counts.parts["embedding"] == 256 * 16, line
    assert shown["head"] == counts.parts["head"] == 256 * 16, line
    assert sum(shown.values()) == counts.total, line


def _stream_checked(saved: list[str], resumed: list[str]) -> None:
    """Record the data stream of a run made with ``saved`` as its checkpoints do, and check a resume of
    it whose config.yaml gives ``resumed`` as ``--resume`` checks it against that checkpoint."""
    from innerloop.train import run as run_module

    checkpoint: dict = {}
    run_module._RecordRunData(load_config("tiny", saved)[0]).on_save_checkpoint(None, None, checkpoint)
    run_module.check_same_stream(load_config("tiny", resumed)[0], checkpoint, Path("runs/x/last.safetensors"))


def test_a_resume_whose_config_yaml_was_edited_to_another_accumulation_is_refused() -> None:
    saved = ["trainer.accumulate_grad_batches=2"]
    _stream_checked(saved, saved)  # unchanged: goes on
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches \(2 -> 3\).*data stream"):
        _stream_checked(saved, ["trainer.accumulate_grad_batches=3"])
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches \(2 -> 1\)"):
        _stream_checked(saved, [])
    with pytest.raises(ConfigError, match=r"trainer.devices \(2 -> 1\)"):
        _stream_checked(["trainer.devices=2", "trainer.strategy=ddp_spawn"], [])


@pytest.mark.parametrize("out_dir", ["runs/a b", "/tmp/it's here", "runs/$HOME;x"])
def test_the_command_that_continues_a_stopped_run_reads_back_as_its_out_dir(out_dir) -> None:
    from innerloop.train import run as run_module

    run = SimpleNamespace(out_dir=out_dir)
    from innerloop.cli import TRAIN_OPTIONS
    from innerloop.config.load import command_line_options

    with command_line_options(TRAIN_OPTIONS):  # as `innerloop train` runs it (s51a: Python gets a call)
        said = run_module._continuing(run, SimpleNamespace(callbacks=[]))  # no trainer.max_time spent
    assert shlex.split(said.strip("`")) == ["innerloop", "train", "--resume", f"out_dir={out_dir}"]
    note = run_module._last_checkpoint_note(Path(__file__), run)  # a file that is no checkpoint
    assert "could not be read back" in note  # (it names no command)
    assert shlex.split(run_module.resume_command(out_dir, " optim.lr=<lower>"))[3:] == [
        f"out_dir={out_dir}",
        "optim.lr=<lower>",
    ]


def test_sigterm_before_the_fit_is_a_stop_request_also_where_sigint_is_ignored() -> None:
    import signal

    from innerloop.train.interrupt import StopOnInterrupt

    interrupt = StopOnInterrupt()
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `innerloop train ... &` in a script
    ended = []

    def stand_in(signum, frame):  # for SIGTERM's default action, which would end this test's process
        ended.append(signum)

    before_term = signal.signal(signal.SIGTERM, stand_in)
    try:
        with interrupt.listening():
            signal.raise_signal(signal.SIGTERM)
            assert interrupt.requested and interrupt.signal == signal.SIGTERM and not ended
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # left as it was, not taken over
    finally:
        signal.signal(signal.SIGINT, before)
        stopping = signal.signal(signal.SIGTERM, before_term)
    assert stopping is stand_in  # put back after the block


@pytest.mark.parametrize("config", ["missing", "empty", "only comments"])
def test_resume_beside_a_checkpoint_whose_config_yaml_is_gone_or_empty_names_both(tmp_path, capsys, config):
    """With config.yaml deleted or emptied beside an intact checkpoint, `--resume` asked "is out_dir a run?"
    (missing) or advised to "leave --config out for the preset 'tiny'" (empty), neither of which applies:
    the error names the checkpoint and the file a resume reads the run's settings from. Nothing is
    written."""
    from innerloop.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "last.safetensors").write_bytes(b"a checkpoint")
    if config != "missing":
        (out / "config.yaml").write_text("" if config == "empty" else "# trainer: {max_steps: 100}\n")
    assert main(["train", "--resume", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"beside the run's checkpoint '{out / 'last.safetensors'}'" in err, err
    assert "put that file back" in err and "preset" not in err and "a run?" not in err
    assert sorted(p.name for p in out.iterdir()) == (
        ["last.safetensors"] if config == "missing" else ["config.yaml", "last.safetensors"]
    )
