"""Every option of the ``innerloop`` command says what it is and what it defaults to.

The checks walk the real parser, so an option added without help, or with a default its help does not
state, fails here.
"""

from __future__ import annotations

import argparse

import pytest

from innerloop.cli import _TRAIN_EPILOG, _parser
from innerloop.registry.kinds import KINDS

# argparse's own actions: their help is argparse's.
_ARGPARSE_OWN = (argparse._HelpAction, argparse._VersionAction)


def _parsers(parser: argparse.ArgumentParser | None = None) -> list[tuple[str, argparse.ArgumentParser]]:
    """The top-level parser and every subcommand's (nested ones too, e.g. ``tokenizer train``), by prog."""
    parser = parser if parser is not None else _parser()
    found = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def _actions() -> list[tuple[str, argparse.Action]]:
    return [
        (f"{prog} {'/'.join(action.option_strings) or action.dest}", action)
        for prog, parser in _parsers()
        for action in parser._actions
        if not isinstance(action, _ARGPARSE_OWN)
    ]


def _rendered_help(action: argparse.Action) -> str:
    """The help text as ``--help`` prints it, before line wrapping (``%(default)s`` expanded)."""
    return argparse.HelpFormatter("innerloop")._expand_help(action)


def test_every_subcommand_is_walked():
    progs = {prog for prog, _ in _parsers()}
    assert progs == {
        "innerloop",
        *(
            f"innerloop {c}"
            for c in ("train", "eval", "compare", "params", "generate", "convert", "export", "plugins")
        ),
        "innerloop tokenizer",
        "innerloop tokenizer train",
    }


@pytest.mark.parametrize(("name", "action"), _actions(), ids=[name for name, _ in _actions()])
def test_every_argument_has_help(name, action):
    assert action.help and action.help.strip(), f"{name} has no help text"


@pytest.mark.parametrize(("name", "action"), _actions(), ids=[name for name, _ in _actions()])
def test_every_default_is_stated(name, action):
    """An option with a default says so in its help, and a number or string default by its value."""
    if action.nargs == 0:  # a flag (--resume): off unless given, which its help describes
        return
    if action.required and action.option_strings:  # a required option (--out): there is no default
        assert "required" in _rendered_help(action), f"{name} is required; its help does not say so"
        return
    default = action.default
    if default is None and not action.option_strings and action.nargs != "*":
        return  # a required positional (checkpoint): there is no default to state
    help_text = _rendered_help(action)
    assert "default" in help_text, (
        f"{name} has default {default!r}; its help does not state it: {help_text!r}"
    )
    if isinstance(default, (int, float, str)):
        assert f"default: {default}" in help_text or f"default: {default!r}" in help_text, (
            f"{name}: help {help_text!r} does not give the default {default!r}"
        )


def test_plugins_help_names_every_kind():
    """Every kind of the one table of kinds, in the plural, in both the command list and its own help."""
    top = _parser()
    subparsers = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    listing = " ".join(top.format_help().split())
    own_help = " ".join(subparsers.choices["plugins"].format_help().split())
    for kind in KINDS:
        plural = kind.hook.removeprefix("register_").replace("_", " ")
        assert plural.startswith(kind.label), (kind, plural)  # the hook is the kind's own name
        assert plural in listing, f"`innerloop --help` does not name the kind {plural!r}"
        assert plural in own_help, f"`innerloop plugins --help` does not name the kind {plural!r}"


def test_train_epilog_gives_the_real_metrics_path():
    """Lightning's CSVLogger(out_dir, name="logs") writes out_dir/logs/version_<n>/metrics.csv."""
    from innerloop.train.run import _CSVLogger

    logger = _CSVLogger("out", name="logs", version=3)
    assert logger.log_dir.replace("\\", "/") == "out/logs/version_3"
    assert "logs/version_<n>/metrics.csv" in _TRAIN_EPILOG
    assert " metrics.csv" not in _TRAIN_EPILOG.replace("logs/version_<n>/metrics.csv", "")


def test_train_epilog_keeps_its_line_breaks():
    """The epilog's example commands stay one per line (the formatter must not re-wrap it)."""
    train = dict(_parsers())["innerloop train"]
    text = train.format_help()
    for line in _TRAIN_EPILOG.splitlines():
        assert line in text.splitlines(), f"epilog line re-wrapped: {line!r}"
