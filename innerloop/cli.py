"""The ``innerloop`` command: train, eval, compare, params, generate, convert, export, tokenizer, plugins.

``innerloop train`` with no arguments is the main job: a tiny TTT-Linear LM on the Python standard
library's source, about a minute on 2 idle CPU cores (measured in benchmarks/RESULTS.md, "The main
job"; longer on a loaded machine). ``innerloop <command> --help`` explains each command.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import errno
import math
import os
import re
import signal
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from innerloop.config.load import (
    DEFAULT_PRESET,
    PRESET_OR_FILE,
    ConfigError,
    command_line_options,
    name_too_long,
)
from innerloop.config.schema import HELD_OUT
from innerloop.config.trainer_args import PLAIN_FLOAT_WORDS, PLAIN_INT_WORDS, plain_number
from innerloop.core.functional import TORCH_SEEDS, TORCH_SEEDS_TEXT
from innerloop.core.wording import counted
from innerloop.data.tokenizer import MAX_TRAINED_VOCAB, MIN_TRAINED_VOCAB
from innerloop.models.config import WINDOW_SIZE_BOUNDS

if (
    TYPE_CHECKING
):  # annotations only: the commands import what they run lazily (`innerloop --help` stays fast)
    from pathlib import Path

    from innerloop.data.tokenizer import Tokenizer
    from innerloop.models import E2ELM, CausalLM

_TRAIN_EPILOG = """\
with no arguments: the preset `tiny`, about a minute on 2 idle CPU cores (benchmarks/RESULTS.md).
overrides are dotted keys of the config, e.g.:
  innerloop train trainer.max_steps=100 model.ttt.inner_model=mlp model.ttt.base_lr=0.1
  innerloop train --config tiny-swa model.window=16
  innerloop train --config recall-ttt trainer.devices=2 trainer.strategy=ddp_spawn
outputs go to out_dir (runs/<preset> for a packaged preset; runs/tiny for a YAML file that sets none):
  last.safetensors, config.yaml, loss_by_position.csv and loss_by_position.png, and
  logs/version_<n>/metrics.csv (what was logged, one version_<n> folder per launch).
An out_dir holds one run: --resume continues it (optim.*, trainer.* and model.ttt.kernel may
change, e.g. trainer.max_steps=2000 to extend it), --overwrite replaces it.
"""


def _running_version() -> str:
    """``innerloop.__version__``: the version of the code that runs, the one checkpoints record. Not the
    installed distribution's metadata, which an editable install keeps from the day it was installed
    (and which belongs to another checkout when this one runs from its source tree)."""
    from innerloop import __version__  # loaded already: importing innerloop.config ran the package

    return __version__


class UsageError(Exception):
    """A command line argparse cannot parse; ``prog`` is the (sub)command's, e.g. ``innerloop eval``."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


# A value that starts with '-' and argparse does not see as a negative number (only -5 or -.5 are) is taken
# for an option: `--temperature -inf` and `--temperature -1e3` said "expected one argument". No option of
# innerloop starts with '-' and a digit, '.', 'inf' or 'nan': such a value goes to its option's type.
_NEGATIVE_NUMBER = re.compile(r"-(?:[0-9.]|inf|nan)", re.IGNORECASE)


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), reported by :func:`main`, and which
    reads any negative number (``-inf``, ``-1e3``, not only ``-5``) as a value, to be judged by its type."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._given = list(args) if args is not None else sys.argv[1:]  # for error()'s hint
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise UsageError(self.prog, message + self._dash_value_hint(message))

    def _dash_value_hint(self, message: str) -> str:
        """How to give a value that starts with '-' (argparse takes ``--prompt -x``'s ``-x`` for an option
        and says only 'expected one argument'): after '=', ``--prompt=-x``; ``""`` for other errors."""
        found = re.fullmatch(r"argument ([^\s:/]+)(?:/\S+)?: expected one argument", message)
        given = getattr(self, "_given", [])
        if found is None or found.group(1) not in given:
            return ""
        at = given.index(found.group(1)) + 1
        if at >= len(given) or not given[at].startswith("-"):
            return ""
        return f"; a value that starts with '-' is given after '=': {found.group(1)}={given[at]}"


def _number(
    kind: type, low: float, low_open: bool = False, high: int | None = None
) -> Callable[[str], float]:
    """An argparse ``type``: a ``kind`` (an int of any size, or a finite float) >= ``low`` (> ``low`` if
    ``low_open``), and <= ``high`` when given, its text by an override's rule (:func:`plain_number`).
    An int is compared as it is: ``math.isfinite`` raised a bare ``OverflowError`` on an integer past
    float's range (``--tokens`` of 400 digits)."""
    valid = f"{'an integer' if kind is int else 'a finite number'} {'>' if low_open else '>='} {low}"
    form = PLAIN_INT_WORDS if kind is int else PLAIN_FLOAT_WORDS

    def parse(text: str) -> float:
        value = plain_number(kind, text)
        if value is None:
            raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}: give {form}")
        if (kind is float and not math.isfinite(value)) or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}")
        if high is not None and value > high:
            kind_name = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind_name} in [{low}, {high}], got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


_POSITIVE_INT = _number(int, 1)
# eval's and compare's window sizes (train.data.WINDOW_SIZE_BOUNDS): 10**30 crashed with a traceback
CONFIG_OPTION = {PRESET_OR_FILE: "--config"}
"""The option that gives :func:`~innerloop.config.load.load_config`'s ``preset_or_file``: its errors name it."""

TRAIN_OPTIONS = {"resume": "--resume", "overwrite": "--overwrite"}
"""The flags of ``innerloop train`` that give :func:`~innerloop.train.run.train`'s ``resume`` and
``overwrite``: its errors and hints name them (:func:`~innerloop.config.load.given_flag`), and the command
that continues a run (:func:`~innerloop.config.load.continuing_call`)."""

RESUME_OPTION = {"resume": "--resume"}
"""For the commands that read a checkpoint: a message that says how to continue a run (a run folder
holding only its unconfirmed checkpoint) gives the ``innerloop train --resume`` command, not the Python
call (:func:`~innerloop.config.load.continuing_call`)."""

EXPORT_OPTIONS = {
    "out_dir": "OUT_DIR",
    "overwrite": "--overwrite",
    "tokenizer": "--tokenizer",
    **RESUME_OPTION,
}
"""The arguments of ``innerloop export`` that give :func:`~innerloop.hf.export.export_checkpoint`'s
``out_dir``, ``overwrite`` and ``tokenizer``: its errors name them (and the command that continues a run,
:data:`RESUME_OPTION`)."""

EVAL_AND_COMPARE_OPTIONS = {
    "paths": "--data",
    "seq_len": "--seq-len",
    "seq_lens": "--seq-len",
    "batch_size": "--batch-size",
    "batches": "--batches",
    "split": "--split",
    "held_out": "--held-out",
    "no_ttt": "--no-ttt",
    "baseline": "--baseline",
    "resamples": "--resamples",
    "seed": "--seed",
    "out_dir": "--out",
    **RESUME_OPTION,
}
"""The option of ``eval`` and ``compare`` that gives each parameter of ``evaluate`` and ``compare``: their
errors name it (:func:`~innerloop.config.load.command_line_options`), not the Python parameter (and the
command that continues a run, :data:`RESUME_OPTION`)."""

_SEQ_LEN = _number(int, 1, high=int(WINDOW_SIZE_BOUNDS["seq_len"].high))
_BATCH_SIZE = _number(int, 1, high=int(WINDOW_SIZE_BOUNDS["batch_size"].high))
_BATCHES = _number(int, 1, high=int(WINDOW_SIZE_BOUNDS["batches"].high))


