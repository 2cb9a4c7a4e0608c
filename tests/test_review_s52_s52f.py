"""Review s52f: the command line's numbers read by the rules of the config's overrides and of the Python API.

- An integer option (``--tokens``, ``--seq-len``, ``--seed``, ``--resamples``, ``--budget``, ``--vocab-size``,
  ...) took what Python's ``int()`` takes: ``--tokens ５`` (a full-width digit) and ``--seq-len ٣`` (an
  Arabic-Indic one) ran as 5 and 3, and ``007`` as 7, while the same text in an override
  (``trainer.max_steps=５``) is refused: one rule now, the override's (ASCII digits, an optional sign,
  ``_`` between digit groups, no leading zero). A float option (``--temperature``) likewise (``０.５``).
- ``--temperature -inf`` (or ``-1e3``) said "expected one argument": argparse took the value for an option.
- ``--seed`` took [0, 2**63) while ``compare(seed=...)`` and torch's generator take [-2**63, 2**64): the one
  range of torch's seeds now, read by every caller from :data:`innerloop.core.functional.TORCH_SEEDS`.
"""

from __future__ import annotations

import pytest

from innerloop.cli import _parser, main
from innerloop.config.load import ConfigError, load_config
from innerloop.train.bootstrap import checked_seed


def _error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"innerloop {command}: error: "), captured.err
    return lines[0]


# (the command line before the option, the option): every integer option of every command
INTEGER_OPTIONS = [
    (["generate", "ck.safetensors"], "--tokens"),
    (["generate", "ck.safetensors"], "--top-k"),
    (["generate", "ck.safetensors"], "--seed"),
    (["eval", "ck.safetensors"], "--seq-len"),
    (["eval", "ck.safetensors"], "--batch-size"),
    (["eval", "ck.safetensors"], "--batches"),
    (["compare", "a.safetensors", "b.safetensors"], "--seq-len"),
    (["compare", "a.safetensors", "b.safetensors"], "--resamples"),
    (["compare", "a.safetensors", "b.safetensors"], "--seed"),
    (["params"], "--budget"),
    (["tokenizer", "train", "x.txt"], "--vocab-size"),
]
NOT_PLAIN_INTEGERS = ["５", "٣", "1٣", "007", "0x10", "1e3", "1.0", "1__0", "_1", ""]


@pytest.mark.parametrize("text", NOT_PLAIN_INTEGERS)
@pytest.mark.parametrize(("before", "option"), INTEGER_OPTIONS, ids=lambda x: str(x))
def test_an_integer_option_refuses_what_an_override_refuses(capsys, before, option, text) -> None:
    """Unicode digits, a leading zero, hexadecimal: refused by an integer override, and by every integer
    option with the option's name, the text given and what is valid (exit 2, one line)."""
    with pytest.raises(ConfigError, match="not a decimal integer|given no value"):
        load_config("tiny", [f"trainer.max_steps={text}"])
    command = " ".join(before[:2] if before[0] == "tokenizer" else before[:1])
    assert main([*before, option, text]) == 2
    line = _error_line(capsys, command)
    assert f"argument {option}: must be an integer" in line and f"got {text!r}" in line
    assert "ASCII digits" in line


@pytest.mark.parametrize(("text", "value"), [("1_0", 10), ("+2", 2), ("-0", 0), (" 3 ", 3), ("0", 0)])
def test_an_integer_option_takes_what_an_override_takes(text, value) -> None:
    """``_`` between digit groups, a sign, spaces around: the override's rule, the same value."""
    run, _ = load_config("tiny", [f"trainer.diagnostics_batches={text}"])
    assert run.trainer.diagnostics_batches == value
    assert _parser().parse_args(["generate", "ck", "--tokens", text]).tokens == value


@pytest.mark.parametrize("text", ["０.５", "٠.5", "0x1p-3", "1e", "", "0.5.1"])
def test_a_float_option_refuses_what_an_override_refuses(capsys, text) -> None:
    with pytest.raises(ConfigError, match="not a decimal number|given no value"):
        load_config("tiny", [f"optim.lr={text}"])
    assert main(["generate", "ck.safetensors", "--temperature", text]) == 2
    line = _error_line(capsys, "generate")
    assert "argument --temperature: must be a finite number >= 0" in line and f"got {text!r}" in line


