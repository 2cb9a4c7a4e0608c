"""Review s41c: the docs as a contract, in the other direction too: every key of a run config is in a
key table of the docs (docs/training.md "The keys", docs/family.md, docs/e2e.md "Options") with the
default the code has, every column of ``metrics.csv`` and every name ``innerloop`` exports is named in
the docs."""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from lm_testing import TINY

import innerloop
from innerloop.config.schema import RunConfig
from innerloop.registry.kinds import KINDS

ROOT = Path(__file__).resolve().parent.parent
KEY_TABLE_HEADER = "| key | default | meaning |"
E2E_PREFIX = "model.e2e."  # docs/e2e.md's table names its keys without it


def _leaf_defaults(schema: Any, prefix: str = "") -> dict[str, Any]:
    """Every key of ``schema`` that holds a value (not a section), dotted, with its default."""
    defaults: dict[str, Any] = {}
    for field in dataclasses.fields(schema):
        value = getattr(schema, field.name)
        if dataclasses.is_dataclass(value):
            defaults.update(_leaf_defaults(value, f"{prefix}{field.name}."))
        else:
            defaults[prefix + field.name] = value
    return defaults


def _read_value(text: str) -> Any:
    """A default as a key table writes it: a number, true/false/null, [] or {}, else a string."""
    text = text.strip().strip("`")
    words = {"true": True, "false": False, "null": None, "[]": [], "{}": {}}
    if text in words:
        return words[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _documented_defaults() -> dict[str, tuple[Any, str]]:
    """Each key of the docs' key tables, with its default as written and the page that states it."""
    documented: dict[str, tuple[Any, str]] = {}
    for page in sorted((ROOT / "docs").glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        for start, line in enumerate(lines):
            if line.strip() != KEY_TABLE_HEADER:
                continue
            for row in lines[start + 2 :]:
                if not row.startswith("|"):
                    break
                key_cell, default_cell = row.split("|")[1:3]
                keys = re.findall(r"`([^`]+)`", key_cell)
                # "16 (tiny), 1024 (125m)": the schema's default comes first; "1.0, 0.1, 0.1": one per key
                defaults = default_cell.split(",") if len(keys) > 1 else [default_cell.split(" (")[0]]
                assert len(defaults) == len(keys), (
                    f"{page.name}: {row!r} gives {len(keys)} keys, {len(defaults)} defaults"
                )
                for key, default in zip(keys, defaults, strict=True):
                    dotted = key if "." in key or page.name != "e2e.md" else E2E_PREFIX + key
                    assert dotted not in documented, f"{dotted} is in two key tables"
                    documented[dotted] = (_read_value(default), page.name)
    return documented


def test_every_config_key_is_in_a_key_table_of_the_docs() -> None:
    """trainer.threads, trainer.num_position_buckets, optim.beta1/beta2, model.norm_eps,
    model.tie_embeddings, model.padding_id, model.pre_conv_kernel and model.family.output_gate were
    named on no page (trainer.threads only in a warning's advice)."""
    documented = _documented_defaults()
    missing = sorted(set(_leaf_defaults(RunConfig())) - set(documented))
    assert not missing, f"config keys no key table of docs/ lists: {missing}"
    unknown = sorted(set(documented) - set(_leaf_defaults(RunConfig())))
    assert not unknown, f"key tables list keys a run config does not have: {unknown}"


def test_every_documented_default_is_the_codes() -> None:
    documented = _documented_defaults()
    wrong = {
        key: (written, page, default)
        for key, default in _leaf_defaults(RunConfig()).items()
        if key in documented
        for written, page in [documented[key]]
        if written != default or type(written) is not type(default) and default is not None
    }
    # an int written where the code's default is a float (rope_theta 10000.0 as 10000) would pass ==
    assert not wrong, f"documented default (as written, page) differs from the code's: {wrong}"


def test_training_md_names_the_run_configs_top_level_keys() -> None:
    """It said 'the keys seed and out_dir', leaving out logger."""
    page = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    top = [
        f.name for f in dataclasses.fields(RunConfig) if f.name not in ("model", "data", "optim", "trainer")
    ]
    sentence = re.search(r"A run config has sections (.*?);", page, re.S)
    assert sentence is not None
    assert all(f"`{name}`" in sentence.group(1) for name in top), (top, sentence.group(1))


def test_every_name_innerloop_exports_is_in_the_docs() -> None:
    """innerloop.Views, innerloop.available and innerloop.PluginLoadWarning were exported and named on
    no page."""
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
    code = "\n".join(re.findall(r"```.*?```|`[^`\n]+`", text, re.S))  # code blocks and spans
    kinds = {kind.name for kind in KINDS}  # "one `innerloop.register_<kind>` per kind (`inner_model`, ...)"
    missing = [
        name
        for name in innerloop.__all__
        if not re.search(rf"\b{name}\b", code)
        and not (name.startswith("register_") and "register_<kind>" in code and name[9:] in kinds)
    ]
    assert not missing, f"exported by innerloop, named in no doc: {missing}"


def _with_placeholders(column: str) -> str:
    """``val_loss_pos/3`` -> ``val_loss_pos/<``: the docs write a numbered column with a placeholder."""
    return re.sub(r"/\d+$", "/<", column)


@pytest.mark.slow  # reason: one tiny training run of 2 steps (~2 s)
def test_every_column_a_run_writes_is_named_in_training_md(tmp_path) -> None:
    """metrics.csv's columns were named across the page or not at all (epoch); loss_by_position.csv's
    not at all."""
    from innerloop.config import load_config
    from innerloop.train import train

    overrides = ["trainer.max_steps=2", "trainer.val_every=2", "trainer.log_every=1", f"out_dir={tmp_path}"]
    run, cfg = load_config("tiny", [*TINY, *overrides])
    train(run, cfg)
    page = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    listed = re.search(r"The columns of `metrics.csv`:(.*?)\n\n", page, re.S)
    assert listed is not None, "training.md lists the columns of metrics.csv in one place"
    with open(tmp_path / "logs" / "version_0" / "metrics.csv", newline="", encoding="utf-8") as file:
        columns = {_with_placeholders(c) for c in next(csv.reader(file))}
    throughput = {"tokens_seen", "tokens_per_s", "wall_time"}  # the "Throughput" paragraph after it
    unnamed = sorted(c for c in columns - throughput if f"`{c}" not in listed.group(0))
    assert not unnamed, f"metrics.csv columns training.md does not list: {unnamed}"
    assert all(f"`{c}`" in page for c in throughput)
    with open(tmp_path / "loss_by_position.csv", newline="", encoding="utf-8") as file:
        header = next(csv.reader(file))
    table_row = next(line for line in page.splitlines() if line.startswith("| `loss_by_position.png`"))
    assert all(f"`{c}`" in table_row for c in header), (header, table_row)


def test_training_md_says_what_train_returns_and_raises() -> None:
    """train()'s TrainResult, TrainingInterrupted and load_config's ConfigError were public and on no
    page."""
    from innerloop.config import ConfigError
    from innerloop.train import TrainingInterrupted, TrainResult

    page = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    said = re.search(r"returns a `TrainResult` \((.*?)\)", page, re.S)
    assert said is not None
    assert {f.name for f in dataclasses.fields(TrainResult)} <= set(re.findall(r"`(\w+)`", said.group(1)))
    assert "raises a `ConfigError` (a `ValueError`)" in page and issubclass(ConfigError, ValueError)
    assert "raises `TrainingInterrupted` (`exit_code` 130 or 143)" in page
    assert TrainingInterrupted("").exit_code == 130 and TrainingInterrupted("", 143).exit_code == 143


def test_training_md_states_generates_defaults() -> None:
    """innerloop generate's --tokens, --temperature, --top-k, --seed and --prompt defaults were on no page."""
    from innerloop.cli import _parser

    page = " ".join((ROOT / "docs" / "training.md").read_text(encoding="utf-8").split())
    generate = next(a for a in _parser()._actions if a.dest == "command").choices["generate"]
    defaults = {a.option_strings[0]: a.default for a in generate._actions if a.option_strings}
    assert (defaults["--tokens"], defaults["--temperature"], defaults["--seed"]) == (200, 0.8, 0)
    assert defaults["--top-k"] is None and defaults["--prompt"] == "def "
    assert "`--tokens` (200)" in page and "`--temperature` (0.8; 0: greedy)" in page
    assert "`--top-k` (none: every token)" in page and "`--seed` (0)" in page
    assert "`--prompt` defaults to `def `" in page


@pytest.mark.parametrize(("preset", "step"), [("deltanet-tiny", 1), ("tiny", 2)])
def test_params_budget_sizes_hidden_size_in_the_steps_training_md_states(preset: str, step: int) -> None:
    """training.md said 'hidden_size in steps of 2 x num_heads' for every mixer; the family's mixers
    apply no RoPE and take any multiple of num_heads (deltanet-tiny sized to 68 = 17 x 4 parameters'
    worth gets 68)."""
    from innerloop.config import load_config
    from innerloop.models.params import count_config_parameters, size_to_budget

    run, _ = load_config(preset, model_only=True)
    heads = run.model.num_heads
    counts = [
        count_config_parameters(dataclasses.replace(run.model, hidden_size=k * heads)).total for k in (16, 18)
    ]
    sized = size_to_budget(run.model, sum(counts) // 2, "hidden_size")  # about 17 x num_heads' worth
    assert sized.hidden_size % (step * heads) == 0
    assert (sized.hidden_size == 17 * heads) == (step == 1)
    page = " ".join((ROOT / "docs" / "training.md").read_text(encoding="utf-8").split())
    assert "`hidden_size` in steps of `num_heads`, of 2 x `num_heads` where the mixer applies RoPE" in page


def test_training_md_states_compares_defaults() -> None:
    """innerloop compare's --out, --resamples and --seed defaults were on no page."""
    from innerloop.cli import _parser

    page = " ".join((ROOT / "docs" / "training.md").read_text(encoding="utf-8").split())
    compare = next(a for a in _parser()._actions if a.dest == "command").choices["compare"]
    defaults = {a.option_strings[0]: a.default for a in compare._actions if a.option_strings}
    assert (defaults["--out"], defaults["--resamples"], defaults["--seed"]) == ("runs/compare", 1000, 0)
    assert "into `--out` (default `runs/compare`)" in page
    assert "`--resamples` (1000) draws" in page and "seeded with `--seed` (0)" in page


def test_training_md_lists_the_precisions_a_config_takes() -> None:
    """transformer-engine is valid (PRECISIONS) and was not named among them; the short names are not."""
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT_STR

    from innerloop.config import ConfigError, load_config
    from innerloop.config.load import FLOAT16_WEIGHT_PRECISIONS

    trains = set(typing.get_args(_PRECISION_INPUT_STR)) - set(
        FLOAT16_WEIGHT_PRECISIONS
    )  # what the checks take
    page = " ".join((ROOT / "docs" / "training.md").read_text(encoding="utf-8").split())
    listed = re.search(
        r"`trainer.precision` takes a Lightning precision that trains \((.*?)\) or `auto`", page
    )
    assert listed is not None
    assert trains <= set(re.findall(r"`([\w-]+)`", listed.group(1))), trains
    with pytest.raises(ConfigError, match="'bf16' is not valid"):
        load_config("tiny", ["trainer.precision=bf16", "out_dir=runs/never-written"])


def test_the_key_tables_accelerators_are_the_checks() -> None:
    """The key table first said 'cpu, gpu, cuda, auto': Lightning's 'gpu' alias is refused by the checks."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    from innerloop.config import ConfigError, load_config

    row = next(
        line
        for line in (ROOT / "docs" / "training.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| `trainer.accelerator` |")
    )
    named = set(re.findall(r"`(\w+)`", row.split("|")[3]))
    assert named == {*AcceleratorRegistry.available_accelerators(), "auto", "gpu"}, named
    assert "not `gpu`" in row and "`mps` is refused" in row
    with pytest.raises(ConfigError, match="'gpu' is not valid"):
        load_config("tiny", ["trainer.accelerator=gpu", "out_dir=runs/never-written"])


@pytest.mark.parametrize("mixer", ["ttt", "e2e"])
def test_an_untied_head_has_weights_of_its_own_as_the_pages_say(mixer: str) -> None:
    """training.md and e2e.md said the LM head is tied to the embedding, for every model:
    model.tie_embeddings=false (CausalLM and E2ELM both read it) gives it its own."""
    from innerloop.models import ModelConfig, build_model

    for tie in (True, False):
        model = build_model(
            ModelConfig(mixer=mixer, hidden_size=16, num_heads=2, num_layers=2, tie_embeddings=tie)
        )
        weights = {p.data_ptr() for name, p in model.named_parameters() if p.dim() == 2 and p.shape[0] == 256}
        assert len(weights) == (1 if tie else 2), (mixer, tie, len(weights))
    training = " ".join((ROOT / "docs" / "training.md").read_text(encoding="utf-8").split())
    e2e = " ".join((ROOT / "docs" / "e2e.md").read_text(encoding="utf-8").split())
    assert (
        "LM head tied to the embedding (`model.tie_embeddings=false` gives the head weights of its own)"
        in training
    )
    assert "an LM head tied to the embedding (unless `model.tie_embeddings=false`)" in e2e


def test_training_md_names_the_compare_csvs_columns() -> None:
    """compare-<id>.csv's columns were on no page."""
    from types import SimpleNamespace

    from innerloop.train.compare import comparison_csv

    header = comparison_csv(SimpleNamespace(lengths=[], models=[], bands={})).splitlines()[0].split(",")
    page = " ".join((ROOT / "docs" / "training.md").read_text(encoding="utf-8").split())
    said = re.search(r"`compare-<id>.csv` \((.*?)\) and `compare-<id>.png`", page)
    assert said is not None and re.findall(r"`(\w+)`", said.group(1)) == header, header


def test_every_name_innerloop_train_exports_is_in_training_md() -> None:
    """warmup_cosine, position_buckets, stdlib_files, recall_example, save_checkpoint, IGNORE_INDEX,
    TrainResult and TrainingInterrupted were exported by innerloop.train and on no page."""
    import innerloop.train

    page = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    code = "\n".join(re.findall(r"```.*?```|`[^`\n]+`", page, re.S))
    missing = [name for name in innerloop.train.__all__ if not re.search(rf"\b{name}\b", code)]
    assert not missing, f"exported by innerloop.train, named nowhere in training.md: {missing}"
    assert f"`IGNORE_INDEX` ({innerloop.train.IGNORE_INDEX}," in page


@pytest.mark.parametrize("module", ["innerloop.config", "innerloop.models"])
def test_every_name_the_training_packages_export_is_in_the_docs(module: str) -> None:
    """innerloop.config's preset_names, save_config, validate_run_config and its section classes, and
    innerloop.models' Block, build_mixer, sample_next, the validate_* checks, MIXERS and BACKBONES were
    exported and on no page."""
    import importlib

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # e2e.md has E2EConfig, ...
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
    code = "\n".join(re.findall(r"```.*?```|`[^`\n]+`", text, re.S))
    names = importlib.import_module(module).__all__
    missing = [name for name in names if not re.search(rf"\b{name}\b", code)]
    assert not missing, f"exported by {module}, named on no page: {missing}"


def test_contributing_states_the_worker_limit_of_the_xdist_defaults() -> None:
    """CONTRIBUTING.md said 'one pytest-xdist worker per core'; the suite's xdist defaults cap them
    (maxprocesses 8: each worker imports torch, Lightning and transformers, ~1 GB). They were addopts
    in pyproject.toml until s48g moved them to tests/conftest.py (``-p no:xdist`` was a usage error)."""
    conftest = (ROOT / "tests" / "conftest.py").read_text(encoding="utf-8")
    limit = re.search(r'^XDIST_DEFAULTS = \{.*"maxprocesses": (\d+)', conftest, re.M)
    assert limit is not None
    page = " ".join((ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8").split())
    assert f"one pytest-xdist worker per core, at most {limit.group(1)} (`XDIST_DEFAULTS`" in page
