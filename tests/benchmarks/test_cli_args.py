"""The benchmark scripts' command lines: every numeric option refuses a bad value with argparse's own
one-line error (exit status 2) naming the option, the value and what is valid, instead of a traceback
or a table of nothing; ``science.py diagnose`` of a model without TTT layers says so in one line; and
``e2e_demo.py --help`` says its budget is CPU time, as the code measures.

Most checks call each script's ``parse_args`` in this process (the scripts import torch, and some
Lightning, before they parse: a process per case would cost seconds each); a few run the whole script
as ``__main__`` with its command line (runpy, in this process), and one as a user does, ``python
benchmarks/<script>.py ...``, to check the exit status and the message end to end.
"""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from benchmark_testing import BENCHMARKS, benchmark_script
from benchmark_testing import parse_benchmark_args as _parse

# (script, arguments, what the error line says after "error: ")
BAD = [
    ("layer_speed", ["--repeats", "0"], "argument --repeats: must be an integer >= 1, got '0'"),
    ("layer_speed", ["--lengths", "512", "-1"], "argument --lengths: must be an integer >= 1, got '-1'"),
    ("layer_speed", ["--lengths", "512", "512"], "--lengths must be distinct values, got [512, 512]"),
    ("layer_speed", ["--batch", "two"], "argument --batch: must be an integer >= 1, got 'two'"),
    ("decode_speed", ["--tokens", "0"], "argument --tokens: must be an integer >= 1, got '0'"),
    ("compile_speed", ["--seq-len", "0"], "argument --seq-len: must be an integer >= 1, got '0'"),
    ("compile_speed", ["--models", "rnn"], "argument --models: invalid choice: 'rnn'"),
    ("compile_speed", ["--hidden", "30", "--heads", "4"], "--hidden 30 must be a multiple of --heads 4"),
    ("decode_speed", ["--threads", "0"], "argument --threads: must be an integer >= 1, got '0'"),
    ("decode_speed", ["--mini-batch", "100000"], "argument --mini-batch: must be an integer from 1 to 65536"),
    ("decode_speed", ["--hidden", "768", "--heads", "5"], "--hidden 768 must be a multiple of --heads 5"),
    ("delta_speed", ["--loop-tokens", "-1"], "argument --loop-tokens: must be an integer >= 0, got '-1'"),
    ("delta_speed", ["--chunk-sizes", "64", "0"], "argument --chunk-sizes: must be an integer >= 1, got '0'"),
    ("delta_speed", ["--repeats", "0"], "argument --repeats: must be an integer >= 1, got '0'"),
    ("e2e_demo", ["--minutes", "0"], "argument --minutes: must be a finite number > 0, got '0'"),
    ("e2e_demo", ["--minutes", "nan"], "argument --minutes: must be a finite number > 0, got 'nan'"),
    ("e2e_demo", ["--short-tokens", "0"], "argument --short-tokens: must be an integer >= 1, got '0'"),
    ("family", ["--seed", "-1"], "argument --seed: must be an integer from 0 to 4294967295, got '-1'"),
    ("generate_speed", ["--window", "0"], "argument --window: must be an integer >= 1, got '0'"),
    (
        "generate_speed",
        ["--hidden", "15", "--heads", "5"],
        "--hidden 15 must be a multiple of --heads 5 with an even head size (the head size 15 / 5 = 3 is odd)",
    ),
    ("kernel_speed", ["--min-len", "4096", "--max-len", "2048"], "--min-len 4096 must be <= --max-len 2048"),
    ("kernel_speed", ["--min-len", "100"], "--min-len 100 must be a multiple of --mini-batch 16"),
    ("kernel_speed", ["--head-dim", "48"], "--head-dim 48: the Triton TTT-Linear kernel's head_dim 48"),
    ("recall", ["--steps", "0"], "argument --steps: must be an integer from 1 to 9007199254740992, got '0'"),
    ("recall", ["--seeds", "1", "1"], "--seeds must be distinct values, got [1, 1]"),
    ("science", ["sweep", "--jobs", "0"], "argument --jobs: must be an integer >= 1, got '0'"),
    ("science", ["diagnose", "ckpt", "--windows", "0"], "argument --windows: must be an integer >= 1"),
    ("science", ["reference", "ttt.py", "--steps", "-3"], "argument --steps: must be an integer >= 1"),
    ("science", ["growth", "a", "b", "--seq-len", "0"], "argument --seq-len: must be an integer >= 1"),
    ("train_speed", ["--repeats", "0"], "argument --repeats: must be an integer >= 1, got '0'"),
]


