"""The ``innerloop`` command: train, eval, generate, plugins.

``innerloop train`` with no arguments is the main job: a tiny TTT-Linear LM on the Python standard
library's source, a few minutes on a laptop CPU. ``innerloop <command> --help`` explains each command.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from collections.abc import Sequence

from innerloop.config.load import DEFAULT_PRESET, ConfigError

_TRAIN_EPILOG = """\
overrides are dotted keys of the config, e.g.:
  innerloop train trainer.max_steps=100 model.ttt.inner_model=mlp model.ttt.base_lr=0.1
  innerloop train --config tiny-swa model.window=16
  innerloop train --config recall-ttt trainer.devices=2 trainer.strategy=ddp_spawn
outputs go to out_dir (default runs/<preset>): last.safetensors, config.yaml, metrics.csv,
loss_by_position.csv and loss_by_position.png. An out_dir holds one run: --resume continues it
(optim.* and trainer.* may change, e.g. trainer.max_steps=2000 to extend it), --overwrite replaces it.
"""


def _installed_version() -> str:
    """The installed distribution's version, or ``innerloop.__version__`` when run from a source tree."""
    from importlib import metadata

    try:
        return metadata.version("innerloop")
    except metadata.PackageNotFoundError:
        from innerloop import __version__

        return __version__


def _parser() -> argparse.ArgumentParser:
    from innerloop.config.load import preset_names

    parser = argparse.ArgumentParser(prog="innerloop", description="Test-time-training sequence layers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_installed_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a language model from a preset or YAML config",
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "--config",
        default=DEFAULT_PRESET,
        metavar="PRESET_OR_FILE",
        help=f"a packaged preset ({', '.join(preset_names())}) or a YAML file (default: {DEFAULT_PRESET})",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in out_dir from its last checkpoint (its saved config.yaml is the base config; "
        "optim.* and trainer.* overrides apply from the step reached, e.g. trainer.max_steps to extend it)",
    )
    train.add_argument(
        "--overwrite", action="store_true", help="replace the run in out_dir (its checkpoint and config)"
    )
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    evaluate = commands.add_parser("eval", help="perplexity and loss by position of a checkpoint (CSV + PNG)")
    evaluate.add_argument("checkpoint", help="a last.safetensors written by `innerloop train`")
    evaluate.add_argument(
        "--data", nargs="*", default=[], metavar="PATH", help="files, directories or globs (default: the held-out "
        "part of the standard-library corpus)",
    )  # fmt: skip
    evaluate.add_argument(
        "--seq-len", type=int, default=None, help="tokens per window (default: the training one)"
    )
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--batches", type=int, default=8, help="number of batches to evaluate")
    evaluate.add_argument(
        "--out", default=None, help="folder for the CSV and PNG (default: the checkpoint's)"
    )

    generate = commands.add_parser("generate", help="sample text through the recurrent state")
    generate.add_argument("checkpoint", help="a last.safetensors written by `innerloop train`")
    generate.add_argument("--prompt", default="def ", help="text to start from (default: 'def ')")
    generate.add_argument("--tokens", type=int, default=200, help="bytes to generate (default 200)")
    generate.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--seed", type=int, default=0)

    commands.add_parser("plugins", help="list the registered inner models, inner losses and update rules")
    return parser


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

    from innerloop.train.run import evaluate

    _quiet_lightning()
    out = args.out if args.out is not None else Path(args.checkpoint).parent
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
    from innerloop.train.checkpoint import load_model

    if args.tokens < 0:
        raise ConfigError(f"--tokens={args.tokens} must be >= 0")
    model = load_model(args.checkpoint)
    prompt = args.prompt.encode("utf-8")
    if not prompt:
        raise ConfigError("--prompt must not be empty (the model needs at least one byte to start from)")
    prompt_ids = torch.tensor([list(prompt)], dtype=torch.long)
    generator = torch.Generator().manual_seed(args.seed)
    # Bytes are decoded as they come (a character may span several tokens); invalid UTF-8 shows as �.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(args.prompt)
    for token, _state in generate(model, prompt_ids, args.tokens, args.temperature, args.top_k, generator):
        sys.stdout.write(decoder.decode(bytes([int(token[0])])))
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``innerloop`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from innerloop.train.checkpoint import CheckpointError

    handlers = {"train": _train, "eval": _eval, "generate": _generate, "plugins": _plugins}
    try:
        return handlers[args.command](args)
    except (ConfigError, CheckpointError) as err:
        print(f"innerloop {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
