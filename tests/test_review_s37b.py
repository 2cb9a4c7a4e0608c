"""Review s37b: training, data and no-lost-work (issues 3, 9, 11), as a demanding user would use them."""

from __future__ import annotations

import pytest

from innerloop.config import load_config
from innerloop.config.load import ConfigError
from innerloop.models import ModelConfig
from innerloop.train.module import LanguageModelModule
from innerloop.train.schedules import make_schedule

SMALL = ModelConfig(hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        # wsd's decay starting inside the warm-up: lr dropped from its peak to 0.2 lr in one step at step 900
        # (the config refuses warmup_fraction + decay_fraction > 1; from Python it was taken without a word)
        (
            {"schedule": "wsd", "warmup_steps": 900, "decay_steps": 500, "max_steps": 1000},
            "warmup_steps=900 + decay_steps=500 must be <= max_steps=1000",
        ),
    ],
)
def test_module_refuses_a_wsd_decay_inside_its_warmup(arguments, message):
    with pytest.raises(ValueError) as caught:
        LanguageModelModule(SMALL, **arguments)
    assert message in str(caught.value)


def test_module_keeps_a_schedule_that_fits():
    module = LanguageModelModule(SMALL, schedule="wsd", warmup_steps=500, decay_steps=500, max_steps=1000)
    assert module.hparams.warmup_steps == 500
    # a warm-up longer than the run stays a warning (test_s34_boundaries), its decay never reached
    LanguageModelModule(SMALL, schedule="wsd", warmup_steps=100, decay_steps=10, max_steps=40)


def test_schedule_of_a_huge_step_count_is_a_number():
    """10**400 warm-up steps: OverflowError 'int too large to convert to float' in configure_optimizers."""
    for name in ("cosine", "linear", "constant", "wsd"):
        schedule = make_schedule(
            name, 10**400, 10**401, 1e-3, 0.0, decay_steps=10**400 if name == "wsd" else 0
        )
        assert schedule(0) == 1e-3 * (1 / 10**400) and schedule(10**400) == 1e-3


@pytest.mark.parametrize(
    ("key", "value"),
    [
        # each crashed `innerloop train` with a bare traceback: OverflowError in the schedule,
        # OverflowError in Lightning's device parser, ValueError in torch.set_num_threads
        ("trainer.max_steps", 10**30),
        ("trainer.devices", 10**30),
        ("trainer.threads", 10**30),
    ],
)
def test_config_bounds_step_device_and_thread_counts(key, value):
    with pytest.raises(ConfigError) as caught:
        load_config("tiny", [f"{key}={value}"])
    said = str(caught.value)
    assert key in said and str(value) in said and "must be in [" in said


