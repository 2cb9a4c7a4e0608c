"""Review s21 (public layer and op APIs on bad or unusual input): the cases that were accepted with
wrong or unusable results, or that failed with a bare torch / Python error instead of one naming the
argument. Each unfixed defect is a strict xfail; the report is notes/review_s21_api.md."""

from __future__ import annotations

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.family_layers import FamilyLayer, TitansLayer
from innerloop.core.layer import check_layer_arguments
from innerloop.ops import scan
from innerloop.plugins.models.matrix import MatrixModel

B, H, T, F = 2, 2, 12, 4


def _views(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, F, generator=generator, dtype=dtype) for _ in range(3))
    return q, k, v, 0.3 * torch.rand(B, H, T, generator=generator, dtype=dtype)


# --- F1 (HIGH): ops.scan's weights do not continue a next_token scan ------------------------------------


def test_a_next_token_scan_continues_exactly_from_its_weights_or_is_refused() -> None:
    q, k, v, lr = _views()
    options = {"inner_loss": "next_token", "mini_batch_size": 4, "kernel": "torch"}
    whole, _ = scan(q, k, v, lr, **options)
    cut = 8  # a multiple of mini_batch_size: the docstring's case of an exact continuation
    first, weights = scan(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], lr[:, :, :cut], **options)
    assert weights.dropped_carry == ("has_previous", "previous_key")
    with pytest.raises(ValueError, match=r"inner loss carries \[.*\] from one call to the next"):
        scan(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], lr[:, :, cut:], initial=weights, **options)
    # the layer's state carries it: split = whole there (tests/core/test_invariances.py); a reconstruction
    # scan's weights, which need no carry, still continue exactly
    options["inner_loss"] = "reconstruction"
    whole, _ = scan(q, k, v, lr, **options)
    first, weights = scan(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], lr[:, :, :cut], **options)
    second, _ = scan(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], lr[:, :, cut:], initial=weights, **options)
    torch.testing.assert_close(torch.cat([first, second], 2), whole, rtol=0, atol=1e-12)


# --- F2 (MED): init_state(like=...) builds a state the same layer refuses ---------------------------------


def test_a_state_made_like_the_input_of_a_bfloat16_layer_is_accepted_by_it() -> None:
    torch.manual_seed(0)
    layer = TTTLayer(8, 2, mini_batch_size=4).to(torch.bfloat16)
    x = torch.randn(1, 3, 8, dtype=torch.bfloat16)
    state = layer.init_state(1, like=x)
    assert {t.dtype for t in state.tensors().values()} == {torch.float32}  # the scan's dtype
    with torch.no_grad():
        assert torch.equal(layer(x, state)[0], layer(x)[0])


def test_init_state_puts_every_tensor_on_one_device() -> None:
    torch.manual_seed(0)
    layer = TTTLayer(8, 2, mini_batch_size=4, share_qk=True, inner_loss="next_token")
    state = layer.init_state(1, like=torch.empty(0, device="meta"))
    assert len({t.device for t in state.tensors().values()}) == 1


# --- F3 (MED): the family layers skip the init_params check TTTLayer makes ----------------------------------


class _HardCodedHeads(MatrixModel):
    """A plugin model whose init_params hard-codes 2 heads (the registrar checks one small shape)."""

    name = "review_s21_hard_coded_heads"

    def init_params(self, num_heads: int, head_dim: int, generator: torch.Generator | None = None) -> dict:
        return {"W": torch.zeros(2, head_dim, head_dim)}


class _Float64Init(MatrixModel):
    """A plugin model whose init_params come in float64 (numpy-made, say)."""

    name = "review_s21_float64_init"

    def init_params(self, num_heads: int, head_dim: int, generator: torch.Generator | None = None) -> dict:
        return {"W": torch.full((num_heads, head_dim, head_dim), 0.01, dtype=torch.float64)}


def test_ttt_layer_names_a_model_that_hard_codes_the_heads() -> None:  # the behaviour F3 asks for
    with pytest.raises(ValueError, match="hard-code the number of heads"):
        TTTLayer(8, 4, inner_model=_HardCodedHeads())


@pytest.mark.parametrize("cls", [FamilyLayer, TitansLayer], ids=lambda c: c.__name__)
def test_a_family_layer_names_a_model_that_hard_codes_the_heads(cls: type) -> None:
    with pytest.raises(ValueError, match="hard-code the number of heads"):
        cls(8, 4, inner_model=_HardCodedHeads())  # at construction, as TTTLayer


@pytest.mark.parametrize("cls", [FamilyLayer, TitansLayer], ids=lambda c: c.__name__)
def test_a_family_layer_holds_its_initial_weights_in_its_own_dtype(cls: type) -> None:
    layer = cls(8, 2, inner_model=_Float64Init())
    assert {p.dtype for p in layer.parameters()} == {torch.float32}


# --- F4 (LOW): raw errors / misleading errors for absurd option values ------------------------------------


def test_scan_names_an_initial_key_that_is_no_string() -> None:
    q, k, v, lr = (t.float() for t in _views())
    with pytest.raises(ValueError, match=r"initial\[1\] is not a weight of inner_model"):
        scan(q, k, v, lr, mini_batch_size=4, initial={1: torch.zeros(H, F, F)})


def test_an_absurd_conv_kernel_is_refused_by_name() -> None:
    with pytest.raises(
        ValueError, match=r"conv_kernel must be a positive integer <= 1024 .*got 1000000000000"
    ):
        check_layer_arguments(8, 2, share_qk=True, conv_kernel=10**12)  # checks only, allocates nothing


def test_a_rope_theta_whose_table_overflows_is_refused_by_name() -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"rope_theta must be a finite number >= 1, got 1e-300"):
        TTTLayer(8, 2, rope_theta=1e-300)


def test_a_numpy_string_is_no_valid_choice() -> None:
    """A numpy array passed Python's ``in`` against the valid strings and was kept as the option (a
    family layer's state label then read ``array('elu', ...)``)."""
    import numpy as np

    with pytest.raises(ValueError, match="non_finite must be one of"):
        TTTLayer(8, 2, non_finite=np.array(["raise"]))
    with pytest.raises(ValueError, match="feature_map must be one of"):
        FamilyLayer(8, 2, feature_map=np.array("elu"))