def _seed(text: str) -> int:
    """An argparse ``type``: a seed of torch's generator, an integer in
    :data:`~innerloop.core.functional.TORCH_SEEDS` (the range ``compare(seed=...)`` takes)."""
    value = plain_number(int, text)
    if value is None or value not in TORCH_SEEDS:
        form = "" if value is not None else f": give {PLAIN_INT_WORDS}"
        raise argparse.ArgumentTypeError(f"must be an integer in {TORCH_SEEDS_TEXT}, got {text!r}{form}")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (their line breaks kept); each option's help states its
    default itself, as ``(default: %(default)s)`` or in words (tests/test_cli_help.py checks it)."""


def _plugin_kinds_in_words() -> str:
    """Every plugin kind, from the one table of kinds: ``inner models, inner losses, ...``."""
    from innerloop.registry.kinds import KINDS

    # A kind's hook is named after what it registers, in the plural: register_inner_losses.
    return ", ".join(kind.hook.removeprefix("register_").replace("_", " ") for kind in KINDS)


def _parser() -> argparse.ArgumentParser:
    from innerloop.config.load import preset_names

    parser = _ArgumentParser(
        prog="innerloop", description="Test-time-training sequence layers.", formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_running_version()}")
    _add_plugin_module_option(parser, "plugin_modules_before")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", help="what to do; `innerloop COMMAND --help` explains it"
    )
    presets = preset_names()
    _add_train(commands, presets)
    _add_eval(commands)
    _add_compare(commands)
    _add_params(commands, presets)
    _add_generate(commands)
    _add_convert(commands)
    _add_tokenizer(commands)
    _add_export(commands)
    plugins_help = f"list the registered plugins of every kind ({_plugin_kinds_in_words()})"
    commands.add_parser(
        "plugins",
        help=plugins_help,
        description=textwrap.fill(
            f"{plugins_help}: kind, name and origin of each, then each plugin that failed to load and why."
        ),
        formatter_class=_HelpFormatter,
    )
    for name, command in commands.choices.items():
        if name != "tokenizer":  # every command that builds or loads a model, or lists the plugins
            _add_plugin_module_option(command, "plugin_modules")
    return parser


_PLUGIN_MODULE_HELP = (
    "load the plugin module MODULE (an importable module name, my_pkg.plugin, or a .py file, ./my_loss.py) "
    "that is not installed, as an installed plugin's; repeatable, before or after the command. "
    "INNERLOOP_PLUGIN_MODULES=a,b loads modules too (first); default: none (installed plugins only)"
)


def _add_plugin_module_option(parser: argparse.ArgumentParser, dest: str) -> None:
    """``-p MODULE`` (repeatable) on ``parser``; the top-level parser and the command's keep their own
    lists (a command's parser would otherwise replace the top-level one's)."""
    parser.add_argument(
        "-p", dest=dest, action="append", default=[], metavar="MODULE", help=_PLUGIN_MODULE_HELP
    )


def _load_plugin_modules(args: argparse.Namespace) -> None:
    """Load the plugin modules of ``INNERLOOP_PLUGIN_MODULES`` and of ``-p`` (before the command, then
    after it) into the process-wide registry."""
    named = [*args.plugin_modules_before, *getattr(args, "plugin_modules", [])]
    from innerloop.registry.modules import load_plugin_modules, plugin_modules_from_env

    if named or plugin_modules_from_env():
        load_plugin_modules(named)


def _add_train(commands: argparse._SubParsersAction, presets: Sequence[str]) -> None:
    train = commands.add_parser(
        "train",
        help="train a language model from a preset or YAML config",
        description="Train a language model from a packaged preset or a YAML config, with overrides.",
        epilog=_TRAIN_EPILOG,
        formatter_class=_HelpFormatter,
    )
    train.add_argument(
        "--config",
        default=None,
        metavar="PRESET_OR_FILE",
        help=f"a packaged preset ({', '.join(presets)}) or a YAML file (default: {DEFAULT_PRESET}; with "
        "--resume, the run's own config.yaml: a --config that sets other values is warned about and not used)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in out_dir from its last checkpoint (its saved config.yaml is the base config; "
        "optim.*, trainer.* and model.ttt.kernel overrides apply from the step reached, e.g. trainer.max_steps "
        "to extend it; "
        "out_dir comes from the overrides, else from --config)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in out_dir (its checkpoint and config); without it an existing run is refused",
    )
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, dotted keys such as trainer.max_steps=100 (default: none, the config as it is)",
    )


_NO_TTT_HELP = (
    "evaluate the same weights with test-time training switched off (TTT layers: inner learning rate 0; "
    "TTT-E2E: the prime MLPs fixed), to measure what learning at test time contributes; output files end "
    "in _no-ttt (default: off)"
)


_SPLIT_HELP = (
    "the split of --data to read, for a data.name='hf' run's records (a slice such as 'test[:50%%]' too; "
    "default: the data's own: 'train' for data files, a saved Dataset's split, a saved DatasetDict's "
    "only one)"
)


_HELD_OUT_HELP = (
    "which of the run's held-out windows to score: 'val', its validation windows, or 'test', those of "
    "the text it held out for test (data.test_fraction > 0), never trained on nor validated on; the "
    "output files' names say which (default: %(default)s)"
)


def _add_eval(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="perplexity and loss by position of a checkpoint (CSV + PNG)",
        description="Perplexity and loss by position of a checkpoint, on held-out text or your own files. A bf16-true or 16-true run's weights run upcast to float32 (exactly), as a note on stderr says, so that runs of every precision are evaluated alike.",
        formatter_class=_HelpFormatter,
    )
    evaluate.add_argument("checkpoint", help="a last.safetensors written by `innerloop train`")
    evaluate.add_argument(
        "--data",
        nargs="+",
        action="extend",  # `--data a --data b` reads both (argparse's store kept b alone, silently)
        default=[],
        metavar="PATH",
        help="files, directories or globs to evaluate on (default: the windows the run's validation read, "
        "from the config.yaml beside the checkpoint when it agrees with the model, data.* and seed the "
        "checkpoint records, else (another run's, said) from that record; else the held-out part of the "
        "standard-library corpus)",
    )
    evaluate.add_argument("--split", default=None, help=_SPLIT_HELP)
    evaluate.add_argument("--held-out", choices=HELD_OUT, default="val", help=_HELD_OUT_HELP)
    evaluate.add_argument(
        "--seq-len",
        type=_SEQ_LEN,
        default=None,
        help="tokens per window (default: the seq_len the checkpoint was trained with)",
    )
    evaluate.add_argument(
        "--batch-size",
        type=_BATCH_SIZE,
        default=None,
        help="windows per batch (default: the run's data.batch_size on its own windows; 16 on --data files "
        "or of a checkpoint whose run is unknown)",
    )
    evaluate.add_argument(
        "--batches",
        type=_BATCHES,
        default=None,
        help="number of batches of --batch-size windows to evaluate (default: as many windows as the run's "
        "validation reads, data.val_batches x data.batch_size; 128 windows from --data files or of a "
        "checkpoint whose run is unknown)",
    )
    evaluate.add_argument("--no-ttt", action="store_true", help=_NO_TTT_HELP)
    evaluate.add_argument(
        "--out",
        default=None,
        help="folder for eval_<checkpoint>_<data>_T<seq_len>_n<windows>.csv, .png and .md (how to reproduce it), <checkpoint> being "
        "the file's stem and the start of its checksum, e.g. eval_last-1a2b3c4d_default-val_T128_n128.csv "
        "(default: the checkpoint's folder); the training run's own loss_by_position files are never "
        "replaced",
    )


def _add_compare(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser(
        "compare",
        help="several checkpoints on the same windows: curves, differences with bootstrap bands, a table",
        description=textwrap.fill(
            "Evaluate several checkpoints on exactly the same windows (by default the baseline run's "
            "validation windows) and write compare-<id>.csv, .png and .md into --out: the loss by "
            "position of every model overlaid, each model's difference to the baseline with a bootstrap "
            "confidence band over windows, and a table of parameters, tokens trained, training tokens/s "
            "and perplexity at each length (also printed). Each finished length lands in --out before the "
            "next begins (compare-<id>-partial.* and its scores, removed once the whole comparison is "
            "written): after a failure or Ctrl-C the same command reuses the finished lengths' scores."
        ),
        formatter_class=_HelpFormatter,
    )
    compare.add_argument(
        "models",
        nargs="+",
        metavar="RUN_OR_CKPT",
        help="run folders (their last.safetensors) or checkpoint files",
    )
    compare.add_argument(
        "--seq-len",
        type=_SEQ_LEN,
        nargs="+",
        action="extend",  # `--seq-len 8 --seq-len 16` compares at both lengths, not 16 alone
        default=None,
        metavar="N",
        help="tokens per window, one or more lengths (default: the baseline's training seq_len); the "
        "plot shows the longest, the table the perplexity at each",
    )
    compare.add_argument(
        "--baseline",
        default=None,
        metavar="NAME",
        help="the model the others are compared with: its name (its run folder's), argument or path "
        "(default: the first model)",
    )
    compare.add_argument(
        "--out", default="runs/compare", help="folder for the CSV, PNG and table (default: %(default)s)"
    )
    _add_compare_windows(compare)
    compare.add_argument(
        "--resamples",
        type=_POSITIVE_INT,
        default=1000,
        help="bootstrap resamples of the windows (default: %(default)s)",
    )
    compare.add_argument(
        "--seed", type=_seed, default=0, help="seed of the bootstrap resampling (default: %(default)s)"
    )
    compare.add_argument(
        "--no-ttt",
        action="store_true",
        help=_NO_TTT_HELP.replace("; output files end in _no-ttt", "; models without it are unchanged"),
    )


def _add_compare_windows(compare: argparse.ArgumentParser) -> None:
    """``innerloop compare``'s options choosing the windows (as ``innerloop eval``'s)."""
    compare.add_argument(
        "--data",
        nargs="+",
        action="extend",  # `--data a --data b` reads both, as eval's
        default=[],
        metavar="PATH",
        help="files, directories or globs to evaluate on (default: the baseline run's validation windows)",
    )
    compare.add_argument("--split", default=None, help=_SPLIT_HELP)
    compare.add_argument(
        "--held-out",
        choices=HELD_OUT,
        default="val",
        help=_HELD_OUT_HELP.replace("run's", "baseline run's"),
    )
    compare.add_argument(
        "--batch-size",
        type=_BATCH_SIZE,
        default=None,
        help="windows per batch (default: the baseline run's data.batch_size on its own windows; 16 on --data "
        "files or of a baseline whose run is unknown)",
    )
    compare.add_argument(
        "--batches",
        type=_BATCHES,
        default=None,
        help="number of batches of --batch-size windows (default: as many windows as the baseline run's "
        "validation reads; 128 windows from --data files or of a baseline whose run is unknown)",
    )


def _add_params(commands: argparse._SubParsersAction, presets: Sequence[str]) -> None:
    params = commands.add_parser(
        "params",
        help="parameter counts of a config's model; --budget sizes it to a number of parameters",
        description=textwrap.fill(
            "Print the parameter count of the model a preset or YAML config (with overrides) describes: "
            "total, embedding, each block's mixer and the other parts. With --budget, find the "
            "--adjust width that brings it closest to that many parameters and print the override to use."
        ),
        formatter_class=_HelpFormatter,
    )
    params.add_argument(
        "--config",
        default=DEFAULT_PRESET,
        metavar="PRESET_OR_FILE",
        help=f"a packaged preset ({', '.join(presets)}) or a YAML file (default: %(default)s)",
    )
    params.add_argument(
        "--budget",
        type=_POSITIVE_INT,
        default=None,
        help="a number of parameters to size the model to (default: none, only count)",
    )
    params.add_argument(
        "--adjust",
        choices=["intermediate_size", "hidden_size"],
        default="intermediate_size",
        help="the width --budget changes (choices: %(choices)s; default: %(default)s)",
    )
    params.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. model.mixer=swa (default: none, the config as it is)",
    )


def _add_generate(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser(
        "generate",
        help="sample text through the recurrent state",
        description="Sample text from a checkpoint, one token at a time through the recurrent state (a token is a byte for a byte-level model, a tokenizer's token otherwise). A bf16-true or 16-true run's weights run upcast to float32, as a note on stderr says.",
        formatter_class=_HelpFormatter,
    )
    generate.add_argument("checkpoint", help="a last.safetensors written by `innerloop train`")
    generate.add_argument(
        "--prompt",
        default="def ",
        help="text to start from: any bytes for a byte-level model, UTF-8 text for a model with a Hugging Face "
        "tokenizer (default: %(default)r)",
    )
    generate.add_argument(
        "--tokens",
        type=_number(int, 0),
        default=200,
        help="tokens to generate: bytes for a byte-level model (default: %(default)s)",
    )
    generate.add_argument(
        "--temperature",
        type=_number(float, 0),
        default=0.8,
        help="sampling temperature; 0 is greedy (default: %(default)s)",
    )
    generate.add_argument(
        "--top-k",
        type=_POSITIVE_INT,
        default=None,
        help="sample among the k most likely tokens (default: no limit, sample among all)",
    )
    generate.add_argument(
        "--top-p",
        type=_number(float, 0, high=1),
        default=None,
        help="then among the fewest most likely tokens whose probabilities add up to p or more "
        "(nucleus sampling, a number in [0, 1]; default: no cut)",
    )
    generate.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of the sampling generator (default: %(default)s)",
    )
    generate.add_argument(
        "--ignore-eos",
        action="store_true",
        help="go on past the tokenizer's end-of-text token (default: stop there, as a Hugging Face "
        "export's generate does; a byte-level model has none)",
    )


def _quiet_lightning() -> None:
    """Keep Lightning's progress bar and warnings, drop its start-up chatter and a deprecation warning
    it raises itself with this torch (``LeafSpec``)."""
    import logging
    import warnings

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def _train(args: argparse.Namespace) -> int:
    from innerloop.config.trainer_args import is_launched_worker

    worker = is_launched_worker()
    with warnings.catch_warnings():
        if worker:  # another rank's copy of this command: rank 0 prints each warning once
            warnings.simplefilter("ignore")
        with command_line_options(TRAIN_OPTIONS):  # its errors name --resume and --overwrite
            return _train_command(args, worker)


def _train_command(args: argparse.Namespace, worker: bool) -> int:
    from innerloop.config.load import check_resume_or_overwrite, load_config

    check_resume_or_overwrite(args.resume, args.overwrite)  # before anything says it resumes
    if args.resume:
        run, cfg = _resume_config(args.config, args.overrides)
    else:  # before importing Lightning: errors come fast
        with command_line_options(CONFIG_OPTION):
            run, cfg = load_config(args.config or DEFAULT_PRESET, args.overrides)
        _refuse_config_inside_out_dir(args.config, run.out_dir)
    from innerloop.train.interrupt import TrainingInterrupted
    from innerloop.train.module import TrainingDivergedError
    from innerloop.train.run import train

    _quiet_lightning()
    if args.resume and not worker:
        print(f"resuming the run in {run.out_dir} from its last checkpoint", flush=True)
    try:
        result = train(run, cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingDivergedError as err:
        print(f"innerloop train: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        if not worker:  # rank 0 says where the run stopped, once
            print(f"innerloop train: {err}", file=sys.stderr)
        return err.exit_code  # the shell's code for a process ended by that signal: 130 Ctrl-C, 143 SIGTERM
    if worker:  # another rank's copy of this command: rank 0 prints the summary once
        return 0
    m = result.metrics
    unit = "byte" if run.data.tokenizer == "bytes" and run.data.name != "recall" else "token"
    print(
        f"validation perplexity: {m['val_ppl']:.3f}  (loss {m['val_loss']:.4f} nats/{unit}, accuracy {m['val_acc']:.3f})"
    )
    print(f"checkpoint:       {result.checkpoint}")
    print(f"config:           {result.config}")
    print(f"loss by position: {result.plot} ({result.csv})")
    return 0


def _resume_config(config: str | None, overrides: Sequence[str]) -> tuple[Any, Any]:
    """The config of ``innerloop train --resume``: the run's saved config.yaml with ``overrides``,
    checked as a whole (not the preset's values). out_dir comes from the overrides, else from ``config``
    (the preset or file; ``tiny`` when None). Where ``config`` sets other values than the run's, a
    warning names them: the run continues from its own config, and those values are not used (a
    preset named again to resume, ``--config tiny --resume``, is the usual case)."""
    from pathlib import Path

    from innerloop.config.load import config_differences, load_config, read_out_dir
    from innerloop.train.run_dir import settle_interrupted_overwrite

    with command_line_options(CONFIG_OPTION):
        out_dir = read_out_dir(config or DEFAULT_PRESET, overrides)
    settle_interrupted_overwrite(out_dir)  # a killed --overwrite: read the config of the run it left
    saved = Path(out_dir) / "config.yaml"
    if Path(out_dir).is_file():
        raise ConfigError(
            f"--resume: out_dir={out_dir!r} is a file, not a run's folder; give the run's out_dir"
        )
    if saved.exists() and not saved.is_file():
        raise ConfigError(
            f"--resume: {str(saved)!r} is a folder, not a run's config file; is out_dir={out_dir!r} a run?"
        )
    if not saved.is_file():
        _refuse_a_checkpoint_without_its_config(out_dir, "no saved config at")
        raise ConfigError(f"--resume: no saved config at {str(saved)!r}; is out_dir={out_dir!r} a run?")
    if _holds_no_settings(saved):
        _refuse_a_checkpoint_without_its_config(out_dir, "an empty config at")
    try:
        with command_line_options({PRESET_OR_FILE: "--resume"}):  # the run's saved config.yaml
            run, cfg = load_config(str(saved), overrides, out_dir=out_dir)
    except ConfigError as err:  # a plugin no longer installed: the run's checkpoint says where it came from
        from innerloop.train.run import with_missing_plugins_named

        raise with_missing_plugins_named(err, out_dir) from None
    with command_line_options(CONFIG_OPTION):
        differences = config_differences(config, overrides, run) if config is not None else []
    if differences:
        print(
            f"innerloop train: warning: --resume continues the run in {out_dir!r} from its saved config.yaml "
            f"(with the overrides); --config {config!r} differs from it in {', '.join(differences)}, which "
            "are not used: give changes as overrides (optim.*, trainer.* and model.ttt.kernel may change, e.g. "
            "trainer.max_steps=...)",
            file=sys.stderr,
        )
    return run, cfg


def _holds_no_settings(path: Any) -> bool:
    """Whether the YAML file ``path`` holds nothing (empty, only comments or null), as a file cut short or
    emptied does; a file that cannot be read or parsed is for the config loader to name."""
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) is None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False


def _refuse_a_checkpoint_without_its_config(out_dir: str, what: str) -> None:
    """:class:`ConfigError` for ``--resume`` where ``out_dir`` holds a run's checkpoint but ``what`` (no
    config, an empty one) in place of its config.yaml: the run's settings are read from that file, which
    the run wrote when it started (the checkpoint records the model, data and optimizer, not the trainer);
    nothing when there is no checkpoint either (then it is not a run)."""
    from pathlib import Path

    from innerloop.train.run_dir import CHECKPOINT_FILE, PENDING_CHECKPOINT

    checkpoints = [Path(out_dir) / name for name in (CHECKPOINT_FILE, PENDING_CHECKPOINT)]
    found = next((str(c) for c in checkpoints if c.is_file()), None)
    if found is None:
        return
    raise ConfigError(
        f"--resume: {what} {str(Path(out_dir) / 'config.yaml')!r}, beside the run's checkpoint {found!r}: a resume "
        "reads the run's settings from the config.yaml the run wrote when it started (the checkpoint records "
        "its model, data and optimizer, not all of them); put that file back (or a config with the same "
        "settings), then resume"
    )


def _refuse_config_inside_out_dir(config: str | None, out_dir: str) -> None:
    """A new run writes ``<out_dir>/config.yaml``: the file given as ``--config`` must not be that one
    (``--overwrite`` would replace the user's own file, comments and all)."""
    from pathlib import Path

    if config is None or not Path(config).is_file():
        return  # a preset's name, or none
    target = Path(out_dir) / "config.yaml"
    if target.is_file() and Path(config).resolve() == target.resolve():
        raise ConfigError(
            f"--config {config!r} is out_dir's config.yaml, which a new run into out_dir={out_dir!r} "
            "replaces: pass --resume to continue the run it belongs to, or keep the config outside "
            "out_dir (or set another out_dir) to start a new run from it"
        )


def _check_checkpoint(path: str) -> None:
    """A missing checkpoint is reported before Lightning is imported (seconds)."""
    from innerloop.config.load import checkpoint_path_problem

    with command_line_options(RESUME_OPTION):  # a run to continue: the command, not the Python call
        problem = checkpoint_path_problem(path)
    if problem is not None:
        raise ConfigError(problem)


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from innerloop.config.load import check_output_dir

    _check_checkpoint(args.checkpoint)
    if args.data:  # text, which a checkpoint that records no tokenizer cannot read
        _refuse_text_without_tokenizer(args.checkpoint)
    from innerloop.train.run import evaluate, scored_count

    _check_data_patterns(args.data)
    out = Path(args.out) if args.out is not None else Path(args.checkpoint).parent
    check_output_dir(args.out if args.out is not None else out, "--out")  # --out '' is refused, not '.'
    default = None if args.out is not None else "the checkpoint's folder"
    _check_out_outside_the_data(out, [args.checkpoint], args.data, default)
    _quiet_lightning()
    from innerloop.train.interrupt import TrainingInterrupted

    _note_the_dtype("eval", args.checkpoint)
    try:
        with command_line_options(EVAL_AND_COMPARE_OPTIONS):  # its errors name the options typed
            metrics, csv_path, png = evaluate(
                args.checkpoint,
                args.data,
                args.seq_len,
                args.batch_size,
                args.batches,
                out_dir=out,
                no_ttt=args.no_ttt,
                split=args.split,
                held_out=args.held_out,
            )
    except TrainingInterrupted as err:  # Ctrl-C or SIGTERM during the evaluation
        print(f"innerloop eval: {err}", file=sys.stderr)
        return err.exit_code  # 130, 143: the shell's status for a process ended by that signal
    print(f"perplexity: {metrics['val_ppl']:.3f}  (loss {metrics['val_loss']:.4f} nats/{_token_unit(args.checkpoint, args.data)}, "
          f"{scored_count(metrics)})")  # fmt: skip
    print(f"loss by position: {png} ({csv_path})")
    return 0


def _check_data_patterns(patterns: Sequence[str]) -> None:
    """Each ``--data`` entry (eval's, compare's) names files of text: an empty one, one that matches no
    file, and one that reads a checkpoint or is a run folder (``compare A --data code.py B``, with B meant
    as a model: :func:`~innerloop.data.text.resolve_files` refuses it for every caller) are errors naming
    ``--data`` (not the library's ``data.paths``)."""
    from innerloop.data.text import DataError
    from innerloop.train.data import resolve_files

    for pattern in patterns:
        if not pattern.strip():
            raise ConfigError(
                "--data '' is empty (it would read the whole current directory); give files, directories or globs"
            )
        try:
            resolve_files([pattern], option="--data")
        except DataError as err:
            raise ConfigError(str(err)) from None


def _check_out_outside_the_data(
    out: os.PathLike, models: Sequence[str], data: Sequence[str], default: str | None = None
) -> None:
    """``--out`` outside what the evaluation reads: the ``--data`` entries, else each model's run's
    ``data.paths`` (its config.yaml; one that cannot be read is left to the evaluation to report).
    ``default``: what the folder is when ``--out`` was not given (the message says so)."""
    from pathlib import Path

    from innerloop.config.load import check_output_outside_data

    option, fix = "--out", "give an output folder outside the data"
    if default is not None:
        option = f"the default --out ({default})"
        fix = "give --out DIR to write the results into another folder, outside the data"
    if data:
        check_output_outside_data(out, data, option, "--data", fix)
        return
    for model in models:
        checkpoint = Path(model) / "last.safetensors" if Path(model).is_dir() else Path(model)
        for paths, origin in _data_paths_of_the_run(checkpoint):
            check_output_outside_data(out, paths, option, origin, fix)


def _data_paths_of_the_run(checkpoint: Path) -> list[tuple[list[str], str]]:
    """The ``data.paths`` an evaluation of ``checkpoint`` may read, each with where it was read: its
    config.yaml's, and those the checkpoint records (:data:`~innerloop.train.run.RUN_DATA_KEY`, read
    when no config.yaml is beside it or it is another run's); none of a recall run."""
    from innerloop.checkpoints import recorded_entry
    from innerloop.train.run import RUN_DATA_KEY, read_run_config, run_config_path

    found: list[tuple[list[str], str]] = []
    saved = run_config_path(checkpoint)
    try:
        run = read_run_config(saved) if saved is not None else None
    except (ConfigError, OSError):
        run = None
    if run is not None and run.data.name != "recall":
        found.append((run.data.paths, f"the data.paths of {str(saved)!r}"))
    record = recorded_entry(checkpoint, RUN_DATA_KEY)
    if isinstance(record, dict) and record.get("data.name") != "recall":
        paths = record.get("data.paths")
        if isinstance(paths, list) and all(isinstance(p, str) for p in paths):
            found.append((paths, f"the data.paths {str(checkpoint)!r} records"))
    return found


def _refuse_text_without_tokenizer(checkpoint: str) -> None:
    """Raise the one-line :class:`~innerloop.data.tokenizer.TokenizerError` of a checkpoint that records
    no tokenizer (``innerloop convert`` without ``--tokenizer``), before Lightning is imported (seconds):
    text (``--data``) cannot become its token ids."""
    from innerloop.checkpoints import checkpoint_tokenizer
    from innerloop.data.tokenizer import UnknownTokenizer

    tokenizer = checkpoint_tokenizer(checkpoint)
    if isinstance(tokenizer, UnknownTokenizer):
        tokenizer.encode("")  # raises, naming the checkpoint and how to record a tokenizer


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from innerloop.config.load import check_output_dir
    from innerloop.train.compare import LengthProgress, compare, format_table, windows_line, write_comparison

    out = Path(args.out)
    check_output_dir(args.out, "--out")  # --out '' is refused, not read as the current directory
    _check_data_patterns(args.data)
    _check_out_outside_the_data(out, args.models, args.data)
    _quiet_lightning()
    progress = LengthProgress(out)  # each finished length on disk before the next begins
    try:
        with command_line_options(EVAL_AND_COMPARE_OPTIONS):  # its errors name the options typed
            comparison = compare(
                args.models, args.seq_len, args.baseline, args.data, args.batch_size, args.batches,
                no_ttt=args.no_ttt, resamples=args.resamples, seed=args.seed, split=args.split,
                held_out=args.held_out, progress=progress,
            )  # fmt: skip
        print(windows_line(comparison))
        print(format_table(comparison), end="", flush=True)  # before the files: a failed write keeps them
        csv_path, png, table = write_comparison(comparison, out)
    except BaseException:  # an error, Ctrl-C, SIGTERM: say where the finished lengths are
        if progress.where() is not None:
            print(f"innerloop compare: {progress.where()}", file=sys.stderr, flush=True)
        raise
    progress.finish(comparison)  # the lengths' files along the way: the whole comparison holds them
    print(f"curves and differences: {png} ({csv_path}); table: {table}")
    return 0


_SEARCH_STARTS = {
    # num_heads followed by a 0 (omegaconf joins the text), i.e. 10 * num_heads: heads of width 10,
    # an even width as RoPE needs, whatever num_heads is
    "hidden_size": "${model.num_heads}0",
    "intermediate_size": "1",
}
"""A value of each ``params --adjust`` width that the config's other values always allow: where the
config's own value is invalid, the search starts there (the result does not depend on the start)."""


def _params_model(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The run config ``params`` counts, and None; with ``--budget``, where only the ``--adjust`` width
    makes the config invalid (``hidden_size`` 64 with ``model.num_heads=3``), the config with that
    width at :data:`_SEARCH_STARTS` instead, and why the given one is invalid (the search replaces it)."""
    from innerloop.config.load import load_config

    with command_line_options(CONFIG_OPTION):
        try:
            return load_config(args.config, args.overrides, model_only=True)[0], None  # data, out_dir aside
        except ConfigError as err:
            if args.budget is None:
                raise
            searched = f"model.{args.adjust}"
            others = [item for item in args.overrides if item.partition("=")[0].strip() != searched]
            try:  # the width's own overrides dropped: the search replaces them (and a key is given once)
                search_start = f"{searched}={_SEARCH_STARTS[args.adjust]}"
                run, _ = load_config(args.config, [*others, search_start], model_only=True)
            except ConfigError:
                raise err from None  # not (only) the width: the error as given
            return run, str(err)


def _params(args: argparse.Namespace) -> int:
    from innerloop.models.params import count_config_parameters, size_to_budget

    run, invalid = _params_model(args)
    if invalid is None:
        print(f"{args.config}: {count_config_parameters(run.model).describe()}")
    else:
        print(
            f"{args.config}: {invalid}; --adjust {args.adjust} replaces model.{args.adjust}, searching the "
            "widths the other values allow"
        )
    if args.budget is not None:
        sized = size_to_budget(run.model, args.budget, args.adjust)
        total = count_config_parameters(sized).total
        print(
            f"model.{args.adjust}={getattr(sized, args.adjust)}: {total:,} parameters "
            f"({100 * (total - args.budget) / args.budget:+.1f}% of the budget {args.budget:,})"
        )
        _say_if_out_of_reach(run.model, sized, total, args.budget, args.adjust)
    return 0


def _say_if_out_of_reach(model: Any, sized: Any, total: int, budget: int, adjust: str) -> None:
    """A line under ``innerloop params --budget``'s result when it is more than 5% off because ``adjust``
    is at its smallest (or largest) value: the budget is out of its reach, and another field is not."""
    from innerloop.models.params import SIZABLE_FIELDS, same_size, size_to_budget

    if same_size(total, budget):  # what innerloop compare calls the same size (5% of the smaller count)
        return
    end = "smallest" if total > budget else "largest"
    if size_to_budget(model, 1 if total > budget else 10**15, adjust) != sized:
        return
    other = next(field for field in SIZABLE_FIELDS if field != adjust)
    print(
        f"model.{adjust}={getattr(sized, adjust)} is its {end} value: the budget {budget:,} is out of reach by "
        f"model.{adjust} alone; try --adjust {other}, or {'fewer' if total > budget else 'more'} model.num_layers"
    )


def _token_unit(checkpoint: str, data: Sequence[str] = ()) -> str:
    """``byte`` for text read by the byte tokenizer, else ``token`` (a BPE tokenizer's, or the recall
    task's symbols, which a recall run's evaluation reads without ``--data``)."""

    from innerloop.checkpoints import checkpoint_tokenizer, recorded_entry
    from innerloop.data.tokenizer import ByteTokenizer
    from innerloop.train.run import RUN_DATA_KEY, read_run_config, run_config_path

    recorded = None if data else recorded_entry(checkpoint, RUN_DATA_KEY)
    saved = None if data else run_config_path(checkpoint)
    if isinstance(recorded, dict):  # eval read the data its run recorded (alone, or beside another run's)
        if recorded.get("data.name") == "recall":
            return "token"
    elif saved is not None:
        try:
            if read_run_config(saved).data.name == "recall":
                return "token"
        except ConfigError:
            pass  # the evaluation has read it already, or reported it
    return "byte" if isinstance(checkpoint_tokenizer(checkpoint), ByteTokenizer) else "token"


def _note_the_dtype(command: str, checkpoint: str) -> None:
    """Say on stderr which dtype ``innerloop <command>`` runs the checkpoint in, where it is not the one
    its weights are stored in (a ``bf16-true`` run's, upcast to float32)."""
    from innerloop.checkpoints import dtype_note

    note = dtype_note(checkpoint)
    if note is not None:
        print(f"innerloop {command}: note: {note}", file=sys.stderr)


def _generate(args: argparse.Namespace) -> int:
    _check_checkpoint(args.checkpoint)
    from innerloop.checkpoints import checkpoint_tokenizer, load_model
    from innerloop.data.tokenizer import ByteTokenizer

    model = load_model(args.checkpoint)  # first: its errors say what is wrong with the file
    _note_the_dtype("generate", args.checkpoint)
    tokenizer = checkpoint_tokenizer(args.checkpoint)
    if not isinstance(tokenizer, ByteTokenizer):
        return _generate_tokens(args, model, tokenizer)
    return _generate_bytes(args, model)


def _generate_bytes(args: argparse.Namespace, model: CausalLM | E2ELM) -> int:
    """``innerloop generate`` of a byte-level model: the prompt's bytes in, bytes out."""
    import torch

    from innerloop.models import generate

    # The model reads bytes: take the prompt's own bytes (os.fsencode undoes the surrogate escapes
    # Python uses for command-line bytes that are not valid UTF-8).
    prompt = os.fsencode(args.prompt)
    if not prompt:
        raise ConfigError("--prompt must not be empty (the model needs at least one byte to start from)")
    vocab_size = model.config.vocab_size
    if max(prompt) >= vocab_size:
        raise ConfigError(
            f"--prompt has byte {max(prompt)}, but the model's vocabulary has {vocab_size} tokens "
            f"(0..{vocab_size - 1}): give a prompt of bytes below {vocab_size}"
        )
    prompt_ids = torch.tensor([list(prompt)], dtype=torch.long)
    generator = torch.Generator().manual_seed(args.seed)
    # Bytes are decoded as they come (a character may span several tokens); invalid UTF-8 shows as �.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(decoder.decode(prompt))
    sampled = generate(
        model, prompt_ids, args.tokens, args.temperature, args.top_k, generator, top_p=args.top_p
    )
    with _written_at_exit(lambda: decoder.decode(b"", final=True) + "\n"):  # an incomplete character too
        for token, _state in sampled:
            token_id = int(token[0])  # a model with more than 256 tokens may sample one that is no byte
            sys.stdout.write(decoder.decode(bytes([token_id])) if token_id < 256 else f"[token {token_id}]")
            sys.stdout.flush()
    return 0


def _text_prompt(prompt: str, tokenizer: Tokenizer) -> str:
    """``--prompt`` as text for a tokenizer that reads UTF-8 text (a Hugging Face one), not bytes:
    command-line bytes that are not UTF-8 reach Python as surrogate escapes, which it cannot encode."""
    data = os.fsencode(prompt)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"--prompt {data[:40]!r} is not valid UTF-8 (byte 0x{data[err.start]:02x} at {err.start}), but the "
            f"model's tokenizer ({tokenizer.describe()}) reads UTF-8 text: give a UTF-8 prompt (a prompt of any "
            "bytes is read only by a byte-level model)"
        ) from None


def _byte_fallback_ids(tokenizer: Tokenizer) -> dict[int, int]:
    """The ids of ``tokenizer`` that stand for one byte in a byte-fallback run (sentencepiece's
    ``<0x00>``..``<0xFF>``, where its decoder has ``ByteFallback``), each with its byte: empty for any
    other tokenizer."""
    from innerloop.data.tokenizer import HFTokenizer

    if not isinstance(tokenizer, HFTokenizer) or '"ByteFallback"' not in tokenizer.tokenizer_json:
        return {}
    vocabulary = tokenizer.backend.get_vocab(with_added_tokens=False)
    return {
        i: int(token[3:5], 16)
        for token, i in vocabulary.items()
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token)
    }


class _TextWindow:
    """The text of ids decoded as they come, over a window of a few ids: the last ids printed (context for
    the tokenizer, e.g. a leading space) and those not printed yet. Decoding every id so far at each token
    took memory and time per token growing with the text (the prompt's ids included).

    The text is printed up to the last id whose text is settled: it does not end in an incomplete
    character (U+FFFD), or :attr:`SETTLED_AFTER` ids came after it and left it unchanged (an invalid byte,
    printed as U+FFFD as the byte path prints it: a UTF-8 character has at most 4 bytes, so no later id
    can complete it), and it does not end inside a run of byte-fallback ids (a sentencepiece decoder
    decodes a run together: one invalid byte makes every byte of it U+FFFD, its ASCII ones too). Only the
    ids after it are held back; a text that later ids keep changing is printed once :attr:`HELD` ids are
    held. A byte-fallback run is held until it ends, however long (any later byte of it may be invalid):
    once it is :attr:`LONG_BYTE_RUN` ids long its bytes are checked as they come, not decoded at each id,
    and from its first invalid byte on its text is settled (one U+FFFD a byte) and printed as it comes."""

    CONTEXT = 4
    HELD = 4
    SETTLED_AFTER = 3
    LONG_BYTE_RUN = 64

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_of = _byte_fallback_ids(tokenizer)
        self._ids: list[int] = []
        self._printed = 0  # the ids of the window whose text has been returned
        self._before_break = 0  # the ids of the window before a break (see flush)
        self._forget_run()

    def add(self, ids: Sequence[int]) -> str:
        """The text that ``ids`` add to the text so far, once it is settled ("" while held back)."""
        was_long = self._run_check is not None
        for token_id in ids:
            self._ids.append(token_id)
            self._follow_run(token_id)
        if self._run >= self.LONG_BYTE_RUN and (was_long or self._run_invalid):
            return self._long_run_text()
        return self._new_text(final=False)  # once as a run becomes long: the text before it

    def flush(self) -> str:
        """The text not returned yet, complete or not: at the end of the text, or at a break in it (an id
        the tokenizer has no text for, printed apart). The ids printed stay as context for the text after
        a break (a sentencepiece piece's leading space is then kept), unless it would change their text
        (a character completed, or a byte-fallback run extended, across the break): then it is read alone."""
        text = self._new_text(final=True)
        self._before_break = len(self._ids)
        self._forget_run()
        return text

    def _forget_run(self) -> None:
        self._run = 0  # the byte-fallback ids the ids added end in (counted from the last break)
        self._run_check: codecs.IncrementalDecoder | None = None  # a long run's bytes so far, strict UTF-8
        self._run_invalid = False  # the run has a byte no later byte makes valid UTF-8
        self._run_printed = False  # the run's text is settled (all U+FFFD) and printed so far

    def _follow_run(self, token_id: int) -> None:
        """Counts the byte-fallback run ``token_id`` ends or extends; checks a long run's bytes."""
        if token_id not in self._byte_of:
            self._forget_run()
            return
        self._run += 1
        if self._run_invalid or self._run < self.LONG_BYTE_RUN:
            return
        if self._run_check is None:  # the run became long: check its bytes so far
            self._run_check = codecs.getincrementaldecoder("utf-8")(errors="strict")
            new_ids = self._ids[-min(self._run, len(self._ids)) :]
        else:
            new_ids = [token_id]
        try:
            self._run_check.decode(bytes(self._byte_of[i] for i in new_ids))
        except UnicodeDecodeError:
            self._run_invalid = True

    def _long_run_text(self) -> str:
        """The text the ids add while they end in a long byte-fallback run: none while its bytes are valid
        so far (a later byte may still be invalid), one U+FFFD a byte once one is invalid."""
        if not self._run_invalid:
            return ""
        if self._run_printed:  # all ids after the printed ones are bytes of the run
            text = "\ufffd" * (len(self._ids) - self._printed)
            self._keep_context(max(0, len(self._ids) - self.CONTEXT))
            return text
        before = self._tokenizer.decode(self._ids[: self._printed])
        after = self._tokenizer.decode(self._ids)
        if not (after.startswith(before) and after.endswith("\ufffd" * self._run)):
            return self._new_text(final=False)  # a decoder that reads the run otherwise: held to its end
        self._run_printed = True
        self._keep_context(max(0, len(self._ids) - self.CONTEXT))
        return after[len(before) :]

    def _keep_context(self, start: int) -> None:
        """Keeps the ids from ``start`` on, all printed: the context for the text after them."""
        self._ids = self._ids[start:]
        self._printed = len(self._ids)
        self._before_break = max(0, self._before_break - start)

    def _new_text(self, final: bool) -> str:
        before = self._tokenizer.decode(self._ids[: self._printed])
        after = self._tokenizer.decode(self._ids)
        if self._before_break and not after.startswith(before):  # the text before a break would change
            self._ids, self._printed = self._ids[self._before_break :], self._printed - self._before_break
            self._before_break = 0
            before, after = "", self._tokenizer.decode(self._ids)
        end, text = self._settled(before, after)
        if end is None and not final and self._held_too_long():
            end, text = self._longest_whole(before)
        if end is None and (final or self._held_too_long()):
            end, text = len(self._ids), after[len(os.path.commonprefix([before, after])) :]
        if end is None:
            return ""
        start = self._context_start(end, before + text)
        self._ids, self._printed = self._ids[start:], end - start
        self._before_break = max(0, self._before_break - start)
        return text

    def _held_too_long(self) -> bool:
        """Whether the ids held are :attr:`HELD` or more and end in no byte-fallback run (one is held until
        it ends: any later byte of it may make all of it U+FFFD)."""
        return len(self._ids) - self._printed >= self.HELD and self._ids[-1] not in self._byte_of

    def _longest_whole(self, before: str) -> tuple[int | None, str]:
        """Where a window held too long may be cut: the last id whose text extends ``before`` with no
        U+FFFD, and the text it adds (None, "": none)."""
        for end in range(len(self._ids), self._printed, -1):
            text = self._tokenizer.decode(self._ids[:end])
            if text.startswith(before) and "\ufffd" not in text[len(before) :]:
                return end, text[len(before) :]
        return None, ""

    def _context_start(self, end: int, printed: str) -> int:
        """Where the context kept of the printed ids ``[:end]`` (whose text is ``printed``) starts: at most
        :attr:`CONTEXT` ids, never inside a character (its text alone is the end of ``printed``; a byte
        decoded away from the bytes before it is U+FFFD, and a byte-fallback decoder then reads the
        whole run of bytes as invalid)."""
        for start in range(max(0, end - self.CONTEXT), end):
            if printed.endswith(self._tokenizer.decode(self._ids[start:end])):
                return start
        return max(0, end - self.CONTEXT)  # none alone ends the text (e.g. WordPiece's '##' pieces): all

    def _settled(self, before: str, after: str) -> tuple[int | None, str]:
        """The last id whose text is settled and extends ``before``, and the text it adds (None, "": none)."""
        for end in range(len(self._ids), self._printed, -1):
            if self._inside_a_byte_run(end):
                continue
            text = after if end == len(self._ids) else self._tokenizer.decode(self._ids[:end])
            complete = not text.endswith("\ufffd") or len(self._ids) - end >= self.SETTLED_AFTER
            if complete and text.startswith(before) and after.startswith(text):
                return end, text[len(before) :]
        return None, ""

    def _inside_a_byte_run(self, end: int) -> bool:
        """Whether ids ``[:end]`` end in a byte-fallback run that may go on (the next id, or a later one
        while ``end`` is the last, is a byte too), whose text a later byte may change."""
        ids = self._ids
        return ids[end - 1] in self._byte_of and (end == len(ids) or ids[end] in self._byte_of)


def _generate_tokens(args: argparse.Namespace, model: CausalLM | E2ELM, tokenizer: Tokenizer) -> int:
    """``innerloop generate`` of a model trained with a Hugging Face tokenizer: the prompt encoded by
    it; the text printed as it grows (held back while it ends in an incomplete character). An id past the
    tokenizer's vocabulary (a model whose ``model.vocab_size`` was set larger) is printed as
    ``[token N]``, as the byte-level path prints an id that is no byte. The text held back is printed
    when generation stops early too (Ctrl-C, SIGTERM, an error)."""
    import torch

    from innerloop.models import generate

    prompt = tokenizer.encode(_text_prompt(args.prompt, tokenizer))
    if not prompt:
        raise ConfigError("--prompt must not be empty (the model needs at least one token to start from)")
    if max(prompt) >= model.config.vocab_size:
        raise ConfigError(
            f"--prompt has token {max(prompt)}, but the model's vocabulary has {model.config.vocab_size} tokens"
        )
    generator = torch.Generator().manual_seed(args.seed)
    prompt_ids = torch.tensor([prompt], dtype=torch.long)
    eos = tokenizer.eos_id
    if args.ignore_eos or eos is None or eos >= model.config.vocab_size:  # none the model can sample
        eos = None
    sampled = generate(
        model,
        prompt_ids,
        args.tokens,
        args.temperature,
        args.top_k,
        generator,
        eos_token_id=eos,
        top_p=args.top_p,
    )
    text = _TextWindow(tokenizer)
    with _written_at_exit(lambda: text.flush() + "\n"):
        sys.stdout.write(text.add(prompt))
        for token, _state in sampled:
            token_id = int(token[0])
            if token_id == eos:
                break  # the end of the text: not printed
            if token_id >= tokenizer.vocab_size:  # a model.vocab_size set above the tokenizer's (padded)
                sys.stdout.write(text.flush() + f"[token {token_id}]")  # an id the tokenizer has no text for
                continue
            sys.stdout.write(text.add([token_id]))
            sys.stdout.flush()
    return 0


@contextlib.contextmanager
def _written_at_exit(rest: Callable[[], str]) -> Iterator[None]:
    """Write ``rest()`` to stdout when the block ends: at its end, and at Ctrl-C, SIGTERM or an error in
    it, so that text held back is not lost (not when stdout's reader went away: nothing can be written)."""
    try:
        yield
    except BrokenPipeError:
        raise
    except BaseException:
        sys.stdout.write(rest())
        sys.stdout.flush()
        raise
    sys.stdout.write(rest())


def _add_tokenizer(commands: argparse._SubParsersAction) -> None:
    tokenizer = commands.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer (data.tokenizer)",
        description="Tokenizers for data.tokenizer.",
        formatter_class=_HelpFormatter,
    )
    actions = tokenizer.add_subparsers(dest="action", metavar="ACTION", required=True, help="what to do")
    train = actions.add_parser(
        "train",
        help="train a byte-level BPE on text files",
        description=textwrap.fill(
            "Train a byte-level BPE tokenizer with the `tokenizers` library and write OUT/tokenizer.json "
            "and OUT/tokenizer_config.json (each atomically), which data.tokenizer=OUT and "
            "transformers.AutoTokenizer.from_pretrained(OUT) read. Id 0 is <|endoftext|>, placed between "
            "documents; the same files always give the same tokenizer."
        ),
        formatter_class=_HelpFormatter,
    )
    train.add_argument(
        "--vocab-size",
        type=_number(int, MIN_TRAINED_VOCAB, high=MAX_TRAINED_VOCAB),
        required=True,
        help=f"tokens in the vocabulary, {MIN_TRAINED_VOCAB} to {MAX_TRAINED_VOCAB}: the 256 bytes, the "
        "end-of-text token and at least one merge (required)",
    )
    train.add_argument(
        "--out", required=True, metavar="DIR", help="folder to write the tokenizer into (required)"
    )
    train.add_argument(
        "--overwrite", action="store_true", help="replace a tokenizer already in DIR (default: refuse)"
    )
    train.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="text files, directories or globs to train on (default: the training part of the corpus "
        "`innerloop train` uses, the standard library's source without the files it holds out); dataset "
        "files (json/jsonl, parquet, csv, arrow, compressed json/csv too) or a save_to_disk folder are read "
        "as data.name=hf reads them: each record's --text-field",
    )
    train.add_argument(
        "--text-field",
        default=None,
        metavar="FIELD",
        help="the field of dataset files' records that holds the text (data.text_field; default: 'text')",
    )
    train.add_argument(
        "--split",
        default=None,
        help="the split of dataset files to read (data.split; default: the data's own, 'train' for data files)",
    )
    train.add_argument(
        "--raw",
        action="store_true",
        help="read every PATH whole as text, dataset files too (markup and all), as a data.name=text run "
        "reads them (default: dataset files are read as records)",
    )


