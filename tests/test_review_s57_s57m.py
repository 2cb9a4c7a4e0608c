"""Review s57m: the CLI's messages where a user is stuck say, in one line, what to do."""

from __future__ import annotations

import shlex

import pytest

from innerloop.cli import main
from innerloop.config.load import resume_command
from innerloop.data.text import PENDING_CHECKPOINT


def _one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"innerloop {command}: error: "), captured.err
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [
        "eval",
        "generate",
        pytest.param("export", marks=pytest.mark.slow),  # ~8 s alone: imports transformers
        pytest.param("compare", marks=pytest.mark.slow),  # ~4 s alone: imports Lightning
    ],
)
def test_a_run_killed_before_its_first_checkpoint_was_confirmed_is_told_to_resume(
    capsys, tmp_path, command
) -> None:
    """A run folder holding only its pending checkpoint: eval said 'give .../last.safetensors' (not
    there), compare 'a folder without a checkpoint'; now both say it was interrupted and how to go on."""
    folder = tmp_path / "run #2"  # a name the resume command must quote (shell and override)
    folder.mkdir()
    (folder / "config.yaml").write_text("seed: 0\n")
    (folder / PENDING_CHECKPOINT).write_bytes(b"not judged here")
    arguments = {"export": [str(folder), str(tmp_path / "hf")], "compare": [str(folder), str(folder)]}
    assert main([command, *arguments.get(command, [str(folder)])]) == 2
    line = _one_error_line(capsys, command)
    assert "interrupted before its first checkpoint was moved into place" in line, line
    resume = resume_command(folder)
    assert f"`{resume}`" in line and shlex.split(resume)[-1] == f"out_dir='{folder}'", line
    assert "after checking it" in line and "start the run again" in line, line
    assert "innerloop train --config" in line and "load_config(" not in line, line
    assert "give the checkpoint file in it" not in line and "without a checkpoint" not in line, line


@pytest.mark.parametrize(
    ("given", "valid"),
    [({"vocab_size": "256"}, False), ({"num_attention_heads": 3}, False), ({"vocab_size": 300}, True)],
)
def test_a_disagreeing_hf_field_is_suggested_in_the_model_section_only_where_valid(given, valid) -> None:
    """config.json's top-level vocab_size "256" was refused with `set it there (model={'vocab_size':
    '256'})`: a suggestion of the value that the model section refuses in turn."""
    from innerloop.hf.configuration import InnerloopConfig

    ((name, value),) = given.items()
    with pytest.raises(ValueError) as caught:
        InnerloopConfig(model={"hidden_size": 64, "num_heads": 4}, **given)
    message = str(caught.value)
    assert ("set it there (model={" in message) is valid, message
    assert valid or f"{name}={value!r} is not a valid model." in message, message


@pytest.mark.parametrize("text", ["true", "3", "a,b", "a.txt"])
def test_a_one_value_list_key_is_suggested_as_a_list_that_reads_back_as_that_value(text) -> None:
    """``data.paths=true`` was told to write ``data.paths=[true]``, which is refused in turn (a bool for
    a path: quote it); the suggested override and YAML now read back as ``[text]``."""
    import re

    import yaml
    from omegaconf import OmegaConf

    from innerloop.config import ConfigError, load_config

    with pytest.raises(ConfigError) as caught:
        load_config("tiny", [f"data.paths={text}"])
    override, in_yaml = re.search(
        r"write (data\.paths=\[.*\]) \(in YAML: (paths: \[.*\])\)", str(caught.value)
    ).groups()
    assert OmegaConf.to_container(OmegaConf.from_dotlist([override]))["data"]["paths"] == [text], override
    assert yaml.safe_load(in_yaml) == {"paths": [text]}, in_yaml


@pytest.mark.slow  # ~4 s alone: imports Lightning (compare)
def test_compare_refuses_a_split_without_data_before_reading_a_checkpoint(capsys, tmp_path) -> None:
    """``compare A A --split x`` read both checkpoints first, printing "A (2) is the same checkpoint as
    A (1)" to stderr before the one-line error: two lines, after seconds of loading."""
    missing = str(tmp_path / "none.safetensors")  # read first, this would be the error
    assert main(["compare", missing, missing, "--split", "x"]) == 2
    assert "--split 'x' names a split of --data, and no --data was given" in _one_error_line(
        capsys, "compare"
    )


@pytest.mark.parametrize(
    ("arguments", "hint"),
    [
        (
            ["generate", "x.safetensors", "--temprature", "0.5"],
            "; did you mean --temperature? (`innerloop generate -h`",
        ),
        (["eval", "x.safetensors", "--held_out", "test"], "; did you mean --held-out? (`innerloop eval -h`"),
        (["eval", "x.safetensors", "--bogus"], "--bogus (`innerloop eval -h` lists the options)"),
    ],
)
def test_a_mistyped_option_names_the_options_it_may_have_meant(capsys, arguments, hint) -> None:
    """A typo in an option said only "unrecognized arguments: --temprature 0.5", naming nothing valid."""
    assert main(arguments) == 2
    assert hint in _one_error_line(capsys, arguments[0])