@pytest.mark.parametrize(("name", "argv", "message"), BAD, ids=[f"{n} {' '.join(a)}" for n, a, _ in BAD])
def test_a_bad_value_is_a_one_line_usage_error(name, argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        _parse(name, argv)
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " + message in error


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in ("cli_args", "ttt_paths"))
)
def test_the_defaults_are_valid(name):
    _parse(name, ["sweep"] if name == "science" else [])


def test_the_documented_zeros_and_edges_are_accepted():
    assert _parse("delta_speed", ["--loop-tokens", "0"]).loop_tokens == 0  # 0: skip the token loop
    assert _parse("kernel_speed", ["--skip-naive-above", "0"]).skip_naive_above == 0  # naive nowhere
    assert _parse("kernel_speed", ["--min-len", "64", "--max-len", "64"]).max_len == 64
    assert _parse("e2e_demo", ["--minutes", "0.5"]).minutes == 0.5
    assert _parse("family", ["--seed", str(2**32 - 1)]).seed == 2**32 - 1


def test_every_numeric_option_goes_through_a_check():
    """A new option with a bare ``type=int`` or ``type=float`` would take 0 or -1 silently."""
    for path in sorted(BENCHMARKS.glob("*.py")):
        assert not re.search(r"type=(int|float)\b", path.read_text(encoding="utf-8")), path.name


# End to end, as a user runs them: the script run as ``__main__`` with its command line in sys.argv
# (here, runpy: the same code as ``python benchmarks/<script>.py``, without a process and its imports);
# one of them also in a process of its own, for the exit status Python gives.
COMMANDS = [
    ("layer_speed.py", ["--repeats", "0"], "argument --repeats: must be an integer >= 1, got '0'"),
    (
        "kernel_speed.py",
        ["--min-len", "4096", "--max-len", "2048"],
        "--min-len 4096 must be <= --max-len 2048",
    ),
    ("science.py", ["sweep", "--jobs", "0"], "argument --jobs: must be an integer >= 1, got '0'"),
]


def _assert_a_one_line_usage_error(script: str, message: str, stdout: str, stderr: str) -> None:
    assert "Traceback" not in stderr and stdout == ""
    assert stderr.strip().splitlines()[-1].startswith(f"{script}")
    assert f"error: {message}" in stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("script", "argv", "message"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_bad_value_ends_the_script_with_status_2_and_no_traceback(
    script, argv, message, monkeypatch, capsys
):
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / script), *argv])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ first
    with pytest.raises(SystemExit) as exit:  # any other exception: the traceback a user would see
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert exit.value.code == 2
    out, err = capsys.readouterr()
    _assert_a_one_line_usage_error(script, message, out, err)


@pytest.mark.slow  # ~2 s: a subprocess that imports torch before it parses its arguments
def test_a_bad_value_exits_with_status_2_and_no_traceback() -> None:
    script, argv, message = COMMANDS[1]  # the one whose imports are fewest (no Lightning)
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr[-2000:]
    _assert_a_one_line_usage_error(script, message, done.stdout, done.stderr)


# ---- science.py diagnose: what it says when there is nothing to diagnose ----------------------------


def _model(preset: str) -> torch.nn.Module:
    from innerloop.config import load_config
    from innerloop.models import build_model

    run, _ = load_config(preset)
    torch.manual_seed(0)
    return build_model(run.model).eval()


@pytest.mark.parametrize(("preset", "mixer"), [("tiny-swa", "swa"), ("e2e-tiny", "e2e")])
def test_diagnose_of_a_model_without_ttt_layers_says_so_in_one_line(preset, mixer, monkeypatch, capsys):
    import innerloop.train

    monkeypatch.setattr(
        innerloop.train, "load_module", lambda checkpoint: SimpleNamespace(model=_model(preset))
    )
    benchmark_script("science").main(
        ["diagnose", "runs/x/last.safetensors", "--windows", "1", "--seq-len", "16"]
    )
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out
    assert out.startswith(
        "runs/x/last.safetensors: nothing to diagnose: no block of this model has a TTT layer"
    )
    assert f"(mixer {mixer!r})" in out