def _tokenizer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from innerloop.config.load import check_output_dir, check_tokenizer_out_outside_data
    from innerloop.data.text import DataError, resolve_files, split_text_files, stdlib_files
    from innerloop.data.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, train_bpe

    out = Path(args.out)
    check_output_dir(out, "--out")  # first: a file given as --out is not a folder, whatever PATH holds
    check_tokenizer_out_outside_data(out, args.paths, (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE))
    existing = [str(out / name) for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE) if (out / name).exists()]
    folders = [path for path in existing if not Path(path).is_file()]
    if folders:  # --overwrite replaces files; a folder in a file's place is the user's
        raise ConfigError(
            f"--out {str(out)!r} holds {', '.join(map(repr, folders))}, which is a folder, not a file: the "
            "tokenizer is written there; move it, or give another --out"
        )
    if existing and not args.overwrite:  # both files are written: neither is replaced without --overwrite
        raise ConfigError(
            f"{', '.join(map(repr, existing))} {'exists' if len(existing) == 1 else 'exist'}; pass --overwrite "
            "to replace, or another --out"
        )
    try:
        files = resolve_files(args.paths, "PATH") if args.paths else split_text_files(stdlib_files(), 0.1)[0]
    except DataError as err:  # its errors and warnings name the PATH arguments
        raise ConfigError(str(err)) from None
    records = _dataset_records(args, files)
    texts = records if records is not None else (_read_text_file(f) for f in files)
    try:
        tokenizer = train_bpe(texts, args.vocab_size, files=files)
    except DataError as err:  # a dataset's record read on the way; it names the training options
        raise ConfigError(_as_tokenizer_options(str(err))) from None
    written = tokenizer.save_pretrained(out)
    short = (
        f" (fewer than --vocab-size {args.vocab_size}: the text has no more merges to learn)"
        if tokenizer.vocab_size < args.vocab_size
        else ""
    )
    what = (
        f"the {records.field!r} field of {counted(records.count, 'record')} of {', '.join(args.paths)}"
        if records is not None
        else counted(len(files), "file")
    )
    print(f"trained on {what}: {tokenizer.vocab_size} tokens{short}")
    print(f"tokenizer: {', '.join(str(p) for p in written)}")
    return 0


