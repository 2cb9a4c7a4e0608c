"""TTT-E2E fixes of review s13: a checkpoint's inner lr as documented, a non-finite outer progress
refused, a warning for training on one chunk, the suffix rounding and build-time fields."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from innerloop.checkpoints import load_weights
from innerloop.models import E2EConfig, ModelConfig, build_model
from innerloop.models.e2e import E2ELM, OneChunkTrainingWarning, num_suffix_blocks

VOCAB = 11
DOCS = Path(__file__).resolve().parents[2] / "docs" / "e2e.md"


def tiny_config(num_layers: int = 2, window: int = 4, **e2e) -> ModelConfig:
    """Blocks of width 8, window 4 (unless given), chunks of 4 tokens, no inner-lr warm-up unless asked."""
    options = {"chunk_size": 4, "suffix_fraction": 0.5, "inner_lr_warmup_fraction": 0.0, **e2e}
    return ModelConfig(
        mixer="e2e",
        vocab_size=VOCAB,
        hidden_size=8,
        num_layers=num_layers,
        num_heads=2,
        intermediate_size=12,
        window=window,
        init_std=0.3,
        e2e=E2EConfig(**options),
    )


def tiny_model(**e2e) -> E2ELM:
    torch.manual_seed(0)
    return build_model(tiny_config(**e2e)).double()


def random_ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def docs_text() -> str:
    """docs/e2e.md with its whitespace runs (line breaks) made single spaces."""
    return " ".join(DOCS.read_text(encoding="utf-8").split())


# --------------------------------------------------------------------------------------------------
# MED-1: a loaded checkpoint runs at the inner lr of its last training step, as the docs say
# --------------------------------------------------------------------------------------------------


def inner_lrs_used(model: E2ELM, monkeypatch: pytest.MonkeyPatch, ids: torch.Tensor) -> list[float]:
    """The lr of every inner step of a ``no_grad`` forward of ``ids`` (the update rule's ``lr``)."""
    used: list[float] = []
    step = model.update_rule.step

    def recording_step(fast, losses, lr, max_grad_norm, create_graph):
        used.append(lr)
        return step(fast, losses, lr, max_grad_norm, create_graph)

    monkeypatch.setattr(model.update_rule, "step", recording_step)
    with torch.no_grad():
        model(ids)
    monkeypatch.undo()
    return used


@pytest.mark.slow  # reason: 5-15 s, a 4-step Lightning training run of the E2E model through the CLI
def test_a_checkpoint_saved_during_the_warm_up_runs_at_the_inner_lr_the_docs_give(
    tmp_path, monkeypatch
) -> None:
    from innerloop.checkpoints import load_model
    from innerloop.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200, encoding="utf-8")
    out = tmp_path / "run"
    args = ["train", "--config", "e2e-tiny", f"data.paths=[{text}]", "data.seq_len=32", "data.batch_size=2"]
    args += ["data.val_batches=1", "model.hidden_size=16", "model.num_heads=2", "model.intermediate_size=32"]
    args += ["model.e2e.chunk_size=8", "model.e2e.inner_lr_warmup_fraction=0.9", "trainer.max_steps=4"]
    args += ["trainer.val_every=4", "trainer.progress_bar=false", f"out_dir={out}"]
    assert main(args) == 0
    model = load_model(out / "last.safetensors")
    e2e = model.config.e2e
    assert (e2e.inner_lr, e2e.inner_lr_start) == (1.0, 0.1)  # the preset's, which the docs use
    # The docs: a finished run is saved at progress 1, the full inner lr (its last step counted done, as
    # the official schedule counts it); a checkpoint after 2 of its 4 steps: progress 0.5, inner lr 0.6.
    assert float(model.outer_progress) == 1.0
    ids = torch.randint(256, (1, 40), generator=torch.Generator().manual_seed(0))
    used = inner_lrs_used(model, monkeypatch, ids)
    assert len(used) == 4 and used == pytest.approx([1.0] * 4)  # chunks 0-3 train (4 is pending)
    model.set_outer_progress(2 / 4)
    assert inner_lrs_used(model, monkeypatch, ids) == pytest.approx([0.6] * 4)


