"""Review s32f: the grader of issues 3 (training via Lightning) and 9 (trust), with inputs the other tests
do not use."""

from __future__ import annotations

import pytest
import torch

from innerloop.cli import main
from innerloop.config import load_config
from innerloop.config.load import ConfigError
from innerloop.train import CheckpointError, LanguageModelModule
from innerloop.train.metrics import Float64Perplexity, InnerLossDiagnostics, LossByPosition

# A file or folder name longer than any Linux file system allows (255 bytes), and a path longer than
# PATH_MAX (4096): the OS refuses them with ENAMETOOLONG, which pathlib's exists/is_symlink raise.
LONG_NAME = "y" * 300


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"innerloop {command}: error: ")
    return lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "out_dir={long}"],
        ["train", "data.paths=[{long}]", "out_dir={tmp}/run"],
        ["train", "data.paths=[{long}/*.py]", "out_dir={tmp}/run"],
        ["train", "--config", "{long}.yaml", "out_dir={tmp}/run"],
        pytest.param(
            ["train", "out_dir={long}", "--resume"], marks=pytest.mark.slow
        ),  # ~2.7 s: imports Lightning
        ["eval", "{long}.safetensors"],
        ["generate", "{long}.safetensors"],
        ["compare", "{long}"],
    ],
)
def test_a_path_with_a_name_too_long_is_one_error_line(tmp_path, capsys, argv) -> None:
    """Each gave a raw `OSError: [Errno 36] File name too long` traceback and exit 1 (issue 9 item 16:
    every user error is one line and exit 2)."""
    long = str(tmp_path / LONG_NAME)
    argv = [a.format(long=long, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    line = _one_error_line(capsys, argv[0])
    assert "is too long" in line and "at most 255" in line and LONG_NAME[:24] in line


def test_an_out_dir_longer_than_a_path_may_be_names_out_dir(tmp_path, capsys) -> None:
    out = str(tmp_path) + "/z" * 2100
    assert main(["train", f"out_dir={out}"]) == 2
    line = _one_error_line(capsys, "train")
    assert "out_dir=" in line and "more than this system allows in a path" in line


def test_load_config_refuses_a_too_long_out_dir_with_a_config_error(tmp_path) -> None:
    """From Python too: a ConfigError naming out_dir, not an OSError from deep in pathlib."""
    with pytest.raises(ConfigError, match=r"out_dir=.* is too long: its name 'yyyy"):
        load_config("tiny", [f"out_dir={tmp_path / LONG_NAME}"])


def test_eval_out_too_long_names_the_option(tmp_path, capsys) -> None:
    # the checkpoint is not read before --out is checked
    checkpoint = tmp_path / "last.safetensors"
    checkpoint.write_bytes(b"")
    assert main(["eval", str(checkpoint), "--out", str(tmp_path / LONG_NAME)]) == 2
    assert "--out=" in _one_error_line(capsys, "eval")


# The public metrics (issue 3, item 3) given inputs they cannot use: each error came from inside torch
# (`where expected condition to be a boolean tensor`, `index 300 is out of bounds for dimension 1`, an
# IndexError on a float index), or the bad value was taken and failed later.


def test_loss_by_position_refuses_a_mask_that_is_not_bool() -> None:
    with pytest.raises(ValueError, match=r"mask must be a bool tensor .* got dtype torch.float32"):
        LossByPosition(4).update(torch.rand(2, 8), torch.ones(2, 8))
    with pytest.raises(ValueError, match=r"num_buckets=2.5 must be an integer >= 1"):
        LossByPosition(2.5)


@pytest.mark.parametrize("bad", [256, 300, -5])
def test_perplexity_refuses_a_target_outside_the_vocabulary(bad) -> None:
    metric = Float64Perplexity(ignore_index=-100)
    target = torch.tensor([[1, 2, -100, bad]])
    with pytest.raises(ValueError, match=rf"target holds id {bad}, outside the vocabulary \[0, 256\)"):
        metric.update(torch.randn(1, 4, 256), target)
    metric.update(torch.randn(1, 4, 256), torch.tensor([[1, 2, -100, 255]]))  # the ignored id is fine
    assert metric.count == 3


def test_inner_loss_diagnostics_refuses_a_layer_that_is_not_an_integer() -> None:
    with pytest.raises(ValueError, match=r"layer=1.5 must be in \[0, 2\), an integer"):
        InnerLossDiagnostics(2).update(1.5, torch.ones(2), torch.ones(2))


def test_load_from_checkpoint_of_an_empty_file_names_it(tmp_path) -> None:
    """A zero-byte checkpoint (a copy that never finished) went to torch.load, whose EOFError has no message."""
    empty = tmp_path / "last.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"last.ckpt' is empty \(0 bytes\): not a checkpoint"):
        LanguageModelModule.load_from_checkpoint(empty)
