"""Review s53o: the docs, ``--help`` texts and messages kept true to the day's changes.

- A checkpoint moved or copied alone (no config.yaml beside it) is evaluated on its run's data as its
  checkpoint records it (4ebef83). docs/training.md still said that such a checkpoint's ``--data`` dataset
  file (``.jsonl``...) is refused and that compare calls its training data unknown; compare's
  ``--batch-size``/``--batches`` help said "without its config.yaml", and ``--held-out test`` of a
  checkpoint that records no run said it needs "the run's config.yaml", though the record serves too.
- The divergence line docs/training.md quotes in a plain block was checked by nothing (tests/test_docs.py
  runs python and bash blocks only): the divergence line read "try a lower optim.lr (now 0.5), ...",
  where the code prints "(now 0.5; optim.min_lr may not exceed it)". The divergence line is now produced
  and matched here, and a new one fails until a test here produces it.
- docs/architecture.md's layout ("kept true to the code") did not name registry/settings.py; only
  core/'s modules were checked against it. Every unit listed file by file is now; so are its hook
  names (the hookspecs') and its built-in kernels with their priorities (the registry's).
- docs/architecture.md's dispatch section did not say that a named kernel is asked before it runs
  (refused_named_kernels: every layer, first-use verdicts by block_flags, cuda = the current GPU),
  which the day's dispatch fixes (36a7357, c5ec0e5, 4e61a7a) changed: it says so now.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lm_testing import TINY as TINY_RUN

from innerloop.cli import main
from innerloop.config.load import ConfigError, load_config
from innerloop.train.checkpoint import save_checkpoint
from innerloop.train.compare import ComparedModel, training_data_notes
from innerloop.train.module import LanguageModelModule, load_module
from innerloop.train.run import RUN_DATA_KEY, evaluation_windows, run_data_record

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 16


def _checkpoint_alone(folder: Path, data: Path, record: bool) -> Path:
    """An untrained checkpoint with no config.yaml beside it, recording its run's ``data.*`` and seed
    (as one moved out of its run folder does) when ``record``, else no run (as a converted model)."""
    run, _ = load_config(
        "tiny",
        ["model.hidden_size=16", "model.num_heads=2", "model.num_layers=1", "model.intermediate_size=32",
         "model.ttt.mini_batch_size=4", f"data.seq_len={SEQ_LEN}", "data.batch_size=2", "data.val_batches=1",
         f"data.paths=[{data}]", "data.test_fraction=0.2", f"out_dir={folder}"],
    )  # fmt: skip
    module = LanguageModelModule(model=asdict(run.model), seq_len=SEQ_LEN, num_position_buckets=4)
    tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}
    if record:
        tree[RUN_DATA_KEY] = run_data_record(run)
    return save_checkpoint(tree, folder / "last.safetensors")


def _corpus(folder: Path) -> Path:
    text = folder / "corpus.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    return text


@pytest.mark.slow  # four window readings of an untrained 1-layer model: ~0.4 s
def test_a_checkpoint_alone_reads_its_recorded_run_as_the_docs_say(tmp_path) -> None:
    data = _corpus(tmp_path)
    alone = _checkpoint_alone(tmp_path / "alone", data, record=True)
    module = load_module(alone)
    records = tmp_path / "x.jsonl"
    records.write_text('{"text": "hello there"}\n' * 300)
    # docs/training.md: a dataset --data file is refused only where the run is unknown; the record says
    # this run read raw text, so the file is read as text
    windows = evaluation_windows(alone, module, [str(records)], SEQ_LEN)
    assert "read as text" in windows.source, windows.source
    # --held-out test reads the recorded run's test windows
    test = evaluation_windows(alone, module, [], SEQ_LEN, held_out="test")
    assert "test windows" in test.source and "recorded them" in test.source, test.source
    # compare: its training data is known (no 'no config.yaml beside' note)
    model = ComparedModel("alone", alone, module, parameters=0, tokens_trained=None, tokens_per_s=None)
    notes = training_data_notes([model], 0)
    assert not [n for n in notes if "unknown" in n or "no config.yaml" in n], notes


@pytest.mark.slow  # one checkpoint written and refused: ~0.2 s
def test_held_out_test_of_a_checkpoint_that_records_no_run_names_both_sources(tmp_path) -> None:
    data = _corpus(tmp_path)
    unknown = _checkpoint_alone(tmp_path / "converted", data, record=False)
    module = load_module(unknown)
    with pytest.raises(ConfigError) as caught:
        evaluation_windows(unknown, module, [], SEQ_LEN, held_out="test")
    message = str(caught.value)
    # was: "needs the run's config.yaml beside the checkpoint", though the checkpoint's record serves too
    assert "its config.yaml beside it, or the data.* its checkpoint records" in message, message
    assert "records no run's data" in message, message


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_help_of_batch_defaults_names_an_unknown_run_not_a_missing_config(command, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # a checkpoint alone reads its recorded run's number of windows: 128 only where the run is unknown
    assert "without its config.yaml" not in text and "without the run's config.yaml" not in text
    assert "whose run is unknown" in text


# -- the error lines the docs quote in their text (```text) blocks, each produced by the code ----------------
#
# tests/test_docs.py runs the python and bash blocks; a plain block is prose to it, so a quoted error
# line could drift from the code's. test_review_s52_s52j.py runs docs/training.md's four config errors;
# nothing ran its divergence line, which had drifted. It is produced and matched here, "..." and "[...]"
# standing for what the quote leaves out; a new quoted error line fails
# test_every_quoted_error_line_is_checked until a test produces it.

QUOTED_ERROR = re.compile(r"^innerloop \w+: error: .*$", re.MULTILINE)

DIVERGED = "training diverged: the training loss is nan after 2 optimizer steps"


def _plain_block_error_lines() -> list[str]:
    from test_docs import DOCUMENTS, code_blocks

    return [
        line
        for document in DOCUMENTS
        for block in code_blocks(document)
        if block.language == "text"
        for line in QUOTED_ERROR.findall(block.text)
    ]


def _quote_pattern(quoted: str) -> re.Pattern[str]:
    """``quoted`` as a pattern of the whole line: its "[...]" any list, its "..." any text."""
    pieces = re.split(r"(\[\.\.\.\]|\.\.\.)", quoted)
    parts = [
        r"\[.*?\]" if piece == "[...]" else ".*?" if piece == "..." else re.escape(piece) for piece in pieces
    ]
    return re.compile("".join(parts))


def test_the_quote_pattern_elides_only_where_the_quote_says() -> None:
    assert _quote_pattern("a [...]; b ...").fullmatch("a ['x', 'y']; b and more")
    assert not _quote_pattern("a [...]; b").fullmatch("a ['x']; c")
    assert not _quote_pattern("now 0.5").fullmatch("now 0.25")


def test_every_quoted_error_line_is_checked() -> None:
    from test_review_s52_s52j import _quoted_error_lines as config_error_lines  # s52j runs each of them

    lines = _plain_block_error_lines()
    assert len(lines) >= 5, lines  # the parser finds docs/training.md's
    unchecked = [line for line in lines if DIVERGED not in line and line not in config_error_lines()]
    assert not unchecked, f"quoted error lines no test produces: {unchecked}"


class _NanFromStep(Callback):
    """Weights NaN at the start of optimizer step ``step`` (counted from 0): its loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.blocks[0].mlp.down_proj.weight.fill_(float("nan"))