@pytest.mark.parametrize("command", ["eval", "compare"])
@pytest.mark.parametrize("option", ["--seq-len", "--batch-size", "--batches"])
def test_cli_window_sizes_have_an_upper_bound(command, option, tmp_path, capsys):
    """eval --batch-size 10**30: 'Stop argument for islice() must be ...'; --batches 10**30: a data
    module's 'batch_size=2e30 must be in [1, 16777216]': tracebacks (rc 1) on the user's input."""
    from innerloop.cli import main

    checkpoint = str(tmp_path / "last.safetensors")
    models = [checkpoint] if command == "eval" else [checkpoint, checkpoint]
    assert main([command, *models, option, str(10**30)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and option in err and "must be an integer in [1, " in err, err


def test_windows_to_score_are_bounded_with_the_default_batch_size():
    """--batches 2**24 alone: the run's batch size times it reached a data module as batch_size=2**25."""
    from innerloop.data.text import DataError
    from innerloop.train.data import checked_window_sizes
    from innerloop.train.run import default_window_count

    with pytest.raises(DataError, match=r"batches=16777216 x batch_size=2 = 33554432 windows to score"):
        default_window_count(2, 2**24)
    assert default_window_count(2, 2**23) == 2**24
    with pytest.raises(
        ValueError, match=r"batch_size=1000000000000000000000000000000 must be in \[1, 16777216\]"
    ):
        checked_window_sizes(batch_size=10**30, batches=None)


def _one_file_module(path):
    from innerloop.train.data import TextDataModule

    module = TextDataModule([str(path)], seq_len=8, batch_size=2, val_fraction=0.25, val_batches=1)
    module.setup("fit")
    return module


@pytest.mark.parametrize(
    ("change", "says"),
    [(b"more text. " * 20, "train on text it validated on"), (None, "validate on text it trained on")],
)
def test_resuming_a_one_file_run_whose_file_changed_length_is_refused(tmp_path, change, says):
    """One data file appended to: its last val_fraction moved, and the resumed run trained on the text it
    had validated on, with a warning only (several files whose split moved are refused: check_split_unchanged)."""
    from innerloop.data.text import DataError

    path = tmp_path / "corpus.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 20)
    state = _one_file_module(path).state_dict()
    assert isinstance(state["validation_cut"], int)
    path.write_bytes(path.read_bytes() + change if change else path.read_bytes()[:-200])
    module = _one_file_module(path)
    with pytest.raises(
        DataError, match=f"started at token {state['validation_cut']} and now starts at .*{says}"
    ):
        module.load_state_dict(state)


def test_resuming_a_one_file_run_whose_file_is_unchanged_goes_on(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 20)
    state = _one_file_module(path).state_dict()
    _one_file_module(path).load_state_dict(state)  # no error
    from innerloop.train.data import TextDataModule

    assert "validation_cut" not in TextDataModule(seq_len=8, batch_size=2).state_dict()  # not set up: none


def test_evaluating_a_one_file_run_whose_file_was_shortened_is_refused(tmp_path):
    """Its last val_fraction, the windows eval and compare score by default, moved into the text the run
    trained on: the perplexity was a training one, reported as held-out."""
    import torch

    from innerloop.checkpoints import save_checkpoint
    from innerloop.data.text import DataError
    from innerloop.train.run import _run_validation_windows

    path = tmp_path / "corpus.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 20)
    cut = _one_file_module(path).validation_cut
    checkpoint = tmp_path / "last.safetensors"
    save_checkpoint(
        {"state_dict": {"w": torch.zeros(1)}, "TextDataModule": {"validation_cut": cut}}, checkpoint
    )
    overrides = [f"data.paths=[{path}]", "data.val_fraction=0.25", "data.seq_len=8", "data.batch_size=2"]
    run = load_config("tiny", [*overrides, "data.val_batches=1"])[0]
    assert len(_run_validation_windows(run, checkpoint, 8, None, None).inputs) == 2  # unchanged: scored
    path.write_bytes(path.read_bytes() + b"appended, never trained on. " * 5)
    assert len(_run_validation_windows(run, checkpoint, 8, None, None).inputs) == 2  # still held out
    path.write_bytes(path.read_bytes()[:-400])
    with pytest.raises(
        DataError, match=f"started at token {cut} and now starts at token .*inside the text the run"
    ):
        _run_validation_windows(run, checkpoint, 8, None, None)


def _hf_state(path, monkeypatch):
    """An HFDataModule on ``path`` (streamed: no Arrow cache written), set up, and its checkpoint state."""
    from types import SimpleNamespace

    from innerloop.train.data import HFDataModule

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    module = HFDataModule([str(path)], streaming=True, seq_len=4, batch_size=1, val_batches=2)
    module.setup()
    module.trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=1, world_size=1, global_rank=0)
    return module, module.state_dict()


def _documents(path, texts):
    import json

    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.mark.slow  # ~0.55 s: three loads of a local JSONL file by the datasets library
def test_resuming_hf_data_whose_documents_moved_sides_is_refused(tmp_path, monkeypatch):
    """A document inserted at the start renumbered every later one: the held-out every-10th documents
    moved into training (the resumed run trained on what it had validated on) with a warning only."""
    from innerloop.data.text import DataError

    path = tmp_path / "docs.jsonl"
    texts = [f"{i} is document number {i}" for i in range(40)]
    _documents(path, texts)
    _, state = _hf_state(path, monkeypatch)
    _documents(path, [*texts, "appended at the end: every number and side kept"])
    _hf_state(path, monkeypatch)[0].load_state_dict(state)  # goes on (a warning about the files)
    _documents(path, ["inserted first", *texts])
    module, _ = _hf_state(path, monkeypatch)
    with pytest.raises(DataError, match="would train on documents it validated on"):
        module.load_state_dict(state)


@pytest.mark.slow  # ~0.8 s alone: four loads of a local JSONL file by the datasets library
def test_evaluating_hf_data_whose_documents_moved_sides_is_refused(tmp_path, monkeypatch):
    """eval and compare of an hf run's own validation windows, after a document was inserted first:
    they scored documents the run had trained on, as held-out."""
    import torch

    from innerloop.checkpoints import save_checkpoint
    from innerloop.data.text import DataError
    from innerloop.train.run import _run_validation_windows

    path = tmp_path / "docs.jsonl"
    texts = [f"{i} is document number {i}" for i in range(40)]
    _documents(path, texts)
    _, state = _hf_state(path, monkeypatch)
    checkpoint = tmp_path / "last.safetensors"
    save_checkpoint({"state_dict": {"w": torch.zeros(1)}, "HFDataModule": state}, checkpoint)
    data = [
        "data.name=hf",
        f"data.paths=[{path}]",
        "data.streaming=true",
        "data.seq_len=4",
        "data.batch_size=1",
    ]
    run = load_config("tiny", [*data, "data.val_batches=2"])[0]
    assert len(_run_validation_windows(run, checkpoint, 4, None, None).inputs) == 2
    _documents(path, ["inserted first", *texts])
    with pytest.raises(DataError, match="they would score documents the run trained on"):
        _run_validation_windows(run, checkpoint, 4, None, None)


@pytest.mark.parametrize(
    ("key", "limit"), [("trainer.accumulate_grad_batches", 2**24), ("trainer.num_nodes", 2**16)]
)
def test_lightning_counts_have_an_upper_limit(key, limit):
    """accumulate_grad_batches=10**30: 'OverflowError: int too big to convert' in Lightning's first step."""
    with pytest.raises(ConfigError, match=rf"{key}={10**30} must be in \[1, {limit}\] "):
        load_config("tiny", [f"{key}={10**30}"])
    load_config("tiny", [f"{key}={limit}"])