class _Records:
    """The texts of a dataset's records, counted as they are read (once)."""

    def __init__(self, chunks: Iterator[tuple[int, list[str]]], field: str) -> None:
        self.chunks, self.field, self.count = chunks, field, 0

    def __iter__(self) -> Iterator[str]:
        for _, texts in self.chunks:
            self.count += len(texts)
            yield from texts


def _as_tokenizer_options(message: str) -> str:
    """A :class:`~innerloop.data.text.DataError` of ``innerloop.data.hf``, which names the training
    options, with the names of ``innerloop tokenizer train``'s."""
    for option, ours in (
        ("data.paths=", "PATH "),
        ("data.split=", "--split "),
        ("data.text_field=", "--text-field "),
    ):
        message = message.replace(option, ours)
    return message.replace("data.paths", "PATH").replace("data.name='hf'", "innerloop")


def _dataset_records(args: argparse.Namespace, files: Sequence[Path]) -> _Records | None:
    """The texts of the records of ``tokenizer train``'s PATHs (their ``--text-field``) when they are
    dataset files or a ``save_to_disk`` folder, read as ``data.name=hf`` reads them (a BPE learned from a
    JSON file's bytes would learn its quoting and escapes); None for text files and with ``--raw``.
    :class:`ConfigError` for PATHs that mix the two, record options for text, and what cannot be read."""
    from innerloop.data.hf import data_format, iter_texts, open_hf_dataset, own_split, saved_splits
    from innerloop.data.text import DataError

    try:
        saved = not args.raw and saved_splits(args.paths) is not None
        datasets = [f for f in files if data_format(f) not in (None, "text")]
        others = [f for f in files if data_format(f) in (None, "text")]
        if not saved and (args.raw or not datasets):
            given = [
                f"{option} {value!r}"
                for option, value in (("--split", args.split), ("--text-field", args.text_field))
                if value is not None
            ]
            if given:
                raise ConfigError(
                    f"{' and '.join(given)} name{'' if len(given) > 1 else 's'} records of dataset files, and the "
                    "PATHs are read whole as text"
                    f"{' (--raw)' if args.raw else ''}: leave {'them' if len(given) > 1 else 'it'} out"
                )
            return None
        if not saved and others:
            raise ConfigError(
                f"PATHs mix dataset files ({str(datasets[0])!r}, read as records: their --text-field) and text "
                f"files ({str(others[0])!r}, read whole): give one kind, or --raw to read them all whole as text"
            )
        field = args.text_field if args.text_field is not None else "text"
        split = args.split if args.split is not None else own_split(args.paths)
        streaming = saved or "[" not in split  # data files' slices are cut from an Arrow table
        dataset = open_hf_dataset(args.paths, split, streaming, field)
    except DataError as err:
        raise ConfigError(_as_tokenizer_options(str(err))) from None
    return _Records(iter_texts(dataset, field), field)


