"""A returned state is a value, and a layer built on the meta device is whole once materialised.

- A state returned before its first mini-batch closes held views of the layer's initial weights (the
  ``nn.Parameter`` itself): an optimizer step or ``load_state_dict`` then changed a state the caller
  held, and truncated backpropagation trained differently with ``state.detach()`` than with a copy.
- ``token_idx``, ``rope_inv_freq`` and ``token_scale`` are not saved (non-persistent): after building on
  the meta device, ``to_empty`` left them uninitialised and ``load_state_dict(strict=True)`` did not fill
  them, so the model computed with garbage while reporting every key matched.
- Forward passes on meta tensors (shape tracing) and inside ``torch.func`` transforms read no values.
"""

from __future__ import annotations

import pytest
import torch

import innerloop
from innerloop.core.family_layers import DeltaNetLayer
from innerloop.models import ModelConfig, build_model

TINY_LM = {"vocab_size": 20, "hidden_size": 16, "num_heads": 2, "num_layers": 2}
MIXERS = [{"ttt": {"mini_batch_size": 4}}, {"ttt": {"inner_model": "mlp"}}, {"mixer": "gated_deltanet"},
          {"mixer": "e2e", "e2e": {"chunk_size": 8}}, {"mixer": "attention"}, {"backbone": "mamba"}]  # fmt: skip


def _ids(length: int = 9) -> torch.Tensor:
    return torch.randint(0, 20, (2, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
def test_a_state_does_not_change_when_the_layers_weights_do(inner_model) -> None:
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(16, 2, inner_model=inner_model, mini_batch_size=8)
    x = torch.randn(2, 5, 16)  # fewer tokens than a mini-batch: the state starts at the init
    with torch.no_grad():
        _, state = layer(x)
        kept = state.clone()
        for weight in layer.initial_params.values():
            weight.add_(1.0)  # what an optimizer step does
    for name, value in state.params.items():
        assert torch.equal(value, kept.params[name]), name


def test_truncated_backpropagation_trains_the_same_with_or_without_copying_the_state() -> None:
    def losses(copy_state: bool) -> list[float]:
        torch.manual_seed(0)
        layer = innerloop.TTTLayer(16, 2, mini_batch_size=16).double()
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
        x = torch.randn(1, 24, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        state, seen = None, []
        for start in range(0, 24, 8):  # chunks shorter than the mini-batch
            y, state = layer(x[:, start : start + 8], state)
            loss = y.square().mean()
            optimizer.zero_grad()
            loss.backward()
            state = state.detach().clone() if copy_state else state.detach()
            optimizer.step()  # a state that is a value is not changed by it
            seen.append(loss.item())
        return seen

    assert losses(copy_state=False) == losses(copy_state=True)


def test_an_e2e_state_does_not_change_when_the_models_weights_do() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({**TINY_LM, "mixer": "e2e", "e2e": {"chunk_size": 8}})).eval()
    with torch.no_grad():
        _, state = model(_ids(5))
        kept = {name: value.clone() for name, value in state.fast.items()}
        for parameter in model.parameters():
            parameter.add_(0.01)
    for name, value in state.fast.items():
        assert torch.equal(value, kept[name]), name


@pytest.mark.parametrize("options", MIXERS, ids=str)
def test_a_model_built_on_meta_then_materialised_and_loaded_equals_the_original(options) -> None:
    config = ModelConfig.from_dict({**TINY_LM, **options})
    torch.manual_seed(0)
    real = build_model(config).eval()
    with torch.device("meta"):
        lazy = build_model(config)
    lazy.to_empty(device="cpu").load_state_dict(real.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(lazy.eval()(_ids())[0], real(_ids())[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "build", [lambda: innerloop.TTTLayer(16, 2, mini_batch_size=4), lambda: DeltaNetLayer(16, 2)]
)
def test_the_tables_not_saved_are_made_again_whatever_a_move_leaves_in_them(build) -> None:
    torch.manual_seed(0)
    layer = build()
    expected = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    layer._apply(lambda t: torch.full_like(t, float("nan")))  # what to_empty's garbage may hold
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, expected[name]), name
    layer.double()  # the tables as made in float32, cast: what the reference's .double() gives
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, expected[name].double()), name


@pytest.mark.slow  # ~0.7 s in all: three model kinds on meta tensors
@pytest.mark.filterwarnings(
    "ignore::innerloop.models.e2e.OneChunkTrainingWarning"
)  # 5 tokens, in training mode
@pytest.mark.parametrize("options", MIXERS, ids=str)
def test_a_forward_on_meta_tensors_gives_the_shapes(options) -> None:
    with torch.device("meta"):
        model = build_model(ModelConfig.from_dict({**TINY_LM, **options}))
        logits, _ = model(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, 20) and logits.device.type == "meta"


def test_vmap_over_a_layer_with_its_input_checks_on_equals_row_by_row() -> None:
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(16, 2, mini_batch_size=4).double()  # non_finite="raise", the default
    x = torch.randn(3, 1, 6, 16, dtype=torch.float64)
    batched = torch.func.vmap(lambda row: layer(row)[0])(x)
    with torch.no_grad():
        rows = torch.stack([layer(row)[0] for row in x])
    torch.testing.assert_close(batched, rows, rtol=1e-12, atol=1e-12)
