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


@pytest.mark.slow  # reason: a child Python that imports innerloop, ~2.5 s
def test_a_reader_that_stops_early_ends_the_command_quietly() -> None:
    """`innerloop generate ... | head -c 3`: the closed pipe ends the command with the shell's SIGPIPE
    status and no traceback (it printed BrokenPipeError's traceback and exited 1)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from innerloop import cli\n"
        "def chatty(args):\n"
        "    for i in range(10**6):\n"
        "        print('token', i, flush=True)\n"
        "    return 0\n"
        "cli._HANDLERS['plugins'] = chatty\n"
        "sys.exit(cli.main(['plugins']))\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    assert child.stdout.read(5) == b"token"
    child.stdout.close()  # the reader goes away
    status = child.wait(timeout=120)
    assert (status, child.stderr.read()) == (141, b"")