@pytest.mark.parametrize("text", ["-inf", "-1e3", "-1E-3", "-.5", "-nan", "-Infinity"])
def test_a_negative_float_is_judged_not_taken_for_an_option(capsys, text) -> None:
    """``--temperature -inf`` said 'expected one argument': argparse read -inf as an option."""
    assert main(["generate", "ck.safetensors", "--temperature", text]) == 2
    line = _error_line(capsys, "generate")
    assert f"argument --temperature: must be a finite number >= 0, got {text!r}" in line


@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 2**63, 2**64 - 1])
def test_the_cli_seed_takes_torchs_seeds_as_the_python_api_does(seed) -> None:
    """``compare(seed=...)`` takes [-2**63, 2**64) (torch's generator's seeds); ``--seed`` took [0, 2**63)."""
    assert checked_seed(seed) == seed
    for before in (["generate", "ck"], ["compare", "a", "b"]):
        assert _parser().parse_args([*before, "--seed", str(seed)]).seed == seed


@pytest.mark.parametrize("seed", [-(2**63) - 1, 2**64, 10**30])
def test_the_cli_seed_refuses_what_the_python_api_refuses(capsys, seed) -> None:
    with pytest.raises(ValueError, match=r"must be an integer in \[-2\*\*63, 2\*\*64\)"):
        checked_seed(seed)
    for before in (["generate", "ck"], ["compare", "a", "b"]):
        assert main([*before, "--seed", str(seed)]) == 2
        line = _error_line(capsys, before[0])
        assert f"argument --seed: must be an integer in [-2**63, 2**64), got '{seed}'" in line


@pytest.mark.parametrize("text", ["-007", "-5x", "-1e", "-.5.5"])
def test_a_malformed_negative_number_is_judged_by_its_option(capsys, text) -> None:
    assert main(["generate", "ck.safetensors", "--tokens", text]) == 2
    line = _error_line(capsys, "generate")
    assert f"argument --tokens: must be an integer >= 0, got {text!r}" in line


# -- one range per parameter, whichever caller --------------------------------------------------------------


def test_the_run_seed_and_recall_pairs_have_one_range_each() -> None:
    """``seed`` and ``data.recall.num_pairs`` were each defined twice (the config's table and the data
    modules' constant): equal today, free to drift apart. The config's table reads the one definition."""
    from innerloop.config.schema import FIELD_BOUNDS
    from innerloop.data.recall import RECALL_PAIRS_BOUNDS
    from innerloop.train.data import SEED_BOUNDS

    assert FIELD_BOUNDS["seed"] is SEED_BOUNDS
    assert FIELD_BOUNDS["data.recall.num_pairs"] is RECALL_PAIRS_BOUNDS


@pytest.mark.parametrize(
    ("argument", "key"),
    [
        ("lr", "optim.lr"),
        ("weight_decay", "optim.weight_decay"),
        ("min_lr", "optim.min_lr"),
        ("max_steps", "trainer.max_steps"),
        ("num_position_buckets", "trainer.num_position_buckets"),
        ("diagnostics_batches", "trainer.diagnostics_batches"),
    ],
)
def test_the_lightning_module_reads_the_config_ranges(argument, key) -> None:
    """``LanguageModelModule(max_steps=10**400)`` was taken (its own ``>= 1``) while
    ``trainer.max_steps`` is refused past 2**53 (a step count float64 holds exactly)."""
    from innerloop.config.schema import FIELD_BOUNDS
    from innerloop.train.module import _NUMBER_ARGUMENTS

    assert _NUMBER_ARGUMENTS[argument][1] is FIELD_BOUNDS[key]


