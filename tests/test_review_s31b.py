"""Review s31b: black-box checks of issues 3, 5, 10, 11, 14 and 15 with shapes, configs and inputs the
other tests do not use. Kept here: what was wrong (regression tests), and promises no other test
checks (each says which).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from innerloop.cli import main


def test_tokenizer_train_at_257_tokens_is_refused_as_the_vocabulary_size_not_blamed_on_the_text(
    tmp_path: Path, capsys
) -> None:
    # Before: --vocab-size 257 passed the documented range (>= 257) and then always failed with "too
    # little text to learn a single merge ... no pair of bytes inside a word", whatever the corpus
    # (257 = the bytes and end-of-text leaves no room for a merge, which train_bpe requires).
    pytest.importorskip("tokenizers")
    from innerloop.data.tokenizer import TokenizerError, train_bpe

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat, the cat sat on the hat\n" * 20, encoding="utf-8")
    assert main(["tokenizer", "train", "--vocab-size", "257", "--out", str(tmp_path / "t"), str(corpus)]) == 2
    err = capsys.readouterr().err
    assert "--vocab-size: must be an integer >= 258, got '257'" in err and "little text" not in err
    with pytest.raises(TokenizerError, match=r"vocab_size=257 must be >= 258 .*data.tokenizer=bytes"):
        train_bpe([corpus.read_text(encoding="utf-8")], 257)
    assert main(["tokenizer", "train", "--vocab-size", "258", "--out", str(tmp_path / "t"), str(corpus)]) == 0


# --------------------------------------------------------------------------------------------------
# Promises no other test checks
# --------------------------------------------------------------------------------------------------

E2E_DATA = Path(__file__).resolve().parent / "data" / "e2e"


@pytest.mark.slow  # ~0.5 s: two official models, six forwards
@pytest.mark.parametrize("rows", [[1], [1, 0, 1]], ids=["second-row-alone", "rows-repeated"])
def test_official_e2e_logits_hold_for_other_batch_slices_and_prefixes_off_the_chunk_grid(rows) -> None:
    # Issue 15 (logits_ttt_on/off within 1e-4) on batch slices and prefix lengths that end inside a
    # chunk (chunk 16: 1, 23, 127 tokens); tests/interop/test_ttt_e2e.py reads whole batches of
    # 128 tokens (and one 34-token prefix of row 0 for streaming). Logits are causal in the official
    # code (a chunk trains on targets no later than the next chunk's first token), so every prefix of
    # an input has the official logits of those positions.
    import json

    import numpy as np
    import torch
    from safetensors.numpy import load_file

    from innerloop.interop.ttt_e2e import model_from_arrays

    config = json.loads((E2E_DATA / "config.json").read_text(encoding="utf-8"))
    arrays, official = (
        load_file(E2E_DATA / "weights.safetensors"),
        load_file(E2E_DATA / "outputs.safetensors"),
    )
    ids = torch.from_numpy(official["input_ids"][rows])
    for test_time_training, name in ((True, "logits_ttt_on"), (False, "logits_ttt_off")):
        model = model_from_arrays(arrays, config, test_time_training=test_time_training)
        expected = official[name][rows]
        for length in (1, 23, 127):
            with torch.no_grad():
                logits, _ = model(ids[:, :length])
            assert np.abs(logits.numpy() - expected[:, :length]).max() < 1e-4, (name, length)


@pytest.mark.parametrize("mixer", ["linear_attention", "deltanet", "gated_deltanet", "titans"])
def test_no_ttt_makes_the_family_mixers_forget_the_context(mixer) -> None:
    # Issue 14's --no-ttt ("TTT layers: inner lr 0") for the family mixers, which tests/models/
    # test_params.py does not run (mixer='ttt' only): with test-time training off, a prediction no longer
    # depends on tokens further back than the short convolutions reach, and with it on it does.
    import torch

    from innerloop.models import ModelConfig, build_model
    from innerloop.models.ablation import no_test_time_training

    torch.manual_seed(0)
    config = {"mixer": mixer, "hidden_size": 32, "num_heads": 2, "num_layers": 2, "intermediate_size": 48}
    model = build_model(ModelConfig.from_dict(config)).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():  # away from the initialisation's zeros and ones
            parameter.add_(0.05 * torch.randn_like(parameter))
    ids = torch.randint(256, (2, 30), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, :2] = (changed[:, :2] + 7) % 256  # the first two tokens only
    with torch.no_grad():
        on, _ = model(ids)
        on_changed, _ = model(changed)
        with no_test_time_training(model) as switched:
            off, _ = model(ids)
            off_changed, _ = model(changed)
    assert switched == 2
    assert (on[:, 12:] - on_changed[:, 12:]).abs().max() > 1e-3
    assert torch.equal(off[:, 12:], off_changed[:, 12:])


@pytest.mark.slow  # ~2.5 s alone: importing Lightning and building two Trainers
def test_the_training_progress_bar_does_not_print_an_epoch_count_of_minus_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the main job's progress bar read "Epoch 0/-2" (Lightning's rich bar prints max_epochs - 1,
    # and a run's stream is endless, max_epochs=-1). A progress bar the caller gives is kept.
    pytest.importorskip("rich")
    from lightning.pytorch.callbacks import RichProgressBar

    from innerloop.config import load_config
    from innerloop.train import run as run_module
    from innerloop.train.run import build_trainer

    monkeypatch.setattr(run_module, "_rich_bar_shows", lambda: True)  # as on a terminal (s31d: else tqdm's)

    run, _ = load_config("tiny", [f"out_dir={tmp_path}"])
    trainer = build_trainer(run)
    bar = trainer.progress_bar_callback
    bar._trainer = trainer  # what Lightning's setup does
    assert "-2" not in bar._get_train_description(0) and bar._get_train_description(0).strip() == "Training"
    mine = RichProgressBar()
    assert build_trainer(run, callbacks=[mine]).progress_bar_callback is mine


def test_one_element_metric_results_are_0_d_as_their_docstrings_say() -> None:
    """torchmetrics squeezes a one-element ``compute()`` to 0-d: LossByPosition of one bucket and
    InnerLossDiagnostics of one layer say so (the module reshapes them itself, ``_per_item``)."""
    import torch

    from innerloop.train.metrics import InnerLossDiagnostics, LossByPosition

    metric = LossByPosition(num_buckets=1)
    metric.update(torch.tensor([[1.0, 3.0]]), torch.tensor([[True, True]]))
    assert metric.compute().shape == () and metric.compute().reshape(-1).tolist() == [2.0]
    assert "0-d" in LossByPosition.__doc__ and "0-d" in InnerLossDiagnostics.__doc__
    diagnostics = InnerLossDiagnostics(num_layers=1)
    diagnostics.update(0, torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]))
    result = diagnostics.compute()
    assert result["before"].shape == () and float(result["before"]) == 1.5 and float(result["after"]) == 0.5