def test_the_docs_say_what_inner_lr_a_loaded_checkpoint_runs_at() -> None:
    docs = docs_text()
    assert "a model that is not being trained uses the full `inner_lr`" not in docs
    for claim in (
        "a loaded checkpoint keeps it",
        "a finished run is saved at 1, the full `inner_lr`",
        "`max_steps=4 model.e2e.inner_lr_warmup_fraction=0.9` a checkpoint after 2 steps: progress 0.5, "
        "inner lr 0.6",
        "call `model.set_outer_progress(1.0)` after loading",
    ):
        assert claim in docs


def test_the_inner_lr_of_a_step_during_the_default_warm_up_is_the_one_the_docs_give() -> None:
    model = tiny_model(inner_lr=1.0, inner_lr_start=0.1, inner_lr_warmup_fraction=0.1)
    model.set_outer_progress(500 / 10_000)  # a checkpoint written after step 500 of 10 000
    assert model.inner_lr() == pytest.approx(0.55)
    assert "progress 0.05, inner lr `0.1 + 0.9 * 0.05 / 0.1 = 0.55`" in docs_text()
    model.set_outer_progress(1 / 2)  # a finished 2-step run: past the default warm-up
    assert model.inner_lr() == 1.0


# --------------------------------------------------------------------------------------------------
# LOW-1: a non-finite outer progress is refused, in set_outer_progress and in a checkpoint
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("progress", [float("nan"), float("inf"), float("-inf")])
def test_set_outer_progress_refuses_a_non_finite_progress(progress) -> None:
    model = tiny_model(inner_lr_warmup_fraction=0.5)
    model.set_outer_progress(0.25)
    with pytest.raises(ValueError, match=rf"progress={progress} must be a finite number in \[0, 1\]"):
        model.set_outer_progress(progress)
    assert float(model.outer_progress) == 0.25  # unchanged


def test_set_outer_progress_clamps_a_finite_value_and_refuses_a_string() -> None:
    model = tiny_model(inner_lr_warmup_fraction=0.5)
    model.set_outer_progress(1.5)
    assert float(model.outer_progress) == 1.0
    model.set_outer_progress(-0.5)
    assert float(model.outer_progress) == 0.0
    with pytest.raises(TypeError, match=r"progress must be a number in \[0, 1\], got '0.5' \(str\)"):
        model.set_outer_progress("0.5")


class Wrapper(torch.nn.Module):
    """The model under ``model.``, as the LightningModule holds it."""

    def __init__(self, model: E2ELM):
        super().__init__()
        self.model = model


@pytest.mark.parametrize("stored", [float("nan"), float("inf"), -0.5, 1.5])
def test_a_checkpoint_whose_outer_progress_is_not_in_0_1_is_refused_naming_the_buffer(stored) -> None:
    model = tiny_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["outer_progress"] = torch.tensor(stored, dtype=torch.float64)
    loaded = tiny_model()
    wanted = rf"buffer outer_progress .* is {stored}; it must be a finite number in \[0, 1\]"
    with pytest.raises(ValueError, match=wanted):
        load_weights(loaded, weights)  # what innerloop.checkpoints.load_model loads with
    assert float(loaded.outer_progress) == 1.0
    nested = {f"model.{k}": v for k, v in weights.items()}
    with pytest.raises(ValueError, match=r"buffer model\.outer_progress "):  # a training checkpoint's
        Wrapper(tiny_model()).load_state_dict(nested)


@pytest.mark.parametrize("stored", [float("nan"), -0.5])
def test_a_model_whose_buffer_holds_a_progress_outside_0_1_refuses_to_run(stored) -> None:
    """A buffer filled around load_state_dict (Hugging Face's from_pretrained assigns tensors)."""
    model = tiny_model(inner_lr_warmup_fraction=0.5)
    with torch.no_grad():
        model.outer_progress.fill_(stored)
        with pytest.raises(
            ValueError, match=rf"buffer outer_progress .* is {stored}; it must be .* \[0, 1\]"
        ):
            model(random_ids(1, 9))


def test_a_checkpoint_with_a_progress_in_0_1_loads_it() -> None:
    model = tiny_model(inner_lr_warmup_fraction=0.5)
    model.set_outer_progress(0.125)
    loaded = tiny_model(inner_lr_warmup_fraction=0.5)
    loaded.load_state_dict(model.state_dict())
    assert float(loaded.outer_progress) == 0.125


# --------------------------------------------------------------------------------------------------
# LOW-2: training on sequences of at most one chunk warns once
# --------------------------------------------------------------------------------------------------