def test_diagnose_with_windows_shorter_than_a_mini_batch_is_a_usage_error(monkeypatch, capsys):
    import innerloop.train

    monkeypatch.setattr(
        innerloop.train, "load_module", lambda checkpoint: SimpleNamespace(model=_model("tiny"))
    )
    with pytest.raises(SystemExit) as exit:
        benchmark_script("science").main(["diagnose", "runs/x/last.safetensors", "--seq-len", "8"])
    assert exit.value.code == 2
    assert "error: --seq-len 8 must be >= 16, the mini-batch size" in capsys.readouterr().err


# ---- e2e_demo.py: its budget is CPU time, and its help says so -----------------------------------


def test_e2e_demo_help_says_the_budget_is_cpu_time(capsys):
    with pytest.raises(SystemExit) as exit:
        _parse("e2e_demo", ["--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "for the same CPU time (not wall-clock time)" in text
    assert "--minutes MINUTES training budget of each model in minutes of process CPU time" in text
    assert "same wall-clock time" not in text


# ---- review s52q: every number option reads its text by the override's one rule ---------------------

_SCIENCE_POSITIONALS = {"diagnose": ["ckpt"], "reference": ["ttt.py"], "growth": ["a", "b"]}


def _number_options(name: str, monkeypatch) -> list[tuple[list[str], str]]:
    """``(arguments before it, flag)`` of every option of ``benchmarks/<name>.py`` whose type is one of
    cli_args.py's number types (the parser as the script builds it, caught as it parses no arguments)."""
    import argparse

    built: list[argparse.ArgumentParser] = []
    real = argparse.ArgumentParser.parse_args

    def keep(parser, args=None, namespace=None):
        built.append(parser)
        return real(parser, [] if name != "science" else ["sweep"], namespace)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", keep)
        _parse(name, ["sweep"] if name == "science" else [])
    found = []
    for action in built[0]._actions:
        parsers = getattr(action, "choices", None) if isinstance(action, argparse._SubParsersAction) else None
        for command, sub in (parsers or {None: built[0]}).items():
            before = [command, *_SCIENCE_POSITIONALS.get(command, [])] if command else []
            for option in sub._actions:
                kind = getattr(option.type, "__name__", "")
                if option.option_strings and (kind.startswith("int_range") or kind == "positive_float"):
                    found.append((before, option.option_strings[0]))
    return found


@pytest.mark.slow  # 0.3-0.9 s a script on the loaded 2-core machine (its parser run ~40 times)
@pytest.mark.parametrize(
    "name", sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in ("cli_args", "ttt_paths"))
)
def test_every_number_option_reads_its_text_as_an_override_does(name, monkeypatch, capsys):
    # regression review s52q: the scripts' int()/float() took '５' (full-width), '٣' and '007', which
    # innerloop's overrides and CLI options refuse: one rule of a number's text, named in the error
    options = _number_options(name, monkeypatch)
    assert options or name in ("triton_gpu_check",), name
    for before, flag in options:
        for text in ("５", "٣", "007"):
            with pytest.raises(SystemExit) as exit:
                _parse(name, [*before, flag, text])
            error = capsys.readouterr().err.strip().splitlines()[-1]
            assert exit.value.code == 2 and f"error: argument {flag}" in error, (name, flag, error)
            assert f"got {text!r}: give a decimal" in error, error


def test_the_seed_and_steps_ranges_are_the_configs():
    from cli_args import SEED_MAX, STEPS_MAX

    from innerloop.models.config import SEED_BOUNDS, STEP_BOUNDS

    assert (SEED_MAX, STEPS_MAX) == (SEED_BOUNDS.high, STEP_BOUNDS.high)
    assert _parse("recall", ["--steps", str(STEPS_MAX)]).steps == STEPS_MAX
    with pytest.raises(SystemExit):  # trainer.max_steps refuses it: refused here, naming --steps
        _parse("recall", ["--steps", str(STEPS_MAX + 1)])