def test_tokenizer_vocab_size_option_reads_the_trainers_range(capsys) -> None:
    """``--vocab-size`` wrote its own 258, and no upper bound (train_bpe's 2**24 said it, as vocab_size)."""
    from innerloop.data.tokenizer import MAX_TRAINED_VOCAB

    too_many = str(MAX_TRAINED_VOCAB + 1)
    assert main(["tokenizer", "train", "x.txt", "--out", "t.json", "--vocab-size", too_many]) == 2
    line = _error_line(capsys, "tokenizer train")
    assert f"argument --vocab-size: must be an integer in [258, {MAX_TRAINED_VOCAB}]" in line


# -- --resume reads its checkpoint once ---------------------------------------------------------------------


@pytest.fixture
def small_checkpoint(tmp_path):
    import torch

    from innerloop.train import save_checkpoint

    path = tmp_path / "last.safetensors"
    save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 4}, path)
    return path


def _counting_reads(monkeypatch) -> list[str]:
    import innerloop.train.checkpoint as checkpoint_module

    reads: list[str] = []
    real = checkpoint_module.load_checkpoint

    def counted(path, *args, **kwargs):
        reads.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "load_checkpoint", counted)
    return reads


def test_the_checkpoint_a_resume_read_is_not_read_again(monkeypatch, small_checkpoint) -> None:
    """``--resume`` read last.safetensors in its checks, then Lightning read it again (a 307 MB one:
    5.2 s + 9.4 s). The read handed over is taken once, for that file; the next load reads the file."""
    from innerloop.checkpoints import load_checkpoint
    from innerloop.train.checkpoint import SafetensorsCheckpointIO, checkpoint_stamp

    stamp = checkpoint_stamp(small_checkpoint)
    checked = load_checkpoint(small_checkpoint)
    reads = _counting_reads(monkeypatch)
    io = SafetensorsCheckpointIO()
    io.hand_over(small_checkpoint, checked, stamp)
    assert io.load_checkpoint(small_checkpoint, map_location=lambda storage, location: storage) is checked
    assert reads == []
    again = io.load_checkpoint(small_checkpoint)  # taken once
    assert reads == [str(small_checkpoint)] and again is not checked and again["global_step"] == 4


def test_a_checkpoint_changed_since_it_was_read_is_read_again(monkeypatch, small_checkpoint) -> None:
    import pickle

    import torch

    from innerloop.checkpoints import load_checkpoint
    from innerloop.train import save_checkpoint
    from innerloop.train.checkpoint import SafetensorsCheckpointIO, checkpoint_stamp

    io = SafetensorsCheckpointIO()
    io.hand_over(small_checkpoint, load_checkpoint(small_checkpoint), checkpoint_stamp(small_checkpoint))
    assert pickle.loads(pickle.dumps(io))._handed_over is None  # a spawned process reads the file itself
    save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 5}, small_checkpoint)
    reads = _counting_reads(monkeypatch)
    assert io.load_checkpoint(small_checkpoint)["global_step"] == 5
    assert reads == [str(small_checkpoint)]
    other = small_checkpoint.with_name("other.safetensors")  # another file than the one handed over
    save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 6}, other)
    io.hand_over(small_checkpoint, load_checkpoint(small_checkpoint), checkpoint_stamp(small_checkpoint))
    assert io.load_checkpoint(other)["global_step"] == 6


@pytest.mark.parametrize(
    ("override", "key", "kind"),
    [
        ("model.hidden_size.x=8", "model.hidden_size", "int"),
        ("seed.x=1", "seed", "int"),
        ("model.ttt.base_lr.x=1", "model.ttt.base_lr", "float"),
        ("out_dir.x=3", "out_dir", "str"),
        ("model.hidden_size.=8", "model.hidden_size", "int"),
    ],
)
def test_a_key_below_a_value_is_named_so(capsys, override, key, kind) -> None:
    """``model.hidden_size.x=8`` said omegaconf's "Value '{'x': 8}' of type 'DictConfig' could not be
    converted to Integer": now that the key holds one value, not a section with keys."""
    assert main(["params", override]) == 2
    line = _error_line(capsys, "params")
    assert (
        f"config key {key!r} in override {override!r}: {key} takes one value ({kind}), not a mapping" in line
    )
    assert "DictConfig" not in line