def one_chunk_warnings(model: E2ELM, length: int, grad: bool = True) -> list[str]:
    """The :class:`OneChunkTrainingWarning` messages of a forward of ``length`` tokens."""
    with warnings.catch_warnings(record=True) as caught, torch.set_grad_enabled(grad):
        warnings.simplefilter("always")
        model(random_ids(2, length))
    return [str(w.message) for w in caught if issubclass(w.category, OneChunkTrainingWarning)]


@pytest.mark.parametrize("chunk_targets", ["next_token", "within_chunk"])
def test_training_on_sequences_of_at_most_one_chunk_warns_once(chunk_targets) -> None:
    model = tiny_model(chunk_targets=chunk_targets)  # chunk_size 4, in train mode
    (message,) = one_chunk_warnings(model, 4)
    assert "sequences of 4 tokens (data.seq_len in `innerloop train`)" in message
    assert "model.e2e.chunk_size=4" in message
    assert "exactly the sliding-window baseline (model.e2e.test_time_training=false)" in message
    # a first piece that short is no mistake where later pieces continue from its state (s37d)
    assert "a sequence fed in pieces, each continuing from the returned state, is trained" in message
    assert one_chunk_warnings(model, 3) == []  # once per model


def test_no_warning_where_an_inner_step_reaches_the_loss_or_nothing_trains() -> None:
    assert one_chunk_warnings(tiny_model(), 5) == []  # longer than a chunk
    assert one_chunk_warnings(tiny_model(), 4, grad=False) == []  # evaluation, generation
    assert one_chunk_warnings(tiny_model().eval(), 4) == []
    assert one_chunk_warnings(tiny_model(test_time_training=False), 4) == []  # the baseline itself
    model = tiny_model()
    _, state = model(random_ids(2, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(random_ids(2, 2), state)  # a continued sequence (a split forward), not a new one
    assert not [w for w in caught if issubclass(w.category, OneChunkTrainingWarning)]


def test_with_one_chunk_the_outer_loss_and_gradient_are_the_baselines() -> None:
    """What the warning says: no inner step reaches the outer loss (all blocks suffix: same RoPE)."""
    torch.manual_seed(0)
    config = tiny_config(num_layers=1, suffix_fraction=1.0)
    ttt = build_model(config).double()
    plain = build_model(tiny_config(num_layers=1, suffix_fraction=1.0, test_time_training=False)).double()
    plain.load_state_dict(ttt.state_dict())
    ids = random_ids(2, 4)
    results = []
    for model in (ttt, plain):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OneChunkTrainingWarning)
            logits, _ = model(ids)
        results.append((logits, *torch.autograd.grad(logits.square().sum(), list(model.parameters()))))
    for a, b in zip(*results, strict=True):  # the same products, batched per sequence or not: to rounding
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# LOW-3: the suffix rounding is documented; build-time fields cannot change on a built model
# --------------------------------------------------------------------------------------------------


def test_the_suffix_size_rounds_half_to_even_as_documented() -> None:
    sizes = {n: num_suffix_blocks(tiny_config(num_layers=n, suffix_fraction=0.25)) for n in (6, 10, 14, 18)}
    assert sizes == {6: 2, 10: 2, 14: 4, 18: 4}
    assert "10 layers give 2 suffix blocks (2.5 -> 2) and 14 layers give 4 (3.5 -> 4)" in docs_text()
    doc = " ".join((num_suffix_blocks.__doc__ or "").split())
    assert "10 layers give 2 suffix blocks (2.5 -> 2) and 14 layers give 4 (3.5 -> 4)" in doc


@pytest.mark.parametrize(("field", "new"), [("e2e.suffix_fraction", 1.0), ("window", 2)])
def test_a_build_time_field_changed_on_a_built_model_is_refused_by_name(field, new) -> None:
    model = tiny_model()
    owner, name = (model.config.e2e, "suffix_fraction") if field.startswith("e2e.") else (model.config, field)
    built = getattr(owner, name)
    ids = random_ids(1, 9)
    with torch.no_grad():
        before, _ = model(ids)
    setattr(owner, name, new)
    wanted = rf"model\.{field} was {built!r} when this model was built and is now {new!r}"
    with pytest.raises(ValueError, match=wanted), torch.no_grad():
        model(ids)
    setattr(owner, name, built)  # set back: the model runs as before
    with torch.no_grad():
        after, _ = model(ids)
    assert torch.equal(before, after)
