"""Review s55h: the docs walk (README.md, CONTRIBUTING.md, docs/) -- claims held to the code."""

from __future__ import annotations

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.state import TTTState


def _state_with_a_carry() -> tuple[TTTLayer, TTTState]:
    layer = TTTLayer(8, 2, mini_batch_size=4, inner_loss="next_token")
    with torch.no_grad():
        _, state = layer(torch.randn(2, 6, 8))
    return layer, state


@pytest.mark.parametrize("given", ["next_token", 3])
def test_a_state_given_its_loss_by_name_says_what_was_given_not_none(given) -> None:
    """docs/architecture.md: a TTTState with a carry takes ``inner_loss=`` (the layer's). Given the loss's
    registered name, as a TTTLayer takes it, index_select and cat said "inner_loss is None, but the state
    was written by inner loss 'next_token'": the name it was given, read as None."""
    _, state = _state_with_a_carry()
    rows = torch.tensor([1, 0])
    with pytest.raises(TypeError, match=rf"layer\.inner_loss\), got {given!r} \({type(given).__name__}\)"):
        state.index_select(rows, inner_loss=given)
    with pytest.raises(TypeError, match=rf"layer\.inner_loss\), got {given!r} \({type(given).__name__}\)"):
        TTTState.cat([state, state], inner_loss=given)


def test_a_state_given_its_layers_loss_still_selects_and_joins_rows() -> None:
    layer, state = _state_with_a_carry()
    assert state.index_select(torch.tensor([1, 1, 0]), inner_loss=layer.inner_loss).batch_size == 3
    assert TTTState.cat([state, state], inner_loss=layer.inner_loss).batch_size == 4


def test_checkpoint_options_without_use_reentrant_are_refused_saying_what_to_add() -> None:
    """docs/huggingface.md: the HF model checkpoints with the kwargs it is given; transformers hands a given dict
    to torch's checkpoint as it is, so ``{"determinism_check": "none"}`` (no use_reentrant: torch's reentrant
    default) was refused without saying the remedy, and ``{"bogus": 1}`` was refused for its missing
    use_reentrant, not for the option that does not exist."""
    import functools

    from torch.utils.checkpoint import checkpoint

    from innerloop.models.lm import check_checkpoint_function

    missing = functools.partial(checkpoint, determinism_check="none")
    with pytest.raises(ValueError, match=r"use_reentrant=None \(torch's default.*add use_reentrant=False"):
        check_checkpoint_function(missing, "gradient_checkpointing_kwargs")
    unknown = functools.partial(checkpoint, bogus=1)
    with pytest.raises(ValueError, match=r"gradient_checkpointing_kwargs has \['bogus'\], not options"):
        check_checkpoint_function(unknown, "gradient_checkpointing_kwargs")
    check_checkpoint_function(functools.partial(checkpoint, use_reentrant=False, determinism_check="none"))


@pytest.mark.slow  # imports transformers (seconds on a cold worker)
def test_the_hf_model_takes_checkpoint_options_with_use_reentrant_false() -> None:
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    model = InnerloopForCausalLM(InnerloopConfig(model={"hidden_size": 16, "num_heads": 2, "num_layers": 2}))
    with pytest.raises(ValueError, match=r"\['bogus'\], not options"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match=r"add use_reentrant=False"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"determinism_check": "none"})
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "determinism_check": "none"}
    )
    assert model.is_activation_checkpointing


def test_contributing_lists_every_field_of_an_inner_problem() -> None:
    """CONTRIBUTING.md lists InnerProblem's fields ("its fields `state`, ..."); it left out ``decay_log``."""
    import dataclasses
    import re
    from pathlib import Path

    from innerloop.testing import InnerProblem

    text = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text(encoding="utf-8")
    listed = re.search(r"`InnerProblem` \(its fields ([^:]*):", text)
    assert listed, "CONTRIBUTING.md no longer lists InnerProblem's fields"
    assert re.findall(r"`(\w+)`", listed.group(1)) == [f.name for f in dataclasses.fields(InnerProblem)]


def test_run_in_chunks_takes_a_rule_by_name_as_the_other_checks_do() -> None:
    """README/CONTRIBUTING: innerloop.testing's checks take a plugin or its registered name (make_problem,
    check_update_rule, rule_refusal); run_in_chunks("dual_form", ...) failed with "'str' object has no
    attribute 'uses_token_scale'", and a problem given in the rule's place with "'str' object has no
    attribute 'views'"."""
    from innerloop.registry import get_registry
    from innerloop.testing import make_problem, run_in_chunks

    problem = make_problem("linear", "reconstruction", tokens=9)
    by_name, state = run_in_chunks("dual_form", problem, [5])
    by_object, state_too = run_in_chunks(get_registry().update_rule("dual_form"), problem, [5])
    assert torch.equal(by_name, by_object) and state.position == state_too.position == 9
    with pytest.raises(
        TypeError, match=r"rule must be an instance of UpdateRule or a registered update rule's name"
    ):
        run_in_chunks(None, problem, [5])
    with pytest.raises(
        TypeError, match=r"problem must be an InnerProblem \(innerloop\.testing\.make_problem\)"
    ):
        run_in_chunks("dual_form", "dual_form", [5])
