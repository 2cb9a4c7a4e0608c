"""One-line errors (never tracebacks) and no silent overwrites in the smaller commands: `innerloop
tokenizer train` and `innerloop convert`."""

from __future__ import annotations

from pathlib import Path

import pytest

from innerloop.cli import main

REFERENCE_MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "ttt_linear_transformer"


@pytest.mark.parametrize("path", ["nomatch*", "emptydir"])
def test_tokenizer_train_on_paths_matching_nothing_is_one_line_naming_the_path(tmp_path, capsys, path):
    (tmp_path / "emptydir").mkdir()
    code = main(
        ["tokenizer", "train", "--vocab-size", "300", "--out", str(tmp_path / "tok"), str(tmp_path / path)]
    )
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1, error
    assert f"PATH {str(tmp_path / path)!r} matches no file" in error
    assert not (tmp_path / "tok").exists()


def test_tokenizer_train_never_replaces_a_tokenizer_config_without_overwrite(tmp_path, capsys):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "tokenizer_config.json").write_text('{"my": "custom config"}')
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    assert main(["tokenizer", "train", "--vocab-size", "300", "--out", str(out), str(text)]) == 2
    assert "tokenizer_config.json' exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "tokenizer_config.json").read_text() == '{"my": "custom config"}'


@pytest.mark.parametrize(
    ("out", "paths", "how"),
    [
        ("data", ["data"], "lies inside"),
        ("data/tok", ["data"], "lies inside"),
        ("data", ["data/*"], "is reached by"),
    ],
)
def test_tokenizer_train_refuses_an_out_inside_its_own_data(tmp_path, capsys, out, paths, how):
    """Its files were written into the data, and the next training read the last one's JSON as text."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    paths = [str(tmp_path / path) for path in paths]
    code = main(
        ["tokenizer", "train", "--vocab-size", "300", "--out", str(tmp_path / out), *paths, "--overwrite"]
    )
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1, error
    assert (
        f"--out {str(tmp_path / out)!r} {how} PATH {paths[0]!r}: the tokenizer files written there" in error
    )
    assert [p.name for p in data.iterdir()] == ["text.txt"]


@pytest.mark.parametrize("out", ["afile", "afile/sub"])
def test_convert_into_a_file_is_one_line_before_the_model_is_read(tmp_path, capsys, out):
    (tmp_path / "afile").write_text("mine")
    code = main(["convert", "ttt-lm-pytorch", str(REFERENCE_MODEL), str(tmp_path / out)])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1, error
    assert "OUT=" in error and "is not a directory" in error
    assert (tmp_path / "afile").read_text() == "mine"


def test_params_checks_the_model_only(capsys):
    # a run's data paths and out_dir do not concern a parameter count; the model's own ranges do
    assert main(["params", "data.paths=[/nonexistent/nomatch*]", "out_dir=/dev/null/x"]) == 0
    assert "parameters" in capsys.readouterr().out
    assert main(["params", "model.rope_theta=-1"]) == 2
    assert "model.rope_theta=-1.0 must be >= 1" in capsys.readouterr().err


def test_eval_of_too_short_data_names_the_file_and_the_option(tmp_path, capsys):
    from innerloop.models import ModelConfig, build_model
    from innerloop.train.module import save_model_checkpoint

    model = build_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32))
    checkpoint = save_model_checkpoint(model, tmp_path / "m.safetensors")
    short = tmp_path / "short.txt"
    short.write_text("ten bytes.")
    assert (
        main(["eval", str(checkpoint), "--data", str(short), "--seq-len", "32", "--out", str(tmp_path)]) == 2
    )
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert f"--data {str(short)!r} has 11 bytes (end-of-text separators included)" in error
    assert "fewer than --seq-len + 1 = 33" in error
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["eval", str(checkpoint), "--data", str(empty), "--out", str(tmp_path)]) == 2
    assert f"--data {str(empty)!r}: the file is empty" in capsys.readouterr().err


_STOPPING_READER = """
import os, sys, threading
from innerloop import cli

def chatty(args):
    for i in range(10**6):
        print("token", i, flush=True)
    return 0

read_end, write_end = os.pipe()
os.dup2(write_end, 1)  # this process's stdout is the pipe
os.close(write_end)

def reader():  # `| head -c 5`: the first five bytes, then the reader goes away
    with open(FIRST, "wb") as first:
        first.write(os.read(read_end, 5))
    os.close(read_end)

threading.Thread(target=reader).start()
cli._HANDLERS["plugins"] = chatty
sys.exit(cli.main(["plugins"]))
"""


@pytest.mark.slow  # reason: a process of its own (forked from the warm block server where it forks)
def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path, block_server) -> None:
    """`innerloop generate ... | head -c 3`: the closed pipe ends the command with the shell's SIGPIPE
    status and no traceback (it printed BrokenPipeError's traceback and exited 1). A process of its own
    (Python's flush of stdout at exit is part of it), whose stdout is a pipe that its reader closes after
    five bytes; a job of the block server (tests/block_server.py: torch and innerloop imported once per
    pytest process, not once per test), or a fresh interpreter where the server does not fork."""
    import subprocess
    import sys

    script, first = tmp_path / "stops_early.py", tmp_path / "first"
    script.write_text(f"FIRST = {str(first)!r}\n{_STOPPING_READER}")
    if block_server.forks:
        status, stderr = block_server.run(script, tmp_path / "stops_early.log", timeout_s=120)
    else:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        status, stderr = done.returncode, done.stdout + done.stderr
    assert first.read_bytes() == b"token"
    assert (status, stderr) == (141, "")
