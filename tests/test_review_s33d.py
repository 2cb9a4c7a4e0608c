"""Review s33d: a mutation review of sessions 31-33's guards (registry roll-back, dispatch, the plugin kit,
train) and issue 10's claims. Each test here failed on a hand-made mutant that every other test passed, except
the last two (the fast loop reaching ``__main__``; built-in rules held to the registrar's check)."""

from __future__ import annotations

import sys
import warnings

import pytest
from plugin_testing import ModuleEntryPoint

_PACKAGE_INIT = """
import innerloop
from innerloop import HalfSquaredError, LossPairs


class PackageLoss(HalfSquaredError):
    name = "s33d_package_loss"

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})


innerloop.register_inner_loss(PackageLoss())
"""

_FAILING_SUBMODULE = """
import innerloop
from s33d_pkg import PackageLoss


class BadLoss(PackageLoss):
    name = "s33d_bad_loss"


innerloop.register_inner_loss(BadLoss())
raise ImportError("needs a missing dependency")
"""


def test_a_failing_entry_point_inside_another_plugins_package_is_skipped_whole(tmp_path, monkeypatch) -> None:
    """Two installed plugins: ``s33d_pkg`` (registers a loss at import) and its submodule ``s33d_pkg.bad``,
    which registers a loss at import and then fails. The roll-back keeps aside for ``pkg`` what ``pkg``'s
    module registered, but what ``bad``'s own module registered is ``bad``'s: it is rolled back, named in
    the broken plugin, and never registered, though its module lies inside ``pkg``'s package (a mutant
    that dropped the ``not _within(module, failing_module)`` guard handed it to ``pkg``, which registered
    the failed plugin's loss)."""
    import innerloop
    from innerloop.registry import manager
    from innerloop.registry.manager import isolated_registry

    package = tmp_path / "s33d_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(_PACKAGE_INIT)
    (package / "bad.py").write_text(_FAILING_SUBMODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("s33d_pkg", "s33d_pkg.bad"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(manager, "_REGISTERED_AT_IMPORT", dict(manager._REGISTERED_AT_IMPORT))
    monkeypatch.setattr(manager, "_ROLLED_BACK_AT_IMPORT", {})
    entry_points = [ModuleEntryPoint("bad", "s33d_pkg.bad"), ModuleEntryPoint("pkg", "s33d_pkg")]
    monkeypatch.setattr(manager, "_entry_points", lambda: entry_points)
    try:
        with isolated_registry(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            registry = innerloop.get_registry()
            (broken,) = registry.broken()
            assert broken.entry_point == "bad" and broken.names == (("inner_loss", "s33d_bad_loss"),), broken
            names = registry.names("inner_loss")
            assert "s33d_package_loss" in names and "s33d_bad_loss" not in names, names
    finally:
        for name in ("s33d_pkg", "s33d_pkg.bad"):
            sys.modules.pop(name, None)


def test_python_dash_m_innerloop_runs_the_cli_in_the_fast_loop(monkeypatch, capsys) -> None:
    """``innerloop/__main__.py`` was reached only by slow tests (subprocesses), so the fast loop did not
    reach every module of innerloop as issue 10 and CONTRIBUTING.md say; run it in this process."""
    import runpy

    import pytest

    import innerloop

    monkeypatch.setattr(sys, "argv", ["innerloop", "--version"])
    monkeypatch.delitem(sys.modules, "innerloop.__main__", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("innerloop", run_name="__main__", alter_sys=False)
    assert exit_info.value.code in (0, None)
    assert capsys.readouterr().out.strip() == f"innerloop {innerloop.__version__}"


def test_a_file_rewritten_in_place_with_its_time_kept_has_a_new_stamp(tmp_path) -> None:
    """``file_stamp`` (once in checkpoints.py and once in train/run.py, now one function in data/atomic.py)
    sees a rewrite that keeps the inode and, on a coarse clock, the modification time: by the size. A mutant
    that dropped the size passed every test."""
    import os

    from innerloop.data.atomic import file_stamp

    path = tmp_path / "last.safetensors"
    assert file_stamp(path) is None
    path.write_bytes(b"x" * 10)
    before = file_stamp(path)
    times = os.stat(path)
    with open(path, "r+b") as f:  # in place: the same inode
        f.write(b"y" * 12)
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert file_stamp(path) != before


def test_a_resume_that_failed_after_writing_a_checkpoint_keeps_its_config(tmp_path) -> None:
    """A resume that fails restores the config.yaml it replaced, unless it wrote a checkpoint meanwhile:
    that checkpoint's run is the config the resume wrote. A mutant that restored the old config whatever
    the checkpoint did passed every test; the out_dir then held a checkpoint beside the config of another
    run (its overrides lost)."""
    import pytest

    from innerloop.data.atomic import atomic_write_text
    from innerloop.train import run as run_module

    config, ckpt = tmp_path / "config.yaml", tmp_path / "last.safetensors"
    config.write_text("optim:\n  lr: 0.001\n")
    ckpt.write_bytes(b"step 10")
    with (
        pytest.raises(RuntimeError, match="after a save"),
        run_module._config_settled(config, ckpt, resume=True),
    ):
        atomic_write_text(config, "optim:\n  lr: 0.0005\n")
        atomic_write_text(ckpt, "step 20")  # the resume saved a checkpoint, then failed
        raise RuntimeError("after a save")
    assert config.read_text() == "optim:\n  lr: 0.0005\n"
    with (
        pytest.raises(RuntimeError, match="before a save"),
        run_module._config_settled(config, ckpt, resume=True),
    ):
        atomic_write_text(config, "optim:\n  lr: 0.1\n")
        raise RuntimeError("before a save")
    assert config.read_text() == "optim:\n  lr: 0.0005\n"


def test_the_allocators_not_enough_memory_is_an_allocation_failure() -> None:
    """torch's CPU allocator says "can't allocate memory" on Linux and "not enough memory" elsewhere
    (Windows); both get the scan's advice. A mutant that dropped the second passed every test."""
    from innerloop.core.scan import is_allocation_failure

    windows = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: not enough memory: you tried"
    )
    assert is_allocation_failure(windows)
    assert not is_allocation_failure(RuntimeError("shape mismatch"))
    assert not is_allocation_failure(ValueError("not enough memory"))  # not the allocator's type


def test_a_kernel_forward_taking_keyword_options_may_support_decay() -> None:
    """``KernelSpec(supports_decay=True)`` refuses a forward without a ``decay`` parameter, and takes one
    that accepts it through ``**options`` (dispatch passes ``decay=`` by keyword). A mutant that refused
    the second passed every test."""
    from innerloop.kernels.spec import KernelSpec

    def forward(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps, **options):
        raise AssertionError("never run")

    spec = KernelSpec(
        name="s33d_options",
        inner_model="linear",
        inner_loss="reconstruction",
        update_rule="dual_form",
        verify=lambda inputs: None,
        forward=forward,
        supports_decay=True,
    )
    assert spec.supports_decay


def test_a_kernel_writing_into_the_layers_layernorm_is_refused_at_first_use() -> None:
    """The first-use probe refuses a kernel that writes into what it is given: the weights, and also the
    layer's LayerNorm parameters and the views. A mutant that compared the weights only passed every test;
    then a kernel that scaled ``ln_weight`` in place was chosen, and every call changed the layer itself."""
    import pytest
    import torch

    import innerloop
    from innerloop.kernels.dispatch import KernelCheckError
    from innerloop.kernels.spec import KernelSpec
    from innerloop.registry.manager import isolated_registry

    with isolated_registry():
        fused = next(k for k in innerloop.get_registry().kernels() if k.name == "fused_torch_linear")

        def scales_ln_weight(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
            out, new = fused.forward(
                xq=xq,
                xk=xk,
                xv=xv,
                lr=lr,
                tau=tau,
                params=params,
                ln_weight=ln_weight,
                ln_bias=ln_bias,
                eps=eps,
            )
            with torch.no_grad():
                ln_weight.mul_(1.0)  # the same values: only where it writes differs
                ln_weight.add_(1e-3)
            return out, new

        spec = dict(inner_model="linear", inner_loss="reconstruction", update_rule="dual_form")
        innerloop.register_kernel(
            KernelSpec(name="s33d_ln_writer", forward=scales_ln_weight, verify=lambda inputs: None, **spec)
        )
        torch.manual_seed(0)
        layer = innerloop.TTTLayer(16, 2, mini_batch_size=4, kernel="s33d_ln_writer")
        before = {name: p.detach().clone() for name, p in layer.named_parameters()}
        with torch.no_grad(), pytest.raises(KernelCheckError, match="wrote into what it was given"):
            layer(torch.randn(1, 8, 16))
        assert all(torch.equal(p, before[name]) for name, p in layer.named_parameters())


@pytest.mark.slow  # the registrar's naive-loop check: 0.7-1.6 s per built-in rule here (up to 7 s on a loaded machine)
@pytest.mark.parametrize("name", ["dual_form", "minibatch_gd", "momentum"])
def test_each_built_in_update_rule_passes_the_check_a_third_party_rule_must_pass(name) -> None:
    """The registrar skips its naive-loop check (``Kind.external_check``) for innerloop's own update rules,
    which the test suite checks instead (registry/manager.py): this runs that exact check on each, so a
    built-in is held to what a third-party rule is."""
    from innerloop.registry import get_registry
    from innerloop.registry.kinds import KIND_BY_NAME

    check = KIND_BY_NAME["update_rule"].external_check
    assert check is not None
    check(get_registry().update_rule(name), name)