@pytest.mark.slow  # a tiny run of 3 steps through the CLI, as s45c's: 5.6-7.9 s at load 13 on 2 cores
def test_the_quoted_divergence_is_the_codes(capsys, tmp_path, monkeypatch) -> None:
    import innerloop.train.run as run_module

    (line,) = [line for line in _plain_block_error_lines() if DIVERGED in line]
    real_train = run_module.train
    monkeypatch.setattr(run_module, "train", lambda *a, **k: real_train(*a, **k, callbacks=[_NanFromStep(2)]))
    monkeypatch.chdir(tmp_path)
    overrides = ["optim.lr=0.5", "trainer.checkpoint_every=1", "trainer.max_steps=3", "out_dir=runs/tiny"]
    overrides += [
        "data.batch_size=2",
        "data.seq_len=16",
        "trainer.diagnostics_batches=0",
        "model.num_layers=1",
    ]
    assert main(["train", *TINY_RUN, *overrides]) == 2
    printed = capsys.readouterr().err.strip().splitlines()[-1]
    # the loss before is the run's own: the quote's number stands for any
    quoted = re.sub(r"last finite training loss [\d.]+", "last finite training loss ...", line)
    assert _quote_pattern(quoted).fullmatch(printed), (line, printed)


# -- docs/architecture.md's layout names every module of each unit it lists file by file ---------------
#
# test_review_s24_docs.py checked core/ alone; registry/settings.py (d544a32) was missing from the
# layout. config/ and train/ share one line of the layout that describes them together, not by file.

