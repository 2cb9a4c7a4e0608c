"""The ``innerloop`` command: train, eval, generate, convert, export, plugins.

``innerloop train`` with no arguments is the main job: a tiny TTT-Linear LM on the Python standard
library's source, about a minute on 2 idle CPU cores (measured in benchmarks/RESULTS.md, "The main
job"; longer on a loaded machine). ``innerloop <command> --help`` explains each command.
"""

from __future__ import annotations

import argparse
import codecs
import math
import os
import sys
import textwrap
from collections.abc import Callable, Sequence

from innerloop.config.load import DEFAULT_PRESET, ConfigError

_TRAIN_EPILOG = """\
with no arguments: the preset `tiny`, about a minute on 2 idle CPU cores (benchmarks/RESULTS.md).
overrides are dotted keys of the config, e.g.:
  innerloop train trainer.max_steps=100 model.ttt.inner_model=mlp model.ttt.base_lr=0.1
  innerloop train --config tiny-swa model.window=16
  innerloop train --config recall-ttt trainer.devices=2 trainer.strategy=ddp_spawn
outputs go to out_dir (runs/<preset> for a packaged preset; runs/tiny for a YAML file that sets none):
  last.safetensors, config.yaml, loss_by_position.csv and loss_by_position.png, and
  logs/version_<n>/metrics.csv (what was logged, one version_<n> folder per launch).
An out_dir holds one run: --resume continues it (optim.* and trainer.* may change, e.g.
trainer.max_steps=2000 to extend it), --overwrite replaces it.
"""


def _installed_version() -> str:
    """The installed distribution's version, or ``innerloop.__version__`` when run from a source tree."""
    from importlib import metadata

    try:
        return metadata.version("innerloop")
    except metadata.PackageNotFoundError:
        from innerloop import __version__

        return __version__


class UsageError(Exception):
    """A command line argparse cannot parse; ``prog`` is the (sub)command's, e.g. ``innerloop eval``."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), reported by :func:`main`."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(self.prog, message)


def _number(kind: type, low: float, low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite ``kind`` (int or float) >= ``low`` (> ``low`` if ``low_open``)."""
    valid = f"{'an integer' if kind is int else 'a finite number'} {'>' if low_open else '>='} {low}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


_POSITIVE_INT = _number(int, 1)


