"""Review s50j: transformers' checkpointing hook checks the checkpoint function once, naming
``gradient_checkpointing_kwargs`` (the Hugging Face user's name); the inner model no longer checks it
again under its own name."""

from __future__ import annotations

import warnings

import pytest
from hf_testing import tiny_hf_model

pytest.importorskip("transformers", reason="transformers is the hf extra (pip install -e '.[hf]')")


def test_hf_checkpointing_checks_the_function_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import innerloop.hf.modeling as modeling
    import innerloop.models.lm as lm

    names: list[str] = []

    def counting(check):
        def wrapped(function, name="gradient_checkpointing_func"):
            names.append(name)
            return check(function, name)

        return wrapped

    monkeypatch.setattr(modeling, "check_checkpoint_function", counting(modeling.check_checkpoint_function))
    monkeypatch.setattr(lm, "check_checkpoint_function", counting(lm.check_checkpoint_function))
    model = tiny_hf_model("swa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.25 deprecates the name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing
    assert names == ["gradient_checkpointing_kwargs"]