LAYOUT_SHARED = ("config", "train")


def _layout_sections() -> dict[str, str]:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    layout = text[text.index("innerloop/\n  core/") : text.index("\ntests/ ")]
    sections: dict[str, str] = {}
    name = None
    for line in layout.splitlines()[1:]:
        head = re.match(r"  (\w+)/ ", line)
        if head:
            name = head.group(1)
            sections[name] = line
        elif re.match(r"  \S", line):
            name = None
        elif name is not None:
            sections[name] += "\n" + line
    return sections


def test_the_layout_names_every_module_and_folder_of_each_unit() -> None:
    sections = _layout_sections()
    units = [
        p for p in sorted((REPO / "innerloop").iterdir()) if p.is_dir() and (p / "__init__.py").is_file()
    ]
    assert {u.name for u in units} - set(LAYOUT_SHARED) == set(sections) - set(LAYOUT_SHARED), sorted(
        sections
    )
    missing = [
        f"{unit.name}/{child.name}"
        for unit in units
        if unit.name not in LAYOUT_SHARED
        for child in sorted(unit.iterdir())
        if (child.suffix == ".py" and child.name != "__init__.py" and child.stem not in sections[unit.name])
        or ((child / "__init__.py").is_file() and child.name not in sections[unit.name])
    ]
    assert not missing, f"docs/architecture.md's layout does not name {missing}"
    named = [
        (unit, file)
        for unit, text in sections.items()
        if unit not in LAYOUT_SHARED
        for file in re.findall(r"\b(\w+\.py)\b", text)
        if not list((REPO / "innerloop" / unit).rglob(file))
    ]
    assert not named, f"the layout names modules that do not exist: {named}"


# -- docs/architecture.md's hook names and built-in kernels (with priorities) are the registry's ---------


def _architecture_paragraph(start: str) -> str:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    begin = text.index(start)
    return " ".join(text[begin : text.index("\n\n", begin)].split())


def test_the_hook_names_are_the_hookspecs() -> None:
    from innerloop.registry import hookspecs

    paragraph = _architecture_paragraph("`hookspecs.py` makes one hook per kind")
    documented = set(re.findall(r"`(register_\w+)`", paragraph))
    assert documented == {name for name in dir(hookspecs) if name.startswith("register_")}, documented


@pytest.mark.slow  # builds the registry where it is the process's first: ~0.6 s
def test_the_built_in_kernels_and_priorities_are_the_registrys() -> None:
    from innerloop.core.layer import is_built_in
    from innerloop.registry import get_registry

    paragraph = _architecture_paragraph("Built-ins: `fused_torch_")
    documented = {}
    for stem, variants, priority in re.findall(r"`(\w+?)(?:_\{([\w,]+)\})?` \(priority (\d+)", paragraph):
        for name in [f"{stem}_{v}" for v in variants.split(",")] if variants else [stem]:
            documented[name] = int(priority)
    registered = {k.name: k.priority for k in get_registry().kernels() if is_built_in("kernel", k)}
    assert len(documented) >= 9 and documented == registered, (documented, registered)