def _read_text_file(path: Path) -> str:
    """A training file's text (without a byte-order mark at its start: ``utf8_file_text``);
    :class:`ConfigError` naming it when it is not UTF-8, or is a Parquet or Arrow file of records."""
    from innerloop.data.text import dataset_file_advice, dataset_file_of, file_end
    from innerloop.data.tokenizer import utf8_file_text

    try:
        data = path.read_bytes()
        kind = dataset_file_of(data[:16], file_end(data))  # a Parquet file's columns may be valid UTF-8
        if kind is not None:
            fix = (
                "read its records (their --text-field) as dataset files are read, under its format's suffix "
                "and without --raw, or leave it out of the PATHs"
            )
            raise ConfigError(f"{str(path)!r} {dataset_file_advice(kind, 'PATHs read whole as text', fix)}")
        return utf8_file_text(data)
    except UnicodeDecodeError as err:
        from innerloop.data.text import byte_order_mark, compressed_file_advice, compression_of

        compressed = compression_of(data)
        bom = byte_order_mark(err.object)
        what = f"{bom} text (it starts with a {bom} byte-order mark)" if bom else "not UTF-8 text"
        why = (  # a .txt.gz, or a .jsonl.gz with --raw: its bytes, not its text
            f"; it {compressed_file_advice(compressed, 'PATHs read whole as text', hf=False)}"
            if compressed is not None
            else "; convert it to UTF-8 (e.g. iconv -t utf-8) or leave it out of the PATHs"
        )
        raise ConfigError(f"{str(path)!r} is {what} ({err.reason} at byte {err.start}){why}") from None
    except OSError as err:
        raise ConfigError(f"{str(path)!r} cannot be read: {err.strerror or err}") from None


