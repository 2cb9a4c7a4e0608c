"""Review s28: TTT-E2E's official training-loss weighting (``outer_loss``) and the run-time plugin checks
of the scan. Each test is one finding of /work/notes/review_s28.md."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from innerloop.config.load import load_config, read_run_config, save_config
from innerloop.core.functional import chunk_mean_cross_entropy, mean_scored_cross_entropy


@pytest.fixture(scope="module", autouse=True)
def _config_loader_warm(tmp_path_factory) -> None:
    """The first full config load of a process imports Lightning to check the trainer's arguments (about
    3 s on 2 cores), once for every test that loads a config: paid here, not in the first test's call."""
    load_config("e2e-tiny", [f"out_dir={tmp_path_factory.mktemp('warm') / 'run'}"])


def _older_e2e_run_config(tmp_path: Path, drop: str = "outer_loss") -> Path:
    """A run's saved config.yaml of an E2E run written before ``model.e2e.<drop>`` existed (a saved
    config holds every key of the innerloop that wrote it; this one lacks that option's line)."""
    _, cfg = load_config("e2e-tiny", [f"out_dir={tmp_path / 'run'}"])
    path = save_config(cfg, tmp_path / "config.yaml")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if not line.strip().startswith(f"{drop}:")))
    return path


def test_older_e2e_run_config_reads_with_the_loss_it_was_trained_on(tmp_path):
    """An E2E run written before outer_loss existed trained on the per-token mean: its saved config.yaml
    is read so (its checkpoint is, EARLIER_E2E_DEFAULTS), else --resume refused it whatever was given:
    without an override the checkpoint's 'token_mean' differed from the config's 'chunk_mean', and with
    model.e2e.outer_loss=token_mean the override differed from the saved config ("cannot change")."""
    saved = _older_e2e_run_config(tmp_path)
    assert read_run_config(saved).model.e2e.outer_loss == "token_mean"
    run, _ = load_config(str(saved), [], out_dir=str(tmp_path / "run"))  # how --resume reads it
    assert run.model.e2e.outer_loss == "token_mean"
    run, _ = load_config(str(saved), ["model.e2e.outer_loss=chunk_mean"], out_dir=str(tmp_path / "run"))
    assert run.model.e2e.outer_loss == "chunk_mean"  # an override still applies (and is then checked)
    # a config file of the user's own, not a saved run's, takes today's default
    assert load_config(str(saved))[0].model.e2e.outer_loss == "chunk_mean"
    # a saved config that names the option keeps it
    full = save_config(load_config("e2e-tiny")[1], tmp_path / "full.yaml")
    assert read_run_config(full).model.e2e.outer_loss == "chunk_mean"


def test_training_docs_say_which_weighting_train_loss_is_on():
    """docs/training.md described the training loss as the per-token mean for every model; a TTT-E2E
    run's logged train_loss is the per-chunk, per-sequence mean (outer_loss: chunk_mean) and its val_loss
    the per-token mean, which a reader comparing the two curves must know."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text(encoding="utf-8")
    section = text[text.index("## Training (`innerloop.train`)") :]
    section = section[: section.index("- Validation logs")]
    assert "model.e2e.outer_loss" in section and "train_loss" in section and "val_loss" in section


@pytest.mark.parametrize(
    ("overrides", "warned"),
    [
        (
            ["data.seq_len=130"],
            "the last chunk's 2 target(s) of each window weigh as much as a whole chunk's 16",
        ),
        (["data.seq_len=128"], None),
        (["data.seq_len=130", "model.e2e.outer_loss=token_mean"], None),
        (["data.name=recall"], "the recall task's length 95"),  # 4 * num_pairs 8 + gap 64 - 1
        (["data.name=recall", "data.recall.gap=97"], None),  # 128
    ],
)
def test_chunk_mean_on_windows_not_a_multiple_of_the_chunk_is_warned_about(tmp_path, overrides, warned):
    """chunk_mean's mean over chunks weighs a window's short last chunk as a whole one: with seq_len 130
    and chunk 16 the last 2 targets weighed 8x each, without a word (the official lengths are multiples)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config("e2e-tiny", [*overrides, f"out_dir={tmp_path / 'run'}"])
    records = [w for w in caught if "chunk_mean" in str(w.message)]
    messages = [str(w.message) for w in records]
    if warned is None:
        assert messages == []
    else:
        assert (
            len(messages) == 1 and warned in messages[0] and "model.e2e.outer_loss=token_mean" in messages[0]
        )
        assert records[0].filename == __file__  # said where the config was loaded
    logits = torch.zeros(1, 130, 3, requires_grad=True)
    chunk_mean_cross_entropy(logits, torch.zeros(1, 130, dtype=torch.long), 16, -100).backward()
    assert logits.grad[0, -1, 0] / logits.grad[0, 0, 0] == pytest.approx(8.0)  # the weighting warned about


def test_e2e_training_loss_refuses_an_outer_loss_that_is_not_a_choice():
    """E2ELM.training_loss reads model.config.e2e.outer_loss at each call (docs/e2e.md: the options may be
    changed on a built model); anything but 'token_mean', a typo such as 'token-mean' included, trained on
    chunk_mean without a word. It is refused as forward refuses it, naming the key and the choices."""
    from innerloop.models import ModelConfig, build_model

    config = {"mixer": "e2e", "vocab_size": 11, "hidden_size": 16, "num_layers": 2, "num_heads": 2}
    model = build_model(ModelConfig.from_dict({**config, "intermediate_size": 24, "window": 8}))
    logits, targets = torch.randn(2, 8, 11), torch.randint(11, (2, 8))
    model.config.e2e.outer_loss = "token-mean"
    with pytest.raises(
        ValueError, match=r"model\.e2e\.outer_loss='token-mean' is not one of \['chunk_mean', 'token_mean'\]"
    ):
        model.training_loss(logits, targets, -100)
    model.config.e2e.outer_loss = "token_mean"
    assert model.training_loss(logits, targets, -100).item() == pytest.approx(
        mean_scored_cross_entropy(logits, targets, -100).item()
    )
