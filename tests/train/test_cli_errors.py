"""Every user error of the CLI is one line on stderr, ``innerloop <command>: error: ...`` naming the
key and what is valid, with exit status 2 and no traceback; `innerloop eval` never replaces a run's
outputs."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from innerloop.cli import USER_ERRORS, main
from innerloop.config.load import numeric_fields
from innerloop.config.schema import FIELD_BOUNDS
from innerloop.train import LanguageModelModule, save_checkpoint
from innerloop.train.checkpoint import checkpoint_identity
from innerloop.train.plots import read_loss_by_position_csv

SMALL = {"hidden_size": 16, "num_heads": 2, "num_layers": 2, "intermediate_size": 32}
TEXT = "def f(x):\n    return x + 1\n" * 40  # 1120 bytes


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as training leaves it: checkpoint, config and the loss-by-position outputs."""
    folder = tmp_path_factory.mktemp("run")
    module = LanguageModelModule(model=SMALL, num_position_buckets=4, seq_len=32)
    tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    save_checkpoint(tree, folder / "last.safetensors")
    (folder / "config.yaml").write_text("data:\n  seq_len: 32\n")
    (folder / "loss_by_position.csv").write_text("start,end,loss\n0,32,1.000000\n")
    (folder / "loss_by_position.png").write_bytes(b"\x89PNG training plot")
    (folder / "code.py").write_text(TEXT)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("files")
    (folder / "short.txt").write_text("tiny")
    (folder / "one.txt").write_text(TEXT)
    (folder / "a_file").write_text("not a folder")
    (folder / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    return {
        "short": folder / "short.txt",
        "one": folder / "one.txt",
        "a_file": folder / "a_file",
        "dir": folder,
    }


def _fill(arguments: list[str], files: dict[str, Path]) -> list[str]:
    """The arguments with ``{short}``, ``{one}``, ``{a_file}`` and ``{dir}`` replaced by real paths."""
    filled = []
    for argument in arguments:
        for name, path in files.items():
            argument = argument.replace(f"{{{name}}}", str(path))
        filled.append(argument)
    return filled


def _one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err and "Traceback" not in captured.out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"innerloop {command}: error: "), err
    return lines[0]


