"""Review s54r: the leftovers of session 54's reviews."""

import pytest
import torch

from innerloop.models import E2EConfig, ModelConfig, NonFiniteInnerStepError, build_model
from tests.test_review_s54_s54i import _NaNGradientLoss  # an inner loss whose gradient turns NaN


def _e2e(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        mixer="e2e",
        window=8,
        hidden_size=16,
        num_heads=2,
        num_layers=2,
        e2e=E2EConfig(chunk_size=4, **options),
    )
    return build_model(config).eval()


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_e2e_huge_inner_lr_is_named_at_the_chunk_outside_training(clip) -> None:
    """model.e2e.inner_lr=1e30 gave inf/NaN logits with no error in eval: the first step's fast weights
    were huge but finite, the next chunk's logits NaN, and the plugin check blames only a plugin's NaN
    from finite inputs. Now the chunk, the fast weight and the inner rate are named."""
    model = _e2e(inner_lr=1e30, inner_grad_clip=clip)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad(), pytest.raises(NonFiniteInnerStepError) as caught:
        model(ids)
    said = str(caught.value)
    assert "inner step 2 of this call" in said
    assert "blocks.1.prime." in said
    assert "lower model.e2e.inner_lr (configured 1e+30)" in said


def test_e2e_non_finite_input_hidden_states_do_not_blame_the_inner_lr() -> None:
    """NaN hidden states entering the suffix (an outer divergence) are their own message, not the inner rate."""
    model = _e2e()
    with torch.no_grad():
        model.embed.weight.fill_(float("nan"))
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad(), pytest.raises(NonFiniteInnerStepError) as caught:
        model(ids)
    said = str(caught.value)
    assert "inner step 1 of this call" in said and "hidden states entering the suffix" in said
    assert "lower model.e2e.inner_lr" not in said


def test_e2e_finite_run_raises_nothing() -> None:
    model = _e2e()
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        assert bool(torch.isfinite(model(ids)[0]).all())


def test_the_lr_cap_says_why_it_holds_in_a_64_true_run_too() -> None:
    """optim.lr=1e39 was refused as "inf in float32, the weights' dtype", untrue in a 64-true run
    (float64 weights). The cap is one number for every precision and now says so."""
    from innerloop.config.load import validate_run_config
    from innerloop.config.schema import OptimConfig, RunConfig

    with pytest.raises(ValueError) as caught:
        validate_run_config(RunConfig(optim=OptimConfig(lr=1e39, weight_decay=0.0)))
    said = str(caught.value)
    assert "optim.lr=1e+39" in said
    assert "but 64-true" in said and "one cap for every precision" in said


@pytest.mark.slow  # ~1 s: a module built and one training step
def test_the_divergence_advice_names_the_configured_base_lr_during_its_warm_up(
    fresh_global_registry, monkeypatch
) -> None:
    """With optim.ttt_base_lr_warmup on, "lower model.ttt.base_lr (now X)" showed the warm-up's current
    layer.base_lr, not the configured model.ttt.base_lr the user would lower."""
    import innerloop
    from innerloop.models import TTTConfig
    from innerloop.train.module import LanguageModelModule, NonFiniteLayerOutputError

    innerloop.register_inner_loss(_NaNGradientLoss())
    monkeypatch.setattr(_NaNGradientLoss, "armed", True)
    torch.manual_seed(0)
    ttt = TTTConfig(mini_batch_size=8, inner_loss=_NaNGradientLoss.name, base_lr=2.0)
    config = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, ttt=ttt)
    module = LanguageModelModule(config, max_steps=2, warmup_steps=0)
    for layer in module.modules():  # as TTTBaseLRWarmup sets it, part-way through its warm-up
        if hasattr(layer, "plugin_nan_diagnosis"):
            layer.base_lr = 0.5
    ids = torch.randint(0, 64, (2, 17))
    with pytest.raises(NonFiniteLayerOutputError) as err:
        module.training_step((ids[:, :-1], ids[:, 1:]), 0)
    assert "lower model.ttt.base_lr (configured 2; 0.5 now, in its warm-up)" in str(err.value), str(err.value)


@pytest.mark.slow  # ~0.5 s: a BPE tokenizer trained
def test_tokenizer_train_warnings_name_its_path_argument_as_its_errors_do(tmp_path, caplog, capsys) -> None:
    """`innerloop tokenizer train PATH`'s data-walk warnings (a broken link below PATH) said "data.paths
    entry", an option the command does not have; only its errors were translated to PATH."""
    import logging

    from innerloop.cli import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("some words to learn merges from " * 40)
    (data / "b.txt").symlink_to(tmp_path / "gone.txt")
    out = str(tmp_path / "tok")
    with caplog.at_level(logging.WARNING, logger="innerloop.data.text"):
        assert main(["tokenizer", "train", "--vocab-size", "300", "--out", out, str(data)]) == 0
    (warning,) = [r.getMessage() for r in caplog.records if "leads to no file" in r.getMessage()]
    assert warning.startswith(f"PATH {str(data)!r}: the link"), warning
    assert "data.paths" not in warning
    status = main(["tokenizer", "train", "--vocab-size", "300", "--out", out + "2", str(data / "b.txt")])
    err = capsys.readouterr().err
    assert status == 2 and f"PATH {str(data / 'b.txt')!r} is a link to" in err and "data.paths" not in err, (
        err
    )


