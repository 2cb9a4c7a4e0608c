"""Review s17 (hostile inputs), models: ``CausalSelfAttention`` and ``CausalDepthwiseConv`` arguments
and inputs, integer and other-dtype states (attention caches, ``E2ELM``), a config that is no
``ModelConfig``, numpy numbers in a config, and ``generate`` given a model it cannot drive."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from innerloop.models import (
    E2ELM,
    CausalDepthwiseConv,
    CausalLM,
    CausalSelfAttention,
    ModelConfig,
    build_model,
    generate,
)

D, H = 32, 4


# --- M2: CausalSelfAttention and CausalDepthwiseConv --------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_heads": 0}, r"num_heads must be a positive integer, got 0"),
        ({"hidden_size": "32"}, r"hidden_size must be a positive integer, got '32'"),
        ({"hidden_size": 32.0}, r"hidden_size must be a positive integer, got 32\.0"),
        ({"hidden_size": -32}, r"hidden_size must be a positive integer, got -32"),
        ({"window": "8"}, r"window must be a positive integer or None, got '8'"),
        ({"window": 2.5}, r"window must be a positive integer or None, got 2\.5"),
        ({"window": 0}, r"window must be a positive integer or None, got 0"),
        ({"hidden_size": 12, "num_heads": 5}, r"hidden_size \(12\) must be divisible by num_heads \(5\)"),
        ({"hidden_size": 12, "num_heads": 4}, r"head_dim = hidden_size / num_heads = 3 must be even"),
        ({"rope_theta": float("nan")}, r"rope_theta=nan must be a finite number > 0"),
        ({"norm_eps": 0}, r"norm_eps=0 must be a finite number > 0"),
    ],
)
def test_attention_refuses_bad_arguments_by_name(kwargs: dict, message: str) -> None:
    args = {"hidden_size": D, "num_heads": H, **kwargs}
    with pytest.raises(ValueError, match=message):
        CausalSelfAttention(**args)


def test_attention_refuses_a_non_bool_qk_norm() -> None:
    with pytest.raises(TypeError, match="qk_norm must be True or False, got 1"):
        CausalSelfAttention(D, H, qk_norm=1)


def test_attention_takes_numpy_integers_as_ints() -> None:
    attention = CausalSelfAttention(np.int64(D), np.int32(H), window=np.int64(4))
    assert (attention.head_dim, attention.window) == (D // H, 4) and type(attention.window) is int
    y, _ = attention(torch.randn(1, 5, D))
    assert y.shape == (1, 5, D)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize(
    "x, error, message",
    [
        (torch.randn(9, D), ValueError, r"x must have shape \[B, T, hidden_size=32\], got \(9, 32\)"),
        (torch.randn(2, 9, 31), ValueError, r"x must have shape \[B, T, hidden_size=32\], got \(2, 9, 31\)"),
        (
            torch.randn(2, 9, D, dtype=torch.float64),
            TypeError,
            r"x is torch\.float64 but the layer's weights are torch\.float32",
        ),
        (
            torch.zeros(2, 9, D, dtype=torch.long),
            TypeError,
            r"x must be a floating-point tensor, got dtype torch\.int64",
        ),
        ([[0.0] * D], TypeError, r"x must be a torch\.Tensor \[B, T, hidden_size\], got list"),
    ],
    ids=["rank2", "width31", "float64", "int64", "list"],
)
def test_attention_refuses_bad_inputs_by_name(window, x, error, message) -> None:
    with pytest.raises(error, match=message):
        CausalSelfAttention(D, H, window=window)(x)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_attention_refuses_an_integer_cache(window, dtype) -> None:
    torch.manual_seed(0)
    attention = CausalSelfAttention(D, H, window=window)
    x = torch.randn(2, 9, D)
    with torch.no_grad():
        _, cache = attention(x[:, :5])
        with pytest.raises(
            TypeError, match=rf"state\.key is {dtype} but a key/value cache holds floating-point"
        ):
            attention(x[:, 5:], cache.to(dtype))


def test_attention_under_autocast_takes_another_input_dtype_and_its_cache() -> None:
    """The dtype checks leave mixed precision alone: a float32 layer under autocast takes bfloat16 x,
    and its bfloat16 cache continues outside autocast."""
    attention = CausalSelfAttention(D, H, window=4)
    x = torch.randn(1, 6, D)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        _, cache = attention(x[:, :3].bfloat16())
    assert cache.key.dtype == torch.bfloat16
    with torch.no_grad():
        y, _ = attention(x[:, 3:], cache)
    assert y.dtype == torch.float32


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: CausalDepthwiseConv(D, 2.0), r"kernel_size must be a positive integer, got 2\.0"),
        (lambda: CausalDepthwiseConv(D, 0), r"kernel_size must be a positive integer, got 0"),
        (lambda: CausalDepthwiseConv(0, 3), r"hidden_size must be a positive integer, got 0"),
        (lambda: CausalDepthwiseConv("32", 3), r"hidden_size must be a positive integer, got '32'"),
    ],
)
def test_conv_refuses_bad_arguments_by_name(build, message) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    "x, error, message",
    [
        (torch.randn(9, D), ValueError, r"x must have shape \[B, T, hidden_size=32\], got \(9, 32\)"),
        (torch.randn(2, 9, 31), ValueError, r"x must have shape \[B, T, hidden_size=32\], got \(2, 9, 31\)"),
        (
            torch.randn(2, 9, D, dtype=torch.float64),
            TypeError,
            r"x is torch\.float64 but the layer's weights are torch\.float32",
        ),
    ],
    ids=["rank2", "width31", "float64"],
)
def test_conv_refuses_bad_inputs_by_name(x, error, message) -> None:
    with pytest.raises(error, match=message):
        CausalDepthwiseConv(D, 3)(x)


def test_conv_refuses_an_integer_history_and_takes_an_empty_batch() -> None:
    conv = CausalDepthwiseConv(D, 3)
    x = torch.randn(2, 5, D)
    _, history = conv(x)
    with pytest.raises(
        TypeError, match=r"history is torch\.int64 but the pre-conv history holds floating-point"
    ):
        conv(x, history.long())
    assert conv(torch.randn(0, 5, D))[0].shape == (0, 5, D)


# --- M3: a config that is no ModelConfig ---------------------------------------------------------------------

NOT_A_CONFIG = "config must be a ModelConfig \\(ModelConfig.from_dict\\(d\\) builds one from a dict\\), got"


@pytest.mark.parametrize("build", [build_model, CausalLM, E2ELM], ids=["build_model", "CausalLM", "E2ELM"])
@pytest.mark.parametrize(
    "config, kind", [({"hidden_size": 32}, "dict"), (None, "NoneType")], ids=["dict", "None"]
)
def test_a_config_that_is_no_model_config_is_refused(build, config, kind) -> None:
    with pytest.raises(TypeError, match=f"{NOT_A_CONFIG} {kind}"):
        build(config)


@pytest.mark.parametrize("section", ["ttt", "e2e", "family"])
@pytest.mark.parametrize("value", [None, 5, "x"])
def test_a_section_that_is_no_mapping_is_refused(section: str, value: object) -> None:
    with pytest.raises(TypeError, match=rf"model\.{section} is a section, not a value: give an instance of"):
        ModelConfig(**{section: value})


def test_another_section_class_is_refused() -> None:
    with pytest.raises(TypeError, match=r"model\.ttt is a section.*got E2EConfig"):
        ModelConfig(ttt=ModelConfig().e2e)


@pytest.mark.parametrize("data", [[1, 2], "hidden_size", None, 3])
def test_from_dict_refuses_a_non_mapping(data: object) -> None:
    with pytest.raises(TypeError, match=r"ModelConfig\.from_dict needs a mapping of the config's keys"):
        ModelConfig.from_dict(data)


# --- L4: numpy numbers in a config -----------------------------------------------------------------------------


def test_numpy_numbers_in_a_config_become_python_numbers() -> None:
    config = ModelConfig(
        hidden_size=np.int64(32),
        num_heads=np.int32(4),
        rope_theta=np.float32(500.0),
        ttt={"mini_batch_size": np.int64(4), "base_lr": np.float32(0.5)},
    )
    values = (
        config.hidden_size,
        config.num_heads,
        config.rope_theta,
        config.ttt.mini_batch_size,
        config.ttt.base_lr,
    )
    assert values == (32, 4, 500.0, 4, 0.5)
    assert [type(v) for v in values] == [int, int, float, int, float]
    json.dumps(config.to_dict())  # a checkpoint's hparams: plain numbers only
    assert build_model(config).config.hidden_size == 32


def test_a_numpy_number_set_after_building_gets_a_message_that_says_what_to_do() -> None:
    config = ModelConfig()
    config.hidden_size = np.int64(64)
    with pytest.raises(
        ValueError,
        match=r"model\.hidden_size=np\.int64\(64\) \(int64\) must be a Python int \(convert it with int",
    ):
        build_model(config)


# --- H2 / L1: E2ELM state dtypes ---------------------------------------------------------------------------------


def _e2e(test_time_training: bool = True) -> E2ELM:
    torch.manual_seed(0)
    config = ModelConfig(
        mixer="e2e",
        hidden_size=32,
        num_heads=4,
        num_layers=2,
        intermediate_size=64,
        vocab_size=50,
        window=8,
        e2e={"chunk_size": 4, "test_time_training": test_time_training},
    )
    return build_model(config).eval()


@pytest.mark.parametrize("test_time_training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_e2e_refuses_a_state_of_a_narrower_float_dtype(test_time_training: bool, dtype: torch.dtype) -> None:
    """A wider one (float64 in a float32 model) continues in the model's dtype:
    tests/models/test_e2e_states.py::test_a_state_in_another_dtype_continues_in_the_models_dtype."""
    model = _e2e(test_time_training)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        _, state = model(ids[:, :3])
        entry = r"fast\['blocks\.1\.prime\.gate_proj\.weight'\]" if test_time_training else "pending"
        with pytest.raises(
            TypeError, match=rf"state\.{entry} is {dtype} but this model keeps it in torch\.float32"
        ):
            model(ids[:, 3:], state.to(dtype))


def test_e2e_refuses_an_integer_state_by_name() -> None:
    model = _e2e()
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        _, state = model(ids[:, :3])
        with pytest.raises(
            TypeError, match=r"state\.caches\[0\]\.key is torch\.int64 but a key/value cache holds"
        ):
            model(ids[:, 3:], state.to(torch.int64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # autocast on CPU may warn about its dtype
            with torch.autocast("cpu", torch.bfloat16):
                _, mixed = model(ids[:, :3])
        expected, _ = model(ids[:, 3:], state)
        continued, _ = model(ids[:, 3:], mixed)  # a bfloat16 cache from autocast continues
    assert continued.shape == expected.shape


# --- M5: generate given a model it cannot drive ----------------------------------------------------------------


class _HuggingFaceLike(nn.Module):
    """What innerloop.hf.InnerloopForCausalLM looks like to generate: its config is no ModelConfig, the
    innerloop model is ``.model``, and its forward returns an output object."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, object()

    def forward(self, input_ids, **_):
        return {"logits": self.model(input_ids)[0]}


