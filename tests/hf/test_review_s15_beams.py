"""Review s15: beam search through innerloop's state (``InnerloopCache.reorder_cache`` and the model's
``_reorder_cache``, with the state's ``index_select``), and a cache made under ``torch.inference_mode``
passed to ``generate()``."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

SHAPES = {"hidden_size": 16, "num_heads": 2, "num_layers": 2, "intermediate_size": 32, "window": 5}
KINDS = {
    "ttt_linear": {"ttt": {"mini_batch_size": 4}},
    "ttt_mlp": {"ttt": {"inner_model": "mlp", "mini_batch_size": 4}},
    "attention": {"mixer": "attention"},
    "e2e": {"mixer": "e2e", "e2e": {"chunk_size": 4}},
}
PROMPT = torch.tensor([list(b"abcdef"), list(b"012345")])
BEAMS = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 3, "do_sample": False}


def model_of(kind: str) -> InnerloopForCausalLM:
    """A hidden-16 float64 model of ``kind``, weights scaled so that the beams' scores are well apart."""
    torch.manual_seed(0)
    model = InnerloopForCausalLM(InnerloopConfig(model={**SHAPES, **KINDS[kind]})).eval().double()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.mul_(5.0)
    return model


def beam_search(model: InnerloopForCausalLM, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences and their scores of a beam search on :data:`PROMPT`."""
    options = {**BEAMS, **options}
    out = model.generate(PROMPT, return_dict_in_generate=True, output_scores=True, **options)
    return out.sequences, out.sequences_scores


@pytest.mark.parametrize(
    "kind",
    [k if k != "ttt_mlp" else pytest.param(k, marks=pytest.mark.slow) for k in KINDS],
    # reason (ttt_mlp): the first call of the MLP kernels in a process checks them, ~2 s on a CPU
)
def test_beam_search_with_the_cache_gives_the_sequences_of_beam_search_without(kind: str) -> None:
    model = model_of(kind)
    sequences, scores = beam_search(model, use_cache=True)
    expected, expected_scores = beam_search(model, use_cache=False)
    assert torch.equal(sequences, expected)
    assert (scores - expected_scores).abs().max().item() <= 1e-9


def test_a_cache_passed_to_beam_search_is_repeated_for_the_beams_and_left_as_it_was() -> None:
    model = model_of("ttt_linear")
    expected, expected_scores = beam_search(model, use_cache=True)
    cache = model(PROMPT[:, :4]).cache
    sequences, scores = beam_search(model, cache=cache)
    assert torch.equal(sequences, expected) and (scores - expected_scores).abs().max().item() <= 1e-9
    assert cache.state.batch_size == 2 and cache.seq_length == 4
    samples = {"do_sample": True, "num_return_sequences": 3, "max_new_tokens": 3}  # repeated the same way
    torch.manual_seed(1)
    expected = model.generate(PROMPT, **samples)
    torch.manual_seed(1)
    assert torch.equal(model.generate(PROMPT, cache=cache, **samples), expected)


@pytest.mark.parametrize("kind", ["ttt_linear", "attention"])
def test_the_beams_are_really_reordered(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the reorder (each row keeping its own state) the scores change: the checks above can
    fail."""
    model = model_of(kind)
    _, right = beam_search(model, max_new_tokens=4)
    monkeypatch.setattr(InnerloopForCausalLM, "_reorder_cache", lambda self, cache, beam_idx: cache)
    _, wrong = beam_search(model, max_new_tokens=4)
    assert (wrong - right).abs().max().item() > 1e-3


def test_reorder_cache_keeps_the_rows_given_in_place() -> None:
    model = model_of("ttt_linear")
    with torch.no_grad():
        full = model(PROMPT).logits
        cache = model(PROMPT[:, :4]).cache
        cache.reorder_cache(torch.tensor([1, 1, 0]))
        assert cache.state.batch_size == 3 and cache.fingerprint is not None
        logits = model(PROMPT[torch.tensor([1, 1, 0]), 4:], cache=cache).logits
    assert (logits - full[torch.tensor([1, 1, 0]), 4:]).abs().max().item() <= 1e-12
    with pytest.raises(ValueError, match=r"holds row 3, outside the state's batch of 3 sequences"):
        cache.reorder_cache(torch.tensor([3]))


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")  # transformers 5 prefers cache=
def test_a_cache_made_under_inference_mode_continues_in_generate() -> None:
    """MED-1: ``generate()`` runs under no_grad; a full-attention cache made (and decoded) under
    inference_mode lives in an inference tensor, which is copied rather than written there."""
    model = model_of("attention")
    with torch.inference_mode():
        cache = model(PROMPT[:, :4]).cache
        cache = model(PROMPT[:, 4:5], cache=cache).cache
    expected = model.generate(PROMPT, max_new_tokens=3, do_sample=False)
    assert torch.equal(
        model.generate(PROMPT, past_key_values=cache, max_new_tokens=3, do_sample=False), expected
    )


def test_a_cache_saves_and_loads_with_torch_load_defaults_and_deep_copies() -> None:
    """LOW-3: ``torch.load`` (weights_only=True by default) of a saved cache, and ``copy.deepcopy`` of one
    made without autograd, continue the sequence."""
    model = model_of("attention")
    with torch.no_grad():
        full = model(PROMPT).logits
        cache = model(PROMPT[:, :3]).cache
        cache = model(PROMPT[:, 3:4], cache=cache).cache  # decoded: the keys live in a room
    buffer = io.BytesIO()
    torch.save(cache, buffer)
    buffer.seek(0)
    for copied in (torch.load(buffer), copy.deepcopy(cache)):
        with torch.no_grad():
            logits = model(PROMPT[:, 4:], cache=copied).logits
        assert (logits - full[:, 4:]).abs().max().item() <= 1e-12