def _plugins(args: argparse.Namespace) -> int:
    from innerloop.kernels.triton.common import triton_missing
    from innerloop.registry import format_plugin_table

    print(format_plugin_table())
    if triton_missing() is not None:
        print(f"\nthe triton_* kernels are registered but cannot run here: {triton_missing()}")
    return 0


def _add_convert(commands: argparse._SubParsersAction) -> None:
    convert = commands.add_parser(
        "convert",
        help="turn another implementation's saved model into an innerloop checkpoint or a Hugging Face folder",
        description=textwrap.fill(
            "Read a model saved by another implementation and write it as an innerloop checkpoint, "
            "OUT/last.safetensors, that `innerloop generate` and `innerloop eval` read, or with --format hf "
            "as a Hugging Face folder OUT that AutoModelForCausalLM loads (docs/huggingface.md). "
            "ttt-lm-pytorch: a folder written by TTTForCausalLM.save_pretrained of "
            "test-time-training/ttt-lm-pytorch (config.json and model.safetensors); the logits equal the "
            "reference's. ttt-e2e: an official TTT-E2E checkpoint of test-time-training/e2e (CHECKPOINT: "
            ".../checkpoint/<step> or its parent) and its resolved Hydra config (CONFIG, YAML or JSON); "
            "docs/e2e.md says how."
        ),
        formatter_class=_HelpFormatter,
    )
    convert.add_argument(  # a bad value's error names SOURCE_FORMAT, as usage shows it
        "source_format",
        metavar="SOURCE_FORMAT",
        choices=["ttt-lm-pytorch", "ttt-e2e"],
        help="what SRC is (choices: %(choices)s)",
    )
    convert.add_argument(
        "src",
        metavar="SRC",
        help="the saved model: a save_pretrained folder (ttt-lm-pytorch), an orbax checkpoint (ttt-e2e)",
    )
    convert.add_argument(
        "config",
        metavar="CONFIG",
        nargs="?",
        default=None,
        help="ttt-e2e only: the official resolved Hydra config, YAML or JSON (default: none)",
    )
    convert.add_argument(
        "out",
        metavar="OUT",
        help="folder to write last.safetensors into, or the Hugging Face folder (created if absent)",
    )
    convert.add_argument(
        "--overwrite",
        action="store_true",
        default=False,
        help="replace an existing OUT/last.safetensors, or with --format hf an earlier export in OUT "
        "(default: refuse)",
    )
    _add_convert_format(convert)


def _convert(args: argparse.Namespace) -> int:
    """``innerloop convert SOURCE_FORMAT SRC [CONFIG] OUT``: a model of another implementation -> an
    innerloop checkpoint ``OUT/last.safetensors`` or (``--format hf``) a Hugging Face folder ``OUT``."""
    if args.source_format == "ttt-e2e":
        if args.config is None:
            raise ConfigError("ttt-e2e needs CHECKPOINT CONFIG OUT: the resolved Hydra config is missing")
        from innerloop.interop.ttt_e2e import load_model as load_official_model

        def load() -> Any:
            return load_official_model(args.src, args.config)
    else:
        if args.config is not None:
            raise ConfigError(f"{args.source_format} takes SRC OUT, not a CONFIG (got {args.config!r})")
        from innerloop.interop.ttt_lm_pytorch import load_model as load_reference_model

        def load() -> Any:
            return load_reference_model(args.src)

    if args.format == "hf":
        return _convert_to_hugging_face(args, load)
    return _convert_to_checkpoint(args, load)


