"""Review s55e: the s54n mutants no test killed (T6, D13; K3 and K6 are killed by
tests/test_review_s52_s52j.py's keys table, outside s54n's harness), ``trainer.max_time`` against
Lightning's Timer, and the testing kit's default checks against deliberately wrong rules and kernels."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from innerloop.config import trainer_args
from innerloop.kernels import dispatch
from innerloop.kernels.spec import KernelInputs


@pytest.mark.slow  # reads Lightning's Trainer signature (its first use imports Lightning: ~3 s under load)
@pytest.mark.parametrize(("name", "value"), [("gradient_clip_algorithm", "Norm"), ("profiler", "Simple")])
def test_lightnings_text_choices_are_taken_in_any_case(name: str, value: str) -> None:
    """Lightning lower-cases ``gradient_clip_algorithm`` (Trainer.__init__) and ``profiler``
    (trainer/setup.py's _init_profiler) before it reads them: ``Norm`` and ``Simple`` train, so the
    config check takes them too (mutant T6, ``value not in choices``, refused them)."""
    trainer_args.check_lightning_arguments({name: value}, ValueError)
    with pytest.raises(ValueError, match=f"trainer.{name}='Nrom' is not valid"):
        trainer_args.check_lightning_arguments({name: "Nrom"}, ValueError)


def _block_inputs() -> KernelInputs:
    return KernelInputs(
        device=torch.device("cpu"),
        dtype=torch.float32,
        head_dim=8,
        mini_batch_size=4,
        num_tokens=8,
        requires_grad=False,
        extra={},
    )


def test_every_refusal_of_auto_names_the_kernel_it_is_about(monkeypatch: pytest.MonkeyPatch) -> None:
    """``kernel="auto"`` refusing every candidate tells each one's reason after its name (a verify's
    reason rarely names its own kernel); a reason that already starts with the name is not named twice
    (mutant D13 dropped the names: 'torch: too small; too small' said nothing of which kernel)."""
    reasons = {"first": "head_dim 8 is below 16", "second": "second: wants float64"}
    monkeypatch.setattr(dispatch, "refusal", lambda kernel, inputs, task, rule: reasons[kernel.name])
    candidates = [SimpleNamespace(name=name) for name in reasons]
    task = SimpleNamespace(model=SimpleNamespace(name="linear"), loss=SimpleNamespace(name="reconstruction"))
    rule = SimpleNamespace(name="gd")
    chosen, reason = dispatch._best(candidates, _block_inputs(), task, rule, candidates)
    assert chosen is None
    assert reason == "torch: first: head_dim 8 is below 16; second: wants float64"