TRAIN_ERRORS = [
    # (overrides, what the line must name: the key and what is valid)
    (["out_dir={a_file}"], ["out_dir=", "is not a directory"]),
    (["out_dir={a_file}/run"], ["out_dir=", "its parent", "is a file"]),
    (["optim.lr=nan"], ["optim.lr=nan", "finite number > 0"]),
    (["optim.lr=inf"], ["optim.lr=inf", "finite number > 0"]),
    (["optim.lr=-1e-3"], ["optim.lr=-0.001", "> 0"]),
    (["optim.beta1=2"], ["optim.beta1=2.0", "in [0, 1)"]),
    (["optim.beta2=1"], ["optim.beta2=1.0", "in [0, 1)"]),
    (["optim.weight_decay=-0.1"], ["optim.weight_decay=-0.1", ">= 0"]),
    (["data.paths=[{short}]"], ["the training text has 4 bytes", "data.seq_len + 1 = 129"]),
    (["data.paths=[{one}]", "data.val_fraction=0"], ["data.val_fraction=0", "data.val_fraction > 0"]),
    (["data.paths=[{one}]", "data.val_fraction=0.01"], ["validation text", "data.val_fraction"]),
    (["data.paths=[{dir}/nothing*.txt]"], ["data.paths entry", "matches no file"]),
    (["data.name=recall", "data.recall.num_pairs=0"], ["data.recall.num_pairs=0", "in [1, 64]"]),
    (["data.name=recall", "data.recall.gap=-1"], ["data.recall.gap=-1", "in [0, 1073741569]"]),
    (["trainer.accelerator=tpu"], ["trainer.accelerator='tpu'", "available here: ['auto', 'cpu'"]),
    (["trainer.accelerator=gpuu"], ["trainer.accelerator='gpuu'", "valid: ['auto', 'cpu', 'cuda'"]),
    (["trainer.strategy=fsdp"], ["trainer.strategy='fsdp'", "Lightning cannot run this combination", "GPU"]),
    (["trainer.strategy=single_xla"], ["trainer.strategy='single_xla' is not valid", "'ddp_spawn'"]),
    (["model.vocab_size=100"], ["model.vocab_size=100", "must be >= 256"]),
    (["data.name=recall", "model.vocab_size=100"], ["model.vocab_size=100", "must be >= 192"]),
    (["model.ttt=5"], ["'model.ttt'", "is a section", "'mini_batch_size'"]),
    (["data=3"], ["'data'", "is a section", "'seq_len'"]),
    (["trainer.max_steps=-1"], ["trainer.max_steps=-1", "in [1, 9007199254740992]"]),
    (["data.batch_size=0"], ["data.batch_size=0", "in [1, 16777216]"]),
    (["data.batch_size=1000000000"], ["data.batch_size=1000000000", "in [1, 16777216]", "held in memory"]),
    (["data.seq_len=0"], ["data.seq_len=0", "in [1, 1073741824]"]),
    (["optim.min_lr=1", "optim.lr=0.003"], ["optim.min_lr=1 must be <= optim.lr=0.003"]),
    (["trainer.devices=0"], ["trainer.devices=0", "in [1, 65536]"]),
    (["model.norm_eps=0"], ["model.norm_eps=0.0", "in [1.1754943508222875e-38, 1)"]),
    (["model.ttt.mini_batch_size=0"], ["model.ttt.mini_batch_size=0", "in [1, 65536]"]),
    (["model.ttt.kernel=fast"], ["model.ttt: kernel='fast' is not a kernel for", "compiled_torch_linear"]),
    (["model.ttt.kernel=cpu_ttt_mlp"], ["kernel='cpu_ttt_mlp' is not a kernel for (inner_model='linear'"]),
    (["model.e2e.suffix_fraction=0"], ["model.e2e.suffix_fraction=0.0", "in (0, 1]"]),
    (["seed=-1"], ["seed=-1", "in [0, 4294967295]"]),
    (["model.dropout=0.1"], ["unknown config key 'model.dropout'", "valid keys here"]),
    (["optimizer.lr=1"], ["unknown config key 'optimizer'", "valid keys here"]),
    (["optim.lr=fast"], ["'optim.lr'", "'fast'", "expected float"]),
    (["model.hidden_size=16.7"], ["'model.hidden_size'", "expected int"]),
    (["trainer.max_steps=[1"], ["trainer.max_steps=[1", "cannot be parsed"]),
    (["--config", "huge"], ["--config 'huge'", "presets: ["]),
    (["optim.lr=${nope}"], ["config key 'optim.lr'", "Interpolation key 'nope' not found"]),
    (["--config", "{dir}/binary.yaml"], ["binary.yaml' cannot be read as UTF-8 YAML"]),
]


@pytest.mark.parametrize(("arguments", "expected"), TRAIN_ERRORS, ids=lambda a: " ".join(a)[:60])
def test_a_bad_train_config_is_one_line_and_exit_2(capsys, files, arguments, expected) -> None:
    assert main(["train", *_fill(arguments, files)]) == 2
    line = _one_error_line(capsys, "train")
    for part in expected:
        assert part in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_one_line(capsys) -> None:
    assert main(["train", "trainer.accelerator=cuda"]) == 2
    assert "trainer.accelerator='cuda' is not available on this machine; available here: ['auto', 'cpu'" in (
        _one_error_line(capsys, "train")
    )


