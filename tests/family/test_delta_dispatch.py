"""The chunked delta rule as a registered fast path: ``scan`` (and so every layer) with the ``matrix``
model under ``dual_form`` at K = 1 without the inner norm and residual runs ``delta_chunk``, and it
equals the torch dual form in outputs, final weights and every gradient (float64), with and without
decay; layers it does not compute go elsewhere, with the reason recorded."""

from __future__ import annotations

import pytest
import torch

from innerloop.core.functional import relative_error
from innerloop.core.ops import scan
from innerloop.testing import FLOAT64_TOLERANCE

B, H, F = 2, 3, 8


def _inputs(tokens: int, decaying: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v = draw(B, H, tokens, F), draw(B, H, tokens, F), draw(B, H, tokens, F)
    k = k / k.norm(dim=-1, keepdim=True)  # DeltaNet's l2-normalised keys
    lr = torch.sigmoid(draw(B, H, tokens))
    tensors = {"q": q, "k": k, "v": v, "lr": lr, "W": 0.1 * draw(B, H, F, F)}
    if decaying:
        tensors["decay"] = torch.sigmoid(draw(B, H, tokens) - 2)
    return tensors


def _delta_scan(tensors: dict[str, torch.Tensor], kernel: str, dispatches: list) -> tuple:
    return scan(
        tensors["q"], tensors["k"], tensors["v"], tensors["lr"],
        inner_model="matrix", mini_batch_size=1, inner_norm=False, inner_residual=False,
        decay=tensors.get("decay"), initial={"W": tensors["W"]}, kernel=kernel, dispatches=dispatches,
    )  # fmt: skip


@pytest.mark.parametrize("decaying", [False, True])
@pytest.mark.parametrize("tokens", [1, 37, 130])
def test_scan_runs_the_chunked_delta_rule_and_it_equals_the_torch_dual_form(tokens, decaying) -> None:
    tensors = _inputs(tokens, decaying)
    leaves = {name: t.clone().requires_grad_() for name, t in tensors.items()}
    fast_records: list = []
    fast_out, fast_state = _delta_scan(leaves, "auto", fast_records)
    assert fast_records and all(path == "delta_chunk" for path, _ in fast_records), fast_records
    torch_leaves = {name: t.clone().requires_grad_() for name, t in tensors.items()}
    slow_out, slow_state = _delta_scan(torch_leaves, "torch", [])
    torch.testing.assert_close(fast_out, slow_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast_state["W"], slow_state["W"], rtol=1e-10, atol=1e-12)
    probe = torch.randn_like(fast_out)
    ((fast_out * probe).sum() + fast_state["W"].sum()).backward()
    ((slow_out * probe).sum() + slow_state["W"].sum()).backward()
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad, torch_leaves[name].grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("gate_name", "gate"), [("reset", 0.0), ("near_reset", 1e-12), ("no_decay", 1.0)])
def test_a_full_reset_and_gates_near_it_give_the_torch_paths_gradient(gate_name, gate) -> None:
    """decay = 1 (a document boundary), 1 - 1e-12 and 0 at a few tokens of two chunks (64 + 6 tokens):
    the gradient w.r.t. decay went through log(1 - decay), NaN at a reset and ~eps / a off near one."""
    tensors = _inputs(70, decaying=True)
    tensors["decay"][0, 0, [3, 40]] = 1 - gate
    tensors["decay"][1, 2, [0, 65, 69]] = 1 - gate
    results = {}
    for kernel in ("auto", "torch"):
        leaves = {name: t.clone().requires_grad_() for name, t in tensors.items()}
        records: list = []
        out, state = _delta_scan(leaves, kernel, records)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
        ((out * probe).sum() + state["W"].sum()).backward()
        results[kernel] = {"out": out, "W": state["W"], **{f"d_{n}": t.grad for n, t in leaves.items()}}
        assert {path for path, _ in records} == ({"delta_chunk"} if kernel == "auto" else {"torch"}), records
    for name, expected in results["torch"].items():
        assert torch.isfinite(expected).all(), name
        assert relative_error(results["auto"][name], expected) <= FLOAT64_TOLERANCE, (gate_name, name)


def test_layers_the_delta_kernel_does_not_compute_go_to_torch_with_the_reason() -> None:
    tensors = _inputs(8, decaying=False)
    records: list = []
    scan(
        tensors["q"], tensors["k"], tensors["v"], tensors["lr"],
        inner_model="matrix", mini_batch_size=4, inner_norm=False, inner_residual=False,
        initial={"W": tensors["W"]}, dispatches=records,
    )  # fmt: skip
    assert records and all(path == "torch" for path, _ in records)
    assert any("mini_batch_size=1" in reason for _, reason in records), records
    with pytest.raises(ValueError, match="inner LayerNorm and residual"):  # at the call's check since s56r
        scan(
            tensors["q"], tensors["k"], tensors["v"], tensors["lr"],
            inner_model="matrix", mini_batch_size=1, initial={"W": tensors["W"]}, kernel="delta_chunk",
        )  # fmt: skip


def test_the_fused_kernels_still_refuse_layers_without_the_inner_norm() -> None:
    """A fused kernel named for a scan without the inner LayerNorm is refused when the call is checked,
    before anything runs (the declared capability, fuses_inner_norm)."""
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 16, 4, generator=generator) for _ in range(3))
    with pytest.raises(
        ValueError, match="fuses the inner LayerNorm and residual, which need both on; this layer has"
    ):
        scan(q, k, v, torch.full((1, 2, 16), 0.1), inner_norm=False, kernel="fused_torch_linear")