def test_resolve_files_names_data_paths_by_default(tmp_path) -> None:
    from innerloop.data.text import DataError, resolve_files

    with pytest.raises(DataError, match=r"^data\.paths entry '.*nope' matches no file"):
        resolve_files([str(tmp_path / "nope")])
    with pytest.raises(DataError, match=r"^--data '.*nope' matches no file"):
        resolve_files([str(tmp_path / "nope")], "--data")


def _made_up_comparison(seq_lens: tuple[int, ...], windows: int = 8):
    """A comparison of two made-up models (no weights: the outputs never read them) at ``seq_lens``."""
    from pathlib import Path

    from innerloop.train import compare as compare_module
    from innerloop.train.compare import ComparedModel, Comparison, LengthResult

    models = [
        ComparedModel(f"m{i}", Path(f"/runs/m{i}/last.safetensors"), None, 100, None, None) for i in range(2)
    ]
    comparison = Comparison(models, 0, [], {}, 0.95, 50, 0, "made-up windows")
    generator = torch.Generator().manual_seed(0)
    for seq_len in seq_lens:
        buckets = [(0, seq_len // 2), (seq_len // 2, seq_len)]
        counts = torch.full((windows, 2), seq_len / 2, dtype=torch.float64)
        sums = counts * (3 + torch.rand(2, windows, 2, generator=generator, dtype=torch.float64))
        compare_module._add_length(comparison, LengthResult(seq_len, buckets, sums, counts, windows))
    return comparison


def test_a_rerun_with_fewer_lengths_removes_the_partials_it_holds_and_keeps_the_others(
    tmp_path, monkeypatch
) -> None:
    """An interrupted `innerloop compare --seq-len 8 16 32 64` left compare-<id>-partial.* after T=8 and
    after T=8,16,32; a rerun with --seq-len 8 16 finished and removed neither (it wrote no partial of its
    own). The T=8 partial is now removed (the whole comparison holds it); the T=8,16,32 one, which holds
    T=32, is the user's only comparison at 32 and stays."""
    from dataclasses import replace

    from innerloop.train import compare as compare_module
    from innerloop.train.compare import LengthProgress, write_comparison

    monkeypatch.setattr(compare_module, "checkpoint_identity", str)  # made-up models: no files to hash
    monkeypatch.setattr(
        compare_module, "plot_comparison", lambda path, comparison: path.write_bytes(b"png") and path
    )
    earlier = _made_up_comparison((8, 16, 32, 64))
    held = write_comparison(replace(earlier, lengths=earlier.lengths[:1]), tmp_path, partial="3 lengths more")
    kept = write_comparison(replace(earlier, lengths=earlier.lengths[:3]), tmp_path, partial="1 length more")
    whole = _made_up_comparison((8, 16))
    written = write_comparison(whole, tmp_path)
    LengthProgress(tmp_path).finish(whole)
    assert not any(path.exists() for path in held), held
    assert all(path.exists() for path in (*kept, *written))


def test_a_stop_after_the_scores_rename_still_counts_them_as_kept(tmp_path, monkeypatch) -> None:
    """A Ctrl-C in the directory fsync after the scores file's rename left the file but did not count it:
    the stop message said one fewer kept scores file than there were (none here: no message at all)."""
    from innerloop.data import atomic
    from innerloop.train.compare import LengthProgress

    def interrupted(folder) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "fsync_directory", interrupted)
    progress = LengthProgress(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        progress.finished(_made_up_comparison((8,)), "k8", remaining=1)
    assert progress.scores_path("k8").exists()
    where = progress.where()
    assert where is not None and "the scores of 1 finished length are kept" in where, where


def test_e2e_fast_weights_grown_in_an_earlier_call_still_blame_the_inner_lr() -> None:
    """The growth was measured from the call's start: a second call whose state carried the fast weights
    an earlier call grew (1e30 inner rate) blamed the model's weights and optim.lr. It is measured from
    the model's own fast weights now. (Within-chunk targets: a first call of a whole chunk trains on it
    and scores nothing after it, which s54v's check of a chunk only scored would stop at.)"""
    model = _e2e(inner_lr=1e30, chunk_targets="within_chunk")
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        _, state = model(ids[:, :4])  # trains the first chunk (its weights grow), nothing pending
        with pytest.raises(NonFiniteInnerStepError) as caught:
            model(ids[:, 4:], state)  # trains the second chunk: step 1 of this call
    said = str(caught.value)
    assert "inner step 1 of this call" in said and "lower model.e2e.inner_lr" in said, said
    assert "optim.lr" not in said, said