@pytest.mark.parametrize("accelerator", ["mps", "auto"])
def test_a_run_on_apple_mps_is_one_line(capsys, monkeypatch, accelerator) -> None:
    """MPS has no float64, which the metrics' sums and TTT-E2E's schedule state are: named, or picked
    by ``auto`` on a Mac, it failed at the first metric update with torch's bare TypeError."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert main(["train", f"trainer.accelerator={accelerator}"]) == 2
    line = _one_error_line(capsys, "train")
    assert f"trainer.accelerator={accelerator!r} would train on Apple's MPS" in line
    assert "use trainer.accelerator=cpu" in line


def test_an_unwritable_out_dir_is_one_line(capsys, tmp_path, monkeypatch) -> None:
    # (a permission test with chmod cannot fail for root, so the permission answer is what is faked)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    assert main(["train", f"out_dir={tmp_path}/run"]) == 2
    line = _one_error_line(capsys, "train")
    assert f"out_dir='{tmp_path}/run' cannot be written: '{tmp_path}' is not writable" in line


EVAL_ERRORS = [
    (["--seq-len", "0"], ["argument --seq-len", "must be an integer >= 1, got '0'"]),
    (["--seq-len", "abc"], ["argument --seq-len", "got 'abc'"]),
    (["--batches", "-1"], ["argument --batches", ">= 1, got '-1'"]),
    (["--batch-size", "0"], ["argument --batch-size", ">= 1, got '0'"]),
    (["--data", "{dir}/missing.txt"], ["--data '", "missing.txt' matches no file"]),
    # no paths (a glob or variable that expanded to nothing) would have scored the run's own windows
    (["--data"], ["argument --data: expected at least one argument"]),
    (["--data", "{short}", "--seq-len", "16"], ["short.txt' has 5 bytes", "--seq-len + 1 = 17"]),
    (["--out", "{a_file}"], ["--out=", "is not a directory"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
]
if Path("/proc/self").is_dir():  # a directory nobody (not even root) can create files in
    EVAL_ERRORS.append((["--out", "/proc/x"], ["--out='/proc/x' cannot be written", "give another --out"]))


@pytest.mark.parametrize(("arguments", "expected"), EVAL_ERRORS, ids=lambda a: " ".join(a)[:60])
def test_bad_eval_arguments_are_one_line_and_exit_2(capsys, run_dir, files, arguments, expected) -> None:
    assert main(["eval", str(run_dir / "last.safetensors"), *_fill(arguments, files)]) == 2
    line = _one_error_line(capsys, "eval")
    for part in expected:
        assert part in line


@pytest.mark.parametrize(
    ("checkpoint", "problem"),
    [
        ("{dir}", "is a directory; give the checkpoint file in it"),
        ("{a_file}", "is not a readable innerloop checkpoint"),
        ("{dir}/none.safetensors", "does not exist"),
    ],
)
def test_a_bad_checkpoint_is_one_line_for_eval_and_generate(capsys, files, checkpoint, problem) -> None:
    (path,) = _fill([checkpoint], files)
    for command in ("eval", "generate"):
        assert main([command, path]) == 2
        line = _one_error_line(capsys, command)
        assert repr(path) in line and problem in line


GENERATE_ERRORS = [
    (["--temperature", "-1"], ["argument --temperature", "must be a finite number >= 0, got '-1'"]),
    (["--temperature", "nan"], ["argument --temperature", "got 'nan'"]),
    (["--temperature", "inf"], ["argument --temperature", "got 'inf'"]),
    (["--top-k", "0"], ["argument --top-k", "must be an integer >= 1, got '0'"]),
    (["--top-k", "-3"], ["argument --top-k", "got '-3'"]),
    (["--top-p", "1.5"], ["argument --top-p", "must be a number in [0, 1], got '1.5'"]),
    (["--top-p", "-0.1"], ["argument --top-p", "got '-0.1'"]),
    (["--top-p", "nan"], ["argument --top-p", "got 'nan'"]),
    (["--tokens", "-1"], ["argument --tokens", ">= 0, got '-1'"]),
    # torch's seeds, as compare(seed=...) takes them (s52f: --seed took [0, 2**63))
    (["--seed", str(-(2**63) - 1)], ["argument --seed", f"in [-2**63, 2**64), got '{-(2**63) - 1}'"]),
    (["--seed", "99999999999999999999999"], ["argument --seed", "in [-2**63, 2**64), got '9999"]),
    (["--seed", str(2**64)], ["argument --seed", "in [-2**63, 2**64)"]),
    (["--seed", "1.5"], ["argument --seed", "in [-2**63, 2**64), got '1.5'"]),
    (["--prompt", ""], ["--prompt must not be empty"]),
]


@pytest.mark.parametrize(("arguments", "expected"), GENERATE_ERRORS, ids=lambda a: " ".join(a)[:60])
def test_bad_generate_arguments_are_one_line_and_exit_2(capsys, run_dir, arguments, expected) -> None:
    assert main(["generate", str(run_dir / "last.safetensors"), *arguments]) == 2
    line = _one_error_line(capsys, "generate")
    for part in expected:
        assert part in line


@pytest.mark.slow  # 0.5 s: generation through the CLI
def test_a_prompt_that_is_not_utf8_is_read_as_bytes(capsys, run_dir) -> None:
    """The model is byte-level: a prompt of any bytes is generated from (shown with U+FFFD)."""
    prompt = os.fsdecode(b"ab\xff\xfe")  # how Python hands such command-line bytes to the program
    assert main(["generate", str(run_dir / "last.safetensors"), "--prompt", prompt, "--tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("ab\ufffd\ufffd")


def test_every_numeric_config_field_has_a_range() -> None:
    assert sorted(numeric_fields()) == sorted(FIELD_BOUNDS)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # ~0.6 s: three evaluations
def test_eval_writes_its_own_files_and_never_replaces_the_runs(capsys, run_dir) -> None:
    training = {p: _sha256(p) for p in run_dir.iterdir() if p.is_file()}
    checkpoint = str(run_dir / "last.safetensors")
    code = str(run_dir / "code.py")
    common = ["--batches", "1", "--batch-size", "2"]
    assert main(["eval", checkpoint, "--data", code, "--seq-len", "16", *common]) == 0
    assert main(["eval", checkpoint, "--data", code, "--seq-len", "32", *common]) == 0
    assert (
        main(["eval", checkpoint, "--data", code, "--seq-len", "32", "--batches", "2", "--batch-size", "2"])
        == 0
    )
    capsys.readouterr()
    assert {p: _sha256(p) for p in training} == training  # the run's own files, byte for byte
    written = sorted(p.name for p in run_dir.iterdir() if p not in training)
    assert len(written) == 9 and all(name.startswith("eval_last-") for name in written)  # .csv, .png, .md
    assert all("_code-" in name for name in written)
    csvs = sorted(run_dir.glob("eval_*_T16_n2.csv")) + sorted(run_dir.glob("eval_*_T32_n*.csv"))
    assert len(csvs) == 3
    assert read_loss_by_position_csv(csvs[0])[0] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert read_loss_by_position_csv(csvs[1])[0][-1] == (24, 32)


@pytest.mark.slow  # two fresh interpreters importing torch and Lightning (a few seconds each)
def test_the_console_entry_point_reports_user_errors_in_one_line(run_dir) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    bad = subprocess.run(
        [sys.executable, "-m", "innerloop.cli", "train", "optim.lr=nan"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "innerloop train: error: optim.lr=nan (float) must be a finite number > 0 and <= 3.4028234663852886e+38 "
        "(a larger one is inf in float32, the weights' or the optimizer state's dtype in every trainer.precision "
        "but 64-true; one cap for every precision, so that a config valid in one is valid in all (no rate near "
        "it trains))"
    ]  # one line, naming the key, the value and the range (its cap since s54d/s54r)
    prompt = b"x\xffy"  # not UTF-8: passed to the program as bytes
    ok = subprocess.run(
        [sys.executable.encode(), b"-m", b"innerloop.cli", b"generate", str(run_dir / "last.safetensors").encode(),
         b"--prompt", prompt, b"--tokens", b"2"],
        capture_output=True, env=env,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr.decode(errors="replace")
    assert ok.stdout.startswith("x\ufffdy".encode())


@pytest.mark.slow  # a whole (tiny) Lightning run: about 5 s
def test_bf16_mixed_validation_perplexity_is_exp_of_the_loss(tmp_path):
    """Under bf16-mixed the logits are bf16; the metrics are accumulated in float32, so the printed
    perplexity is exp(printed loss) to float32 precision (it was 244.692 for a loss of 5.5051)."""
    import math

    from innerloop.config import load_config
    from innerloop.train import train

    overrides = [
        *(f"model.{k}={v}" for k, v in SMALL.items()),
        "model.ttt.mini_batch_size=8",
        "data.seq_len=32",
        "data.batch_size=2",
        "data.val_batches=2",
        "trainer.val_every=2",
        "trainer.progress_bar=false",
        "trainer.max_steps=2",
        "trainer.precision=bf16-mixed",
        f"out_dir={tmp_path}",
    ]
    run, cfg = load_config("tiny", overrides)
    metrics = train(run, cfg).metrics
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-5)


def _evaluate(capsys, checkpoint: Path, out: Path) -> tuple[str, list[str]]:
    """Evaluate ``checkpoint`` on 2 windows into ``out``: (its printed output, the files in ``out``)."""
    assert main(["eval", str(checkpoint), "--batches", "1", "--batch-size", "2", "--out", str(out)]) == 0
    return capsys.readouterr().out, sorted(p.name for p in out.iterdir())


@pytest.mark.slow  # ~0.4 s: an evaluation through the CLI
def test_eval_takes_seq_len_from_the_checkpoint_not_a_config_beside_it(capsys, run_dir, tmp_path) -> None:
    """A copy of a checkpoint next to another run's config.yaml evaluates at the length it was trained
    with (recorded in its hyperparameters), not the foreign config's."""
    copy = tmp_path / "copy" / "last.safetensors"
    copy.parent.mkdir()
    copy.write_bytes((run_dir / "last.safetensors").read_bytes())
    (copy.parent / "config.yaml").write_text("data:\n  seq_len: 64\n")  # a foreign config
    out = tmp_path / "out"
    out.mkdir()
    printed, files = _evaluate(capsys, copy, out)
    assert "records no training seq_len" not in printed
    assert [f for f in files if f.endswith(".csv")] == [
        f"eval_{checkpoint_identity(copy)}_default-val_T32_n2.csv"
    ]
    assert read_loss_by_position_csv(out / files[0])[0][-1] == (24, 32)