def _seed(text: str) -> int:
    """An argparse ``type``: a seed of torch's generator, an integer in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text!r}")
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {_installed_version()}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", help="what to do; `innerloop COMMAND --help` explains it"
    )
    _add_train(commands, preset_names())
    _add_eval(commands)
    _add_generate(commands)
    _add_convert(commands)
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
    return parser


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
        default=DEFAULT_PRESET,
        metavar="PRESET_OR_FILE",
        help=f"a packaged preset ({', '.join(presets)}) or a YAML file (default: %(default)s)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in out_dir from its last checkpoint (its saved config.yaml is the base config; "
        "optim.* and trainer.* overrides apply from the step reached, e.g. trainer.max_steps to extend it)",
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


def _add_eval(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="perplexity and loss by position of a checkpoint (CSV + PNG)",
        description="Perplexity and loss by position of a checkpoint, on held-out text or your own files.",
        formatter_class=_HelpFormatter,
    )
    evaluate.add_argument("checkpoint", help="a last.safetensors written by `innerloop train`")
    evaluate.add_argument(
        "--data",
        nargs="*",
        default=[],
        metavar="PATH",
        help="files, directories or globs to evaluate on (default: the held-out part of the "
        "standard-library corpus)",
    )
    evaluate.add_argument(
        "--seq-len",
        type=_POSITIVE_INT,
        default=None,
        help="tokens per window (default: the seq_len the checkpoint was trained with)",
    )
    evaluate.add_argument(
        "--batch-size", type=_POSITIVE_INT, default=16, help="windows per batch (default: %(default)s)"
    )
    evaluate.add_argument(
        "--batches",
        type=_POSITIVE_INT,
        default=8,
        help="number of batches to evaluate (default: %(default)s)",
    )
    evaluate.add_argument(
        "--out",
        default=None,
        help="folder for eval_<checkpoint>_<data>_T<seq_len>_n<windows>.csv and .png, <checkpoint> being "
        "the file's stem and the start of its checksum, e.g. eval_last-1a2b3c4d_default-val_T128_n128.csv "
        "(default: the checkpoint's folder); the training run's own loss_by_position files are never "
        "replaced",
    )


def _add_generate(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser(
        "generate",
        help="sample text through the recurrent state",
        description="Sample text from a checkpoint, one byte at a time through the recurrent state.",
        formatter_class=_HelpFormatter,
    )
    generate.add_argument("checkpoint", help="a last.safetensors written by `innerloop train`")
    generate.add_argument(
        "--prompt", default="def ", help="text to start from, any bytes (default: %(default)r)"
    )
    generate.add_argument(
        "--tokens", type=_number(int, 0), default=200, help="bytes to generate (default: %(default)s)"
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
        help="sample among the k most likely bytes (default: no limit, sample among all)",
    )
    generate.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of the sampling generator (default: %(default)s)",
    )


def _quiet_lightning() -> None:
    """Keep Lightning's progress bar and warnings, drop its start-up chatter and a deprecation warning
    it raises itself with this torch (``LeafSpec``)."""
    import logging
    import warnings

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def _train(args: argparse.Namespace) -> int:
    from innerloop.config.load import load_config
    from innerloop.train.module import TrainingDivergedError
    from innerloop.train.run import train

    run, cfg = load_config(args.config, args.overrides)
    if args.resume:
        from pathlib import Path

        saved = Path(run.out_dir) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(
                f"--resume: no saved config at {str(saved)!r}; is out_dir={run.out_dir!r} a run?"
            )
        run, cfg = load_config(str(saved), args.overrides)
    _quiet_lightning()
    if args.resume:
        print(f"resuming from {run.out_dir}/last.safetensors", flush=True)
    try:
        result = train(run, cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingDivergedError as err:
        print(f"innerloop train: error: {err}", file=sys.stderr)
        return 2
    m = result.metrics
    print(
        f"validation perplexity: {m['val_ppl']:.3f}  (loss {m['val_loss']:.4f} nats/byte, accuracy {m['val_acc']:.3f})"
    )
    print(f"checkpoint:       {result.checkpoint}")
    print(f"config:           {result.config}")
    print(f"loss by position: {result.plot} ({result.csv})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from innerloop.config.load import check_output_dir
    from innerloop.train.data import resolve_files
    from innerloop.train.run import evaluate

    for pattern in args.data:
        try:
            resolve_files([pattern])
        except ValueError:
            raise ConfigError(
                f"--data {pattern!r} matches no file (give files, directories or globs)"
            ) from None
    out = Path(args.out) if args.out is not None else Path(args.checkpoint).parent
    check_output_dir(out, "--out")
    _quiet_lightning()
    metrics, csv_path, png = evaluate(
        args.checkpoint, args.data, args.seq_len, args.batch_size, args.batches, out_dir=out
    )
    print(f"perplexity: {metrics['val_ppl']:.3f}  (loss {metrics['val_loss']:.4f} nats/byte, "
          f"{int(metrics['tokens'])} tokens)")  # fmt: skip
    print(f"loss by position: {png} ({csv_path})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from innerloop.models import generate
    from innerloop.train.module import load_model

    # The model reads bytes: take the prompt's own bytes (os.fsencode undoes the surrogate escapes
    # Python uses for command-line bytes that are not valid UTF-8).
    prompt = os.fsencode(args.prompt)
    if not prompt:
        raise ConfigError("--prompt must not be empty (the model needs at least one byte to start from)")
    model = load_model(args.checkpoint)
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
    for token, _state in generate(model, prompt_ids, args.tokens, args.temperature, args.top_k, generator):
        token_id = int(token[0])  # a model with more than 256 tokens may sample one that is no byte
        sys.stdout.write(decoder.decode(bytes([token_id])) if token_id < 256 else f"[token {token_id}]")
        sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    return 0


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
            "reference's."
        ),
        formatter_class=_HelpFormatter,
    )
    convert.add_argument(
        "source_format", choices=["ttt-lm-pytorch"], help="what SRC is (choices: %(choices)s)"
    )
    convert.add_argument("src", metavar="SRC", help="the saved model: a save_pretrained folder")
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
    from pathlib import Path

    from innerloop.interop.ttt_lm_pytorch import load_model as load_reference_model
    from innerloop.train.module import save_model_checkpoint

    if args.format == "hf":
        return _convert_to_hugging_face(args)
    target = Path(args.out) / "last.safetensors"
    if target.exists() and not args.overwrite:
        raise ConfigError(f"{str(target)!r} exists; pass --overwrite to replace it, or give another OUT")
    try:
        model = load_reference_model(args.src)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{args.source_format} model {args.src!r}: {_one_line(err)}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    path = save_model_checkpoint(model, target)
    config = model.config
    print(
        f"converted {args.src} ({config.num_layers} layers, hidden {config.hidden_size}, "
        f"vocabulary {config.vocab_size}, {model.num_parameters():,} parameters)"
    )
    print(f"checkpoint: {path}")
    return 0


def _add_convert_format(convert: argparse.ArgumentParser) -> None:
    convert.add_argument(
        "--format",
        choices=["innerloop", "hf"],
        default="innerloop",
        help="what to write: an innerloop checkpoint OUT/last.safetensors, or hf: a Hugging Face folder OUT "
        "(config.json, model.safetensors, tokenizer; docs/huggingface.md) (default: %(default)s)",
    )


def _convert_to_hugging_face(args: argparse.Namespace) -> int:
    from innerloop.hf.export import ExportError, check_target, export_model
    from innerloop.interop.ttt_lm_pytorch import load_model as load_reference_model

    try:
        check_target(args.out, args.overwrite)
        model = load_reference_model(args.src)
    except ExportError as err:
        raise ConfigError(str(err)) from None
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{args.source_format} model {args.src!r}: {_one_line(err)}") from None
    # The reference's models use the Llama tokenizer, which is not shipped: the folder gets innerloop's
    # byte-level one only when the vocabulary is bytes; otherwise give the tokenizer yourself.
    bytes_model = model.config.vocab_size == 256
    tokenizer = "bytes" if bytes_model else None
    tokenizer_note = "" if bytes_model else " (no tokenizer: copy the model's own into it)"
    try:
        folder = export_model(model, args.out, overwrite=args.overwrite, tokenizer=tokenizer)
    except ExportError as err:
        raise ConfigError(str(err)) from None
    config = model.config
    print(
        f"converted {args.src} ({config.num_layers} layers, hidden {config.hidden_size}, "
        f"vocabulary {config.vocab_size}, {model.num_parameters():,} parameters)"
    )
    print(f"Hugging Face folder: {folder}{tokenizer_note}")
    return 0


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
        help="replace an earlier export in OUT_DIR (a folder of other files is never replaced); "
        "without it a non-empty OUT_DIR is refused",
    )


def _export(args: argparse.Namespace) -> int:
    from innerloop.hf.export import ExportError, export_checkpoint

    try:
        folder = export_checkpoint(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    except ExportError as err:
        raise ConfigError(str(err)) from None
    print(f"Hugging Face folder: {folder}")
    print("load it with: import innerloop; AutoModelForCausalLM.from_pretrained(" + repr(str(folder)) + ")")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's input, reported as one line: bad config or arguments, a bad
    checkpoint, unusable data, and Lightning's own misconfiguration errors (its messages name the
    setting). Anything else is a bug and keeps its traceback."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from innerloop.train.checkpoint import CheckpointError
    from innerloop.train.data import DataError

    return ConfigError, CheckpointError, DataError, MisconfigurationException


_HANDLERS = {
    "train": _train,
    "eval": _eval,
    "generate": _generate,
    "convert": _convert,
    "export": _export,
    "plugins": _plugins,
}


def _parse_intermixed(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that ``train``'s key=value overrides may also come after its flags
    (``innerloop train out_dir=c2 --resume trainer.max_steps=3100``). (argparse's own
    ``parse_intermixed_args`` does not support subcommands.)"""
    args, extras = parser.parse_known_args(argv)
    if args.command == "train":
        args.overrides = [*args.overrides, *(a for a in extras if not a.startswith("-"))]
        extras = [a for a in extras if a.startswith("-")]
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``innerloop`` console script; returns the exit status.

    A user error (bad arguments, config, checkpoint or data) prints one line,
    ``innerloop <command>: error: ...``, on stderr and returns 2.
    """
    parser = _parser()
    try:
        args = _parse_intermixed(parser, argv)
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
    try:
        return _HANDLERS[args.command](args)
    except _user_errors() as err:
        print(f"innerloop {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
