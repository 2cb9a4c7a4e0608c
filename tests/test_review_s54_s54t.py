"""Review s54t: the embedding/LM-head re-tie of :class:`~innerloop.models.lm.MaterialisableLM` (s54s)
keeps a tie that was there and makes none that was not: a head a user untied on purpose survives
``.to()`` and a load of its own state dict; a load into a tied model never drops one of two different
tensors silently, and a state dict of only one of the two gives the tied weight its value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from innerloop.models import ModelConfig, build_model


def _tied_model() -> nn.Module:
    config = ModelConfig(
        vocab_size=17, hidden_size=8, num_heads=2, num_layers=1, intermediate_size=12, mixer="attention"
    )
    torch.manual_seed(0)
    return build_model(config)


def _untied_by_hand(model: nn.Module) -> torch.Tensor:
    model.lm_head.weight = nn.Parameter(model.embed.weight.detach() * 3)
    return model.lm_head.weight.detach().clone()


def test_a_head_untied_by_the_user_survives_a_cast() -> None:
    """Seen failing: ``.double()`` made the user's own head the embedding again (its values lost)."""
    model = _tied_model()
    head = _untied_by_hand(model)
    model.double()
    assert model.lm_head.weight is not model.embed.weight
    assert torch.equal(model.lm_head.weight, head.double())


def test_a_head_untied_by_the_user_loads_its_own_state_dict() -> None:
    """Seen failing: the model's own checkpoint refused ('different values') on resume."""
    model = _tied_model()
    head = _untied_by_hand(model)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.load_state_dict(state)
    assert model.lm_head.weight is not model.embed.weight
    assert torch.equal(model.lm_head.weight, head)


def test_a_tied_model_refuses_two_different_tensors_without_assign() -> None:
    """Seen failing: copied one after the other into the one Parameter, the head's values silently
    replaced the embedding's."""
    model = _tied_model()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    before = model.embed.weight.detach().clone()
    with pytest.raises(ValueError, match="embed.weight and lm_head.weight"):
        model.load_state_dict(state)
    assert torch.equal(model.embed.weight, before)


@pytest.mark.parametrize("assign", [False, True])
def test_a_tied_model_takes_a_state_dict_of_only_the_head(assign: bool) -> None:
    """Seen failing with assign: refused as 'embed.weight and lm_head.weight different values' though
    no embed.weight was given."""
    model = _tied_model()
    head = torch.randn(17, 8)
    model.load_state_dict({"lm_head.weight": head}, strict=False, assign=assign)
    assert model.lm_head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, head)


def test_the_inner_loop_diagnosis_costs_nothing_while_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen failing: with ``diagnoses_its_inner_loop`` off (training while fitting), every inner step still
    took the amax of its hidden states and of each fast weight (:func:`_step_scales`), read back unused."""
    from innerloop.models import E2EConfig
    from innerloop.models import e2e as e2e_module

    config = ModelConfig(
        vocab_size=17,
        hidden_size=8,
        num_heads=2,
        num_layers=1,
        intermediate_size=12,
        mixer="e2e",
        window=6,
        e2e=E2EConfig(chunk_size=4),
    )
    torch.manual_seed(0)
    model = build_model(config)
    ids = torch.tensor([[1, 5, 3, 16, 0, 2, 9, 4, 7]])
    calls: list[int] = []
    measured = e2e_module._step_scales
    monkeypatch.setattr(e2e_module, "_step_scales", lambda *args: calls.append(1) or measured(*args))
    model(ids)
    assert calls, "the diagnosis on (the default) measures each inner step"
    calls.clear()
    monkeypatch.setattr(model, "diagnoses_its_inner_loop", False)
    model(ids)
    assert not calls


@pytest.mark.parametrize("ascii_bytes", [60, 61, 62, 63])
@pytest.mark.parametrize("character", ["日", "😀"])
def test_a_byte_run_printed_at_its_length_cap_keeps_its_text(ascii_bytes: int, character: str) -> None:
    """Seen failing: a byte-fallback run reaching ``_TextWindow.MAX_BYTE_RUN`` (64) ids inside a multi-byte
    character was printed whole, and a run with an incomplete character decodes as U+FFFD for every byte:
    60-63 'a's printed as U+FFFD though ``decode(all ids)`` has them (and the character after)."""
    from innerloop import cli
    from tests.test_review_s54_s54m import _sentencepiece_like

    tokenizer = _sentencepiece_like()  # ids 3..258: the bytes <0x00>..<0xFF>
    ids = [3 + byte for byte in b"a" * ascii_bytes + character.encode() + b"b"]
    window = cli._TextWindow(tokenizer)
    printed = "".join(window.add([token_id]) for token_id in ids) + window.flush()
    assert printed == tokenizer.decode(ids) == "a" * ascii_bytes + character + "b"


def test_a_zero_initialised_fast_weight_does_not_blame_the_inner_rate() -> None:
    """Seen failing: a fast weight the model holds at 0 (a zero-initialised output projection) that one
    ordinary inner step moved to 0.01 measured as grown 1e36 times (0.01 over float32's tiny), so NaN
    logits from the model's own diverged weights were blamed on model.e2e.inner_lr."""
    from innerloop.models.e2e import _non_finite_logits_cause

    initial = torch.tensor([0.0, 0.05, 0.05])
    largest = torch.tensor([[1.0, 0.0, 0.05, 0.05], [1.0, 0.01, 0.05, 0.05]], dtype=torch.float64)
    cause = _non_finite_logits_cause(largest, initial, 1, ["down", "gate", "up"], "lower model.e2e.inner_lr")
    assert "model's own weights likely diverged" in cause
    blown = largest.clone()
    blown[1, 1] = 1e6  # an inner step that did blow it up is still blamed
    cause = _non_finite_logits_cause(blown, initial, 1, ["down", "gate", "up"], "lower model.e2e.inner_lr")
    assert "inner learning rate is likely too large" in cause