def _load_converted(args: argparse.Namespace, load: Callable[[], Any]) -> Any:
    """``load()``, its errors as one line naming the source."""
    try:
        return load()
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise ConfigError(f"{args.source_format} model {args.src!r}: {_one_line(err)}") from None


def _describe_converted(args: argparse.Namespace, model: Any) -> str:
    config = model.config
    e2e = (
        f"{config.num_layers - model.num_prefix} with a prime MLP, "
        if hasattr(model, "num_prefix")  # the TTT-E2E model
        else ""
    )
    return (
        f"converted {args.src} ({config.num_layers} layers, {e2e}hidden {config.hidden_size}, "
        f"vocabulary {config.vocab_size}, {model.num_parameters():,} parameters)"
    )


def _convert_to_checkpoint(args: argparse.Namespace, load: Callable[[], Any]) -> int:
    """Write the model ``load()`` reads from ``args.src`` as ``args.out/last.safetensors``, recording the
    tokenizer ``--tokenizer`` names, or without it that the model's tokenizer is unknown (a vocabulary's
    size does not say which it is): then ``generate`` and ``eval`` refuse text, and ``export`` writes no
    tokenizer files."""
    from pathlib import Path

    from innerloop.config.load import check_output_dir
    from innerloop.data.atomic import remove_stale_temporaries_of
    from innerloop.data.tokenizer import UnknownTokenizer, tokenizer_from_source
    from innerloop.train.module import save_model_checkpoint

    check_output_dir(args.out, "OUT")  # a file, or under one, is reported before the model is read
    target = Path(args.out) / "last.safetensors"
    if target.exists() and not target.is_file():
        raise ConfigError(f"{str(target)!r} is not a file (a folder?); remove it, or give another OUT")
    if target.exists() and not args.overwrite:
        raise ConfigError(f"{str(target)!r} exists; pass --overwrite to replace it, or give another OUT")
    if os.path.lexists(Path(args.out) / "config.yaml"):  # even with --overwrite: it is another run's
        raise ConfigError(
            f"OUT {args.out!r} holds a training run (its config.yaml): a converted model there would sit beside "
            "that run's config, logs and checkpoints, and break its --resume; give another OUT"
        )
    tokenizer = tokenizer_from_source(args.tokenizer) if args.tokenizer is not None else UnknownTokenizer()
    model = _load_converted(args, load)
    if args.tokenizer is not None:
        _check_converted_tokenizer(args, tokenizer, model.config.vocab_size)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries_of([target])  # what a killed earlier convert of it left
    path = save_model_checkpoint(model, target, tokenizer.to_state())
    print(_describe_converted(args, model))
    print(f"checkpoint: {path}")
    if args.tokenizer is None:
        print(
            "tokenizer: none recorded (unknown): generate and eval refuse text and export writes no "
            "tokenizer; convert again with --tokenizer to record the model's own"
        )
    else:
        described = tokenizer.describe()
        print(f"tokenizer: {described}" + ("" if described == args.tokenizer else f" ({args.tokenizer})"))
    return 0


def _add_convert_format(convert: argparse.ArgumentParser) -> None:
    convert.add_argument(
        "--format",
        choices=["innerloop", "hf"],
        default="innerloop",
        help="what to write: an innerloop checkpoint OUT/last.safetensors, or hf: a Hugging Face folder OUT "
        "(config.json, model.safetensors, tokenizer; docs/huggingface.md) (default: %(default)s)",
    )
    convert.add_argument(
        "--tokenizer",
        default=None,
        help="the tokenizer the model reads: bytes (innerloop's byte-level one), a tokenizer.json or a "
        "tokenizer folder; recorded in the checkpoint (generate and eval read text with it, export writes "
        "it) or, with --format hf, written into the folder (default: none; the checkpoint records that "
        "the model's tokenizer is unknown, so generate and eval refuse text)",
    )


def _convert_to_hugging_face(args: argparse.Namespace, load: Callable[[], Any]) -> int:
    """Write the model ``load()`` reads from ``args.src`` as a Hugging Face folder ``args.out``."""
    from innerloop.hf.export import ExportError, check_target, export_model

    try:
        with command_line_options({"overwrite": "--overwrite"}):
            check_target(args.out, args.overwrite, "OUT")
    except ExportError as err:
        raise ConfigError(str(err)) from None
    model = _load_converted(args, load)
    # The reference's and the official models are not shipped with their tokenizers, and a vocabulary's
    # size does not say which one it is: the folder gets the one --tokenizer names, else none.
    tokenizer_note = (
        "" if args.tokenizer else " (no tokenizer: pass --tokenizer, or copy the model's own into it)"
    )
    if args.tokenizer is not None:
        from innerloop.data.tokenizer import TokenizerError, tokenizer_from_source

        try:
            tokenizer = tokenizer_from_source(args.tokenizer)
        except TokenizerError:
            tokenizer = None  # the export names what is wrong with it, as before
        if tokenizer is not None:
            _check_converted_tokenizer(args, tokenizer, model.config.vocab_size)
    try:
        special = _converted_special_tokens(args)
        folder = export_model(
            model, args.out, overwrite=args.overwrite, tokenizer=args.tokenizer, special_tokens=special
        )
    except ExportError as err:
        source = args.config if args.source_format == "ttt-e2e" else os.path.join(args.src, "config.json")
        raise _export_error(err, args.tokenizer, source) from None
    print(_describe_converted(args, model))
    print(f"Hugging Face folder: {folder}{tokenizer_note}")
    _print_kept(folder)
    return 0


def _check_converted_tokenizer(args: argparse.Namespace, tokenizer: Any, vocab_size: int) -> None:
    """Refuse a ``--tokenizer`` that cannot be the converted model's: ids past its vocabulary, or a
    bos/eos id of its config that the tokenizer does not have (a Llama-2 tokenizer for a Llama-3-sized
    model); warn where the config's bos/eos id is an ordinary token of it (the TTT-E2E inner loss skips
    the bos id as the start of a document, and generate stops at eos), or where it covers under half
    of the vocabulary."""
    from innerloop.hf.tokenizer import base_id_bound

    bound = base_id_bound(tokenizer)  # one past the largest id, special tokens aside
    if bound > vocab_size:
        raise ConfigError(
            f"--tokenizer {args.tokenizer!r} has ids up to {bound - 1} (special tokens aside) but the "
            f"model's vocabulary has {vocab_size}: give the tokenizer the model was trained with"
        )
    backend = getattr(tokenizer, "backend", None)  # a tokenizers.Tokenizer; the byte one has no specials
    if backend is not None:
        specials = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        size = backend.get_vocab_size(with_added_tokens=True)
        past = sorted(i for i in specials if i >= vocab_size)
        if past:
            warnings.warn(
                f"--tokenizer {args.tokenizer!r} has special tokens past the model's vocabulary of {vocab_size} "
                f"({', '.join(f'{backend.id_to_token(i)!r} = {i}' for i in past)}): the model never reads or "
                "writes them, and an export's tokenizer names them (its end-of-text among them, perhaps) where "
                "the model's config names its own",
                UserWarning,
                stacklevel=2,
            )
        listed = [(n, i) for n, ids in _converted_special_tokens(args).items() for i in _as_list(ids)]
        for name, token_id in listed:  # an eos_token_id may be a list of ids
            token = backend.id_to_token(token_id)
            where = f"the converted model's {name}={token_id} (its config)"
            if token is None:
                raise ConfigError(
                    f"{where} is no id of --tokenizer {args.tokenizer!r} ({size} ids): give the tokenizer the "
                    "model was trained with (the official TTT-E2E releases read Llama-3's, 128,256 ids)"
                )
            if token_id not in specials:
                warnings.warn(f"{where} is the ordinary token {token!r} of --tokenizer {args.tokenizer!r}, not a "
                              "special token: is it the tokenizer the model was trained with?", UserWarning, stacklevel=2)  # fmt: skip
    if bound < vocab_size / 2:
        warnings.warn(
            f"--tokenizer {args.tokenizer!r} has {bound} ids (special tokens aside) for a vocabulary of {vocab_size}: "
            "is it the tokenizer the model was trained with?",
            UserWarning,
            stacklevel=2,
        )


def _as_list(ids: int | list[int]) -> list[int]:
    return ids if isinstance(ids, list) else [ids]


def _converted_special_tokens(args: argparse.Namespace) -> dict[str, int | list[int]]:
    """The bos/eos (and pad) token ids of the converted model's own config (read after the model was;
    a reference config's eos may be a list of them)."""
    import json
    from pathlib import Path

    if args.source_format == "ttt-e2e":
        from innerloop.interop.ttt_e2e import special_token_ids as official_ids

        return official_ids(args.config)
    from innerloop.interop.ttt_lm_pytorch import special_token_ids

    config = json.loads((Path(args.src) / "config.json").read_text(encoding="utf-8"))
    return special_token_ids(config) if isinstance(config, dict) else {}


def _export_error(err: Exception, tokenizer: str | None, converted: str | None = None) -> ConfigError:
    """An export's error as a user error; one about the tokenizer names ``--tokenizer`` when it gave it,
    one about the special tokens the converted model's config (``converted``) when they came from it."""
    message = str(err)
    if tokenizer is not None and message.startswith("tokenizer:"):
        message = f"--tokenizer {tokenizer!r}:{message.removeprefix('tokenizer:')}"
    if converted is not None and message.startswith("special_tokens:"):
        message = f"the token ids of {converted!r}, the converted model's config:{message.removeprefix('special_tokens:')}"
    return ConfigError(message)


def _print_kept(folder: Any) -> None:
    """Say which entries of an export folder the export did not write (kept from an earlier one)."""
    from innerloop.hf.export import foreign_entries

    kept = foreign_entries(folder)
    if kept:
        print(f"kept in it (not written by the export): {', '.join(kept)}")


def _add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face folder (AutoModelForCausalLM, lm-eval)",
        description=textwrap.fill(
            "Write the model of a training checkpoint as a Hugging Face folder: config.json, "
            "model.safetensors, generation_config.json and the tokenizer files. After `import innerloop`, "
            "AutoModelForCausalLM.from_pretrained(OUT_DIR) loads it; tools that do not import innerloop "
            "(lm_eval) load it with trust_remote_code=True (docs/huggingface.md). The folder is written "
            "whole or not at all."
        ),
        formatter_class=_HelpFormatter,
    )
    export.add_argument("checkpoint", help="a last.safetensors written by `innerloop train`")
    export.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (created if absent)")
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in OUT_DIR: only the files it wrote itself are replaced, anything "
        "added to it is kept, and a folder of other files is never replaced; without it a non-empty "
        "OUT_DIR is refused",
    )
    export.add_argument(
        "--tokenizer",
        default=None,
        help="the tokenizer to write into the folder: bytes (innerloop's byte-level one), a tokenizer.json "
        "or a tokenizer folder (default: the one the checkpoint records; none for a converted checkpoint "
        "that records none)",
    )


