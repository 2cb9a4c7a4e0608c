"""Review s44c: an adversarial look at session 43's changes (git diff 1a6d449..32d24ef).

Covered: core/functional.py's saved-tensor stack functions and their callers (an exception inside the
suspended block, threads, nested reentrant and non-reentrant checkpoints with save_on_cpu, a hook that
raises outside, torch.compile; a checkpointed primal-form model still holds less than one not
checkpointed); attend under bf16/fp16 CPU autocast (gradients bit-equal to SDPA's own, plain, checkpointed
and under save_on_cpu, with float and bool masks, is_causal and scale, retain_graph twice); head_counts
against the divisors of every width to 3000 and the head-split and weights-fit messages; data.name=hf's
compressed files (truncated, corrupt and not compressed .gz/.bz2/.xz of json, csv and text, streaming or
not: one DataError naming the file); ``innerloop tokenizer train``'s records, slices, mixes and --raw;
first_document_of at tiny fractions (tests/train/test_test_fraction.py); resume commands read back by the
override parser, not only by the shell (here); an override's value PyYAML cannot scan (here).
"""

from __future__ import annotations

import shlex

import pytest

from innerloop.config.load import ConfigError, read_out_dir
from innerloop.train.run import resume_command


@pytest.mark.parametrize(
    "out_dir",
    [
        "runs/x #2",
        "123",
        "true",
        "runs/a: b",
        "runs/tab\tx",
        "runs/${oc.env:HOME}",
        "runs/it's 'q'",
        "rüns/a b",
    ],
)
def test_a_resume_command_names_its_out_dir_to_the_override_parser_too(out_dir) -> None:
    """The shell-quoted ``out_dir=...`` of a resume command was read by the override parser as YAML: ``runs/x
    #2`` as ``runs/x`` (another run's folder), ``123`` as a number, a tab or ``a: b`` as an error, and
    ``${...}`` resolved; its value is quoted for YAML where it needs it, so the command resumes that run."""
    argv = shlex.split(resume_command(out_dir, " optim.lr=<lower>"))
    assert argv[:3] == ["innerloop", "train", "--resume"] and argv[4:] == ["optim.lr=<lower>"]
    assert read_out_dir("tiny", [argv[3]]) == out_dir
    assert resume_command("runs/a b") == "innerloop train --resume 'out_dir=runs/a b'"  # plain: as it was


def test_an_override_value_pyyaml_cannot_scan_is_one_config_error() -> None:
    """OmegaConf read ``out_dir=a<TAB>b``, and the check of its value's kind then raised PyYAML's bare
    ScannerError (a traceback from ``innerloop train``)."""
    with pytest.raises(
        ConfigError, match=r"override 'out_dir=a\\tb' cannot be parsed: found character '\\t'"
    ):
        read_out_dir("tiny", ["out_dir=a\tb"])