@pytest.mark.slow  # trains a tiny model, then evaluates its checkpoint: 1-1.5 s
def test_eval_of_a_checkpoint_without_its_seq_len_says_which_length_it_used(capsys, tmp_path) -> None:
    module = LanguageModelModule(model=SMALL, num_position_buckets=4)  # as an older innerloop wrote it
    tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 3}
    tree["hyper_parameters"].pop("seq_len")
    checkpoint = save_checkpoint(tree, tmp_path / "old.safetensors")
    printed, files = _evaluate(capsys, checkpoint, tmp_path)
    assert (
        "records no training seq_len (written by an older innerloop, or saved before a training step by a "
        "LanguageModelModule built without seq_len)" in printed
    )
    assert "evaluating at 128 tokens per window; give --seq-len" in printed
    assert f"eval_{checkpoint_identity(checkpoint)}_default-val_T128_n2.csv" in files


@pytest.mark.slow  # two training runs and two evals (~2 s)
def test_evaluations_of_two_checkpoints_never_replace_each_other(capsys, tmp_path) -> None:
    """Two checkpoints of the same name (other runs) in one --out get files of their own; the same
    checkpoint with the same settings again rewrites only its own files."""
    out = tmp_path / "out"
    out.mkdir()
    checkpoints = []
    for run in ("a", "b"):
        torch.manual_seed(ord(run))
        module = LanguageModelModule(model=SMALL, num_position_buckets=4, seq_len=16)
        tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
        (tmp_path / run).mkdir()
        checkpoints.append(save_checkpoint(tree, tmp_path / run / "last.safetensors"))
    _, first = _evaluate(capsys, checkpoints[0], out)
    _, both = _evaluate(capsys, checkpoints[1], out)
    assert len(first) == 3 and len(both) == 6 and set(first) < set(both)
    assert all(re.fullmatch(r"eval_last-[0-9a-f]{8}_default-val_T16_n2\.(csv|png|md)", name) for name in both)
    first_csv = out / next(f for f in first if f.endswith(".csv"))
    before = first_csv.read_bytes()
    _, again = _evaluate(capsys, checkpoints[0], out)
    assert again == both and first_csv.read_bytes() == before