def _export(args: argparse.Namespace) -> int:
    from innerloop.data.tokenizer import UnknownTokenizer
    from innerloop.hf.export import ExportError, export_checkpoint, run_tokenizer

    try:
        with command_line_options(EXPORT_OPTIONS):  # its errors name OUT_DIR and --overwrite
            folder = export_checkpoint(
                args.checkpoint, args.out_dir, overwrite=args.overwrite, tokenizer=args.tokenizer
            )
    except ExportError as err:
        raise _export_error(err, args.tokenizer) from None
    unknown = args.tokenizer is None and isinstance(run_tokenizer(args.checkpoint), UnknownTokenizer)
    note = (
        " (no tokenizer: the checkpoint records none; pass --tokenizer, or copy the model's own into it)"
        if unknown
        else ""
    )
    print(f"Hugging Face folder: {folder}{note}")
    _print_kept(folder)
    from innerloop.registry.modules import OPTION, loaded_plugin_modules

    # a plugin module loaded with -p registers its plugins only once imported: before the model is read
    imports = "".join(f"import {o.removeprefix(f'{OPTION} ')}; " for o in loaded_plugin_modules())
    print(f"load it with: import innerloop; {imports}AutoModelForCausalLM.from_pretrained({str(folder)!r})")
    return 0


# Exceptions that are the user's input, reported as one line: bad config or arguments, a bad
# checkpoint, unusable data, and Lightning's own misconfiguration errors (its messages name the
# setting). Anything else is a bug and keeps its traceback. Named by module, not imported: an error of
# one of these classes can only have been raised once its module was loaded, and importing them all
# would import Lightning (seconds) before a config error could be reported.
USER_ERRORS = (
    ("innerloop.config.load", "ConfigError"),
    ("innerloop.core.layer", "ModelTooLargeError"),  # sizes whose weights alone exceed the memory
    ("innerloop.checkpoints", "CheckpointError"),
    ("innerloop.data.text", "DataError"),  # defined there; train.data re-exports it
    ("innerloop.data.tokenizer", "TokenizerError"),
    ("innerloop.data.atomic", "FolderInTheWayError"),  # a folder where an output file goes
    ("innerloop.kernels.dispatch", "KernelUnavailableError"),  # a kernel named by model.ttt.kernel
    ("innerloop.core.environment", "EnvironmentSwitchError"),  # an INNERLOOP_* switch neither yes nor no
    ("innerloop.registry.modules", "PluginModuleError"),  # a module of -p that cannot be loaded
    ("lightning.fabric.utilities.exceptions", "MisconfigurationException"),
)


HF_EXTRA_PACKAGES = (
    "transformers",
    "tokenizers",
    "datasets",
    "lm_eval",
    "accelerate",
    "tensorboard",
    "zstandard",
)
"""The packages of the ``hf`` extra (pyproject.toml): a command that imports one that is not installed
(``innerloop export`` without transformers) says so in one line, with the command that installs it."""


def _missing_extra(err: BaseException) -> str | None:
    """The ``hf`` extra's package that ``err`` says cannot be found (:data:`HF_EXTRA_PACKAGES`), or None."""
    if not isinstance(err, ModuleNotFoundError):
        return None
    package = (err.name or "").split(".")[0]
    return package if package in HF_EXTRA_PACKAGES else None


def _is_user_error(err: BaseException) -> bool:
    if _missing_extra(err) is not None:
        return True  # an optional package not installed (see _user_message)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True  # a full disk or quota: the atomic writers name the file (innerloop.data.atomic)
    if isinstance(err, OSError) and err.errno == errno.ENAMETOOLONG and err.filename is not None:
        return True  # a path argument too long for the file system (see _user_message)
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(err, getattr(module, class_name)):
            return True
    return False


_HANDLERS = {
    "train": _train,
    "eval": _eval,
    "compare": _compare,
    "params": _params,
    "generate": _generate,
    "convert": _convert,
    "export": _export,
    "tokenizer": _tokenizer,
    "plugins": _plugins,
}


def _parse_intermixed(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that ``train``'s and ``params``' key=value overrides may also come
    after their flags (``innerloop train out_dir=c2 --resume trainer.max_steps=3100``). (argparse's own
    ``parse_intermixed_args`` does not support subcommands.)"""
    args, extras = parser.parse_known_args(argv)
    if args.command in ("train", "params"):  # the commands that take key=value overrides
        args.overrides = [*args.overrides, *(a for a in extras if not a.startswith("-"))]
        extras = [a for a in extras if a.startswith("-")]
    if extras:
        parser.error(
            f"unrecognized arguments: {' '.join(extras)}{_option_hint(parser, args.command, extras)}"
        )
    return args


def _option_hint(parser: argparse.ArgumentParser, command: str | None, extras: Sequence[str]) -> str:
    """What the first unknown option among ``extras`` may have meant (``--temprature``: ``--temperature``),
    among ``command``'s options, and where they are listed: ``""`` where none of ``extras`` is an option."""
    import difflib

    unknown = next((e.partition("=")[0] for e in extras if e.startswith("-")), None)
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if unknown is None or not subparsers or command not in subparsers[0].choices:
        return ""
    options = [o for a in subparsers[0].choices[command]._actions for o in a.option_strings]
    close = difflib.get_close_matches(unknown, options, n=2, cutoff=0.75)
    said = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"{said} (`innerloop {command} -h` lists the options)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``innerloop`` console script; returns the exit status.

    A user error (bad arguments, config, checkpoint or data) prints one line,
    ``innerloop <command>: error: ...``, on stderr and returns 2.
    """
    parser = _parser()
    try:
        args = _expand_user(_refuse_empty_paths(parser, _parse_intermixed(parser, argv)))
    except UsageError as err:
        prog = err.prog  # the top-level parser reports some errors of a command (unknown arguments)
        given = argv if argv is not None else sys.argv[1:]
        command = next((a for a in given if a in _HANDLERS), None)
        if prog == parser.prog and command is not None:
            prog = f"{parser.prog} {command}"
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))  # "tokenizer train"
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _warning_line(command)  # a warning is one line too, not a source excerpt
    try:
        with _sigterm_said():
            _load_plugin_modules(args)
            return _HANDLERS[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (start-up, an evaluation): nothing to save
        print(f"\ninnerloop {command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 128 + 2  # the shell's status for SIGINT
    except StoppedBySigterm:  # outside a training loop too: the start-up (reading the data), a generation
        print(f"\ninnerloop {command}: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM  # the shell's status for SIGTERM
    except BrokenPipeError:  # the reader of stdout went away (`innerloop generate ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit fails too
        return 128 + 13  # the shell's status for SIGPIPE
    except Exception as err:
        if not _is_user_error(err):
            raise
        print(f"innerloop {command}: error: {_user_message(err)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning


class StoppedBySigterm(BaseException):
    """A SIGTERM outside the parts of a command that take it themselves (training stops after its step,
    an evaluation ends at once): like ``KeyboardInterrupt`` for Ctrl-C, not an ``Exception`` that a
    handler of errors would take for one."""


@contextlib.contextmanager
def _sigterm_said() -> Iterator[None]:
    """Around a command in the main thread, where SIGTERM has its default action: SIGTERM raises
    :class:`StoppedBySigterm` (the command then ends with one line and status 143) instead of ending the
    process without a word, e.g. while a run's data is read and tokenized. Training and evaluation put
    their own handler in its place while they run; the previous handler is back after the command."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:  # ignored, or a caller's own handler
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise StoppedBySigterm

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _warning_line(command: str) -> Callable[..., str]:
    """``warnings.formatwarning`` for a command: ``innerloop <command>: warning: <message>`` on a line of
    its own (printed warnings only; a caller recording warnings sees them unchanged)."""

    def format_warning(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
    ) -> str:
        return f"\ninnerloop {command}: warning: {message}\n"

    return format_warning


_PATH_ARGUMENTS = (
    "checkpoint",
    "out_dir",
    "out",
    "src",
    "config",
    "tokenizer",
    "baseline",
    "data",
    "models",
    "paths",
)
"""The attributes of every command's arguments that hold a path (or a list of paths)."""


def _refuse_empty_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``args``, or a :class:`UsageError` naming the first path argument (:data:`_PATH_ARGUMENTS`) given
    as ``''``: an empty path would name the current directory (a ``tokenizer.json`` or checkpoint found
    there, the outputs written there) or, for ``--config``, the default preset."""
    for name in _PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if value == "" or (isinstance(value, list) and "" in value):
            subparser = _chosen_subparser(parser, args)
            action = next((a for a in subparser._actions if a.dest == name), None)  # noqa: SLF001
            shown = (
                (action.option_strings[0] if action.option_strings else action.metavar) if action else None
            )
            wanted = _EMPTY_PATH_HINTS.get(name, "a path (an empty one would name the current directory)")
            raise UsageError(subparser.prog, f"{shown or name} '' is empty: give {wanted}")
    return args


_EMPTY_PATH_HINTS = {
    "config": "a preset's name or a YAML file",
    "tokenizer": "bytes, a tokenizer.json or a folder holding one (an empty path would name the current directory)",
    "baseline": "the name or path of one of the models compared",
}
"""What a path argument of :data:`_PATH_ARGUMENTS` takes, where it is more than a path."""


def _chosen_subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser that read ``args``: ``innerloop tokenizer train``'s for that command."""
    while True:
        commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)  # noqa: SLF001
        chosen = getattr(args, commands.dest, None) if commands is not None else None
        if chosen not in (commands.choices if commands is not None else {}):
            return parser
        parser = commands.choices[chosen]


def _expand_user(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with a leading ``~`` expanded in every path argument (:data:`_PATH_ARGUMENTS`), as a shell
    does for an unquoted one: a quoted ``'~/x'``, or one a script passes, names the same folder in the
    checks (which expand it) and in the writes (pathlib does not expand it)."""
    for name in _PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) else v for v in value])
    return args


def _user_message(err: BaseException) -> str:
    """The one line of a user error; a path too long for the file system says which and what is valid, and
    a package of the ``hf`` extra not installed, how to install it."""
    package = _missing_extra(err)
    if package is not None:
        from innerloop.data.tokenizer import missing_package

        return missing_package("this command", package, err)  # type: ignore[arg-type]
    if isinstance(err, OSError) and err.errno == errno.ENAMETOOLONG and err.filename is not None:
        return f"the path {os.fsdecode(err.filename)!r} is too long: {name_too_long(err.filename)}"
    return _one_line(err)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
