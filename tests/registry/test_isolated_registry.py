"""``innerloop.registry.isolated_registry``: a plugin's tests get a fresh registry, and the process's
own one (with its kernels' verdicts) comes back after the block, not rebuilt."""

from __future__ import annotations

import pytest
import torch

import innerloop
from innerloop import HalfSquaredError, LossPairs
from innerloop.kernels import first_use
from innerloop.registry import get_registry, isolated_registry, manager


class KeyToValue(HalfSquaredError):
    name = "isolated_registry_test_loss"

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})


def test_the_block_has_its_own_registry_and_the_processs_comes_back_unchanged():
    before = get_registry()
    innerloop.TTTLayer(16, 2)(torch.randn(1, 4, 16))  # the kernels' first-use verdicts, if any
    verdicts = first_use.saved_verdicts()
    with isolated_registry():
        inside = get_registry()
        assert inside is not before
        assert first_use.saved_verdicts() == ({}, {})
        innerloop.register_inner_loss(KeyToValue())
        assert KeyToValue.name in inside.names("inner_loss")
    assert get_registry() is before
    assert KeyToValue.name not in before.names("inner_loss")
    assert first_use.saved_verdicts() == verdicts


def test_the_processs_registry_comes_back_after_an_error_in_the_block():
    before = get_registry()
    with pytest.raises(RuntimeError, match="in the block"), isolated_registry():
        innerloop.register_inner_loss(KeyToValue())
        raise RuntimeError("in the block")
    assert get_registry() is before
    assert KeyToValue.name not in before.names("inner_loss")


def test_a_block_that_never_asks_for_the_registry_builds_none(monkeypatch):
    before = get_registry()
    builds = []
    monkeypatch.setattr(manager, "build_registry", lambda **kw: builds.append(kw))
    with isolated_registry():
        pass
    assert builds == []
    assert get_registry() is before