def test_train_overrides_may_come_after_the_flags(capsys, tmp_path) -> None:
    from innerloop.cli import _parse_intermixed, _parser

    args = _parse_intermixed(_parser(), ["train", "out_dir=c2", "--resume", "trainer.max_steps=3100"])
    assert args.resume and args.overrides == ["out_dir=c2", "trainer.max_steps=3100"]
    args = _parse_intermixed(_parser(), ["train", "a=1", "--overwrite", "b=2", "--resume", "c=3"])
    assert args.overrides == ["a=1", "b=2", "c=3"] and args.overwrite and args.resume
    # an override after a flag is applied (here: refused for its value, not as an unknown argument)
    assert main(["train", f"out_dir={tmp_path}/run", "--overwrite", "optim.lr=nan"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    for argv in (["train", "a=1", "--bogus"], ["eval", "ck", "x=1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "unrecognized arguments" in err and len(err.strip().splitlines()) == 1


def test_a_tiny_temperature_generates_the_greedy_text(capsys, run_dir) -> None:
    checkpoint = str(run_dir / "last.safetensors")
    outputs = []
    for temperature in ("0", "1e-40"):
        assert main(["generate", checkpoint, "--tokens", "20", "--temperature", temperature]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


@pytest.mark.slow  # 0.6 s: four generations through the CLI
def test_a_top_p_of_0_generates_the_greedy_text(capsys, run_dir) -> None:
    # the nucleus of one token, the most likely, at any temperature; --top-p 1 cuts nothing (seeded: the
    # same text as no --top-p)
    checkpoint = str(run_dir / "last.safetensors")
    outputs = []
    for options in (["--temperature", "0"], ["--temperature", "2", "--top-p", "0"], [], ["--top-p", "1"]):
        assert main(["generate", checkpoint, "--tokens", "20", *options]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[2] == outputs[3]


@pytest.mark.parametrize(
    ("yaml_text", "kind"), [("just a string\n", "str"), ("- a\n- b\n", "list"), ("3\n", "int")]
)
def test_a_config_file_that_is_not_a_mapping_is_one_line(capsys, tmp_path, yaml_text, kind) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    assert main(["train", "--config", str(config)]) == 2
    line = _one_error_line(capsys, "train")
    assert f"file {str(config)!r} must be a mapping of config sections, got {kind}" in line


def test_every_user_error_the_cli_names_exists():
    # main() recognises user errors by module and class name without importing them (Lightning takes
    # seconds): a renamed class would silently turn its errors into tracebacks
    for module_name, class_name in USER_ERRORS:
        error_class = getattr(importlib.import_module(module_name), class_name)
        assert isinstance(error_class, type) and issubclass(error_class, Exception), (module_name, class_name)


_WITHOUT_LIGHTNING = """
import contextlib, io, json, sys
from innerloop.cli import main

cases, statuses = json.loads(sys.argv[1]), {}
for name, calls in cases.items():  # in order: a case that imported Lightning shows in every case after it
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        codes = [main(arguments) for arguments in calls]
    imported = "lightning" in sys.modules
    statuses[name] = {"codes": codes, "stderr": err.getvalue(), "stdout": out.getvalue(), "lightning": imported}
print(json.dumps(statuses))
"""


@pytest.fixture(scope="module")
def without_lightning(tmp_path_factory) -> dict[str, dict]:
    """The CLI calls of the tests below, run by one fresh interpreter (what is imported is only visible in
    a new process, and each costs seconds of importing torch), each case in its own section: its exit
    statuses, its stdout and stderr, and whether Lightning was imported by the end of it."""
    from innerloop.models import ModelConfig, build_model
    from innerloop.train.module import save_model_checkpoint

    folder = tmp_path_factory.mktemp("without_lightning")
    missing = str(folder / "missing.safetensors")
    good = save_model_checkpoint(
        build_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, vocab_size=256)),
        folder / "good.safetensors",
    )
    bigger = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, vocab_size=256))
    checkpoint = {"hyper_parameters": {"model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2}}}
    checkpoint["state_dict"] = {f"model.{k}": v for k, v in bigger.state_dict().items()}
    wrong = save_checkpoint(checkpoint, folder / "wrong.safetensors")
    cases = {
        "generate": [["generate", missing, "--prompt", "x"], ["generate", str(folder), "--prompt", "x"]],
        "eval": [["eval", missing], ["eval", str(folder)]],
        "generate-reads": [
            ["generate", str(good), "--prompt", "ab", "--tokens", "3"],
            ["generate", str(wrong), "--prompt", "ab"],
        ],
    }
    command = [sys.executable, "-c", _WITHOUT_LIGHTNING, json.dumps(cases)]
    # a hang; three cases' imports on a loaded machine (the 120 s each had before was passed here, at load 25)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    sections = json.loads(result.stdout.splitlines()[-1])
    return {name: {**section, "folder": str(folder)} for name, section in sections.items()}


@pytest.mark.slow  # reason: the fresh interpreter of without_lightning (module fixture, ~4 s)
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_missing_checkpoint_is_reported_before_lightning_is_imported(command, without_lightning):
    # a mistyped path answers in about a second, not after the seconds of importing Lightning
    section = without_lightning[command]
    assert section["codes"] == [2, 2]
    assert not section["lightning"], "the check imported Lightning"
    assert "missing.safetensors' does not exist or is not a file" in section["stderr"]
    folder = section["folder"]
    assert f"checkpoint {folder!r} is a directory; give the checkpoint file in it" in section["stderr"]


@pytest.mark.slow  # reason: the fresh interpreter of without_lightning (module fixture, ~4 s)
def test_generate_reads_a_checkpoint_without_importing_lightning(without_lightning):
    # generate rebuilds the model with innerloop.checkpoints alone; its errors are still user errors
    section = without_lightning["generate-reads"]
    assert section["codes"] == [0, 2]
    assert not section["lightning"], "generate imported Lightning"
    assert section["stdout"].startswith("ab")
    assert "wrong.safetensors' does not fit the model its hyperparameters describe" in section["stderr"]
    assert "Traceback" not in section["stderr"]


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_a_config_file_inside_out_dir_is_never_replaced_by_a_new_run(tmp_path, capsys, flags):
    # the run writes <out_dir>/config.yaml: a hand-written one given as --config must survive
    out = tmp_path / "ud"
    out.mkdir()
    config = out / "config.yaml"
    text = "# my experiment: tuned by hand\nmodel:\n  hidden_size: 64\ntrainer:\n  max_steps: 2\n"
    config.write_text(text)
    assert main(["train", "--config", str(config), f"out_dir={out}", *flags]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is out_dir's config.yaml" in error and "--resume" in error
    assert config.read_text() == text
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("folder", "is a folder, not a config file"),
        ("link", "is a symbolic link to 'gone.yaml', which does not exist"),
    ],
)
def test_a_config_yaml_that_is_no_file_is_one_error_not_a_fallback(
    capsys, run_dir, tmp_path, kind, named
) -> None:
    """eval said there was no config.yaml beside the checkpoint and evaluated the default corpus."""
    (tmp_path / "last.safetensors").write_bytes((run_dir / "last.safetensors").read_bytes())
    if kind == "folder":
        (tmp_path / "config.yaml").mkdir()
    else:
        (tmp_path / "config.yaml").symlink_to("gone.yaml")
    assert main(["eval", str(tmp_path / "last.safetensors"), "--batches", "1"]) == 2
    line = _one_error_line(capsys, "eval")
    assert f"cannot be used to find its run's data: '{tmp_path}/config.yaml' {named}; repair it" in line


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_an_empty_out_is_refused_not_read_as_the_current_directory(capsys, run_dir, command) -> None:
    checkpoint = str(run_dir / "last.safetensors")
    models = [checkpoint] if command == "eval" else [checkpoint, checkpoint]
    assert main([command, *models, "--out", ""]) == 2
    assert _one_error_line(capsys, command).endswith(
        "--out '' is empty: give a path (an empty one would name the current directory)"
    )


@pytest.mark.slow  # ~0.5 s: a conversion and an evaluation
def test_eval_of_a_converted_checkpoint_says_it_records_no_training_seq_len(capsys, tmp_path) -> None:
    """A checkpoint made by `innerloop convert` (a model, no training state) is not called older."""
    from innerloop.models import CausalLM, ModelConfig
    from innerloop.train.module import save_model_checkpoint

    checkpoint = save_model_checkpoint(CausalLM(ModelConfig(**SMALL)), tmp_path / "converted.safetensors")
    printed, files = _evaluate(capsys, checkpoint, tmp_path)
    assert "records no training seq_len (a model that innerloop did not train, e.g. one made by " in printed
    assert "older innerloop" not in printed
    assert f"eval_{checkpoint_identity(checkpoint)}_default-val_T128_n2.csv" in files


def test_a_default_out_inside_the_data_is_named_as_the_default(capsys, run_dir, tmp_path) -> None:
    # A *.safetensors checkpoint inside --data is refused before this check, as weights that would be read
    # as text (s56u): a checkpoint of another name, in a folder of text, gets to it.
    weights = (run_dir / "last.safetensors").read_bytes()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "code.py").write_text(TEXT)
    checkpoint = str(run_dir / "weights.bin")
    Path(checkpoint).write_bytes(weights)
    assert main(["eval", checkpoint, "--data", str(run_dir), "--batches", "1"]) == 2
    line = _one_error_line(capsys, "eval")
    assert f"the default --out (the checkpoint's folder) {str(run_dir)!r} lies inside --data entry" in line
    assert line.endswith("give --out DIR to write the results into another folder, outside the data")
    assert main(["eval", checkpoint, "--data", str(run_dir), "--out", str(run_dir), "--batches", "1"]) == 2
    assert _one_error_line(capsys, "eval").startswith(f"innerloop eval: error: --out {str(run_dir)!r} lies")


def test_a_warning_prints_as_one_line_naming_the_command(capsys, monkeypatch) -> None:
    # not Python's "path:line: UserWarning:" and a line of source (review s18, CLI). pytest records
    # warnings instead of printing them: print them here as Python does, through formatwarning
    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", show)
    before = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["params", "model.hidden_size=32", "model.hidden_size=64"]) == 0
    err = capsys.readouterr().err
    assert "\ninnerloop params: warning: config key 'model.hidden_size' is given twice" in err
    assert "UserWarning" not in err and "cli.py" not in err
    assert warnings.formatwarning is before  # the process's own is back