def _tiny_lm() -> CausalLM:
    return build_model(
        ModelConfig(hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32, vocab_size=20)
    )


def test_generate_refuses_a_hugging_face_model_when_called() -> None:
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(
        TypeError, match=r"Hugging Face model .*use model\.generate\(\.\.\.\).*generate\(model\.model"
    ):
        generate(_HuggingFaceLike(_tiny_lm()), prompt, 2)  # not read: refused before the first token


@pytest.mark.parametrize("model", [None, 3, "model"])
def test_generate_refuses_a_model_that_is_not_callable_when_called(model: object) -> None:
    with pytest.raises(
        TypeError, match=r"model must be an innerloop language model \(CausalLM or E2ELM\), got"
    ):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 2)


def test_generate_still_drives_a_wrapped_innerloop_model() -> None:
    """A plain module wrapper (no .model / foreign config), e.g. torch.compile's, is not refused."""
    model = _tiny_lm().eval()
    tokens = [int(t) for t, _ in generate(model, torch.zeros(1, 2, dtype=torch.long), 3, temperature=0)]
    assert len(tokens) == 3


def test_e2e_refuses_integer_fast_weights_and_pending_inputs() -> None:
    model = _e2e()
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        _, state = model(ids[:, :3])
        integer_fast = replace(state, fast={k: v.long() for k, v in state.fast.items()})
        with pytest.raises(
            TypeError, match=r"state\.fast\['blocks\.1\.prime\.gate_proj\.weight'\] is torch\.int64"
        ):
            model(ids[:, 3:], integer_fast)
        with pytest.raises(
            TypeError, match=r"state\.pending is torch\.int64 but this model keeps it in torch\.float32"
        ):
            model(ids[:, 3:], replace(state, pending=state.pending.long()))
