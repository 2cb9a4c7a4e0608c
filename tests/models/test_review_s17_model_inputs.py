"""Review s17 (hostile inputs), models: ``CausalSelfAttention`` and ``CausalDepthwiseConv`` arguments
and inputs, integer and other-dtype states (attention caches, ``E2ELM``), a config that is no
``ModelConfig``, numpy numbers in a config, and ``generate`` given a model it cannot drive."""

from __future__ import annotations

import dataclasses
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
        ({"rope_theta": float("nan")}, r"rope_theta=nan must be a finite number >= 1"),
        ({"norm_eps": 0}, r"norm_eps=0 must be a finite number in \(0, 1\)"),
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

NOT_A_CONFIG = (
    "config must be a ModelConfig, or a mapping of its fields \\(a dict, an OmegaConf DictConfig\\), got"
)


@pytest.mark.parametrize("build", [build_model, CausalLM, E2ELM], ids=["build_model", "CausalLM", "E2ELM"])
@pytest.mark.parametrize(
    "config, kind", [(None, "NoneType"), (["hidden_size", 32], "list")], ids=["None", "list"]
)
def test_a_config_that_is_no_model_config_is_refused(build, config, kind) -> None:
    with pytest.raises(TypeError, match=f"{NOT_A_CONFIG} {kind}"):
        build(config)


@pytest.mark.parametrize("mixer", ["ttt", "e2e"])
def test_a_dict_or_an_omegaconf_config_builds_the_model_its_fields_describe(mixer: str) -> None:
    """``OmegaConf.structured(ModelConfig(...))`` is how OmegaConf and Hydra users hold the config."""
    from omegaconf import OmegaConf

    fields = {"mixer": mixer, "hidden_size": 32, "num_heads": 2, "num_layers": 2, "intermediate_size": 64}
    models = []
    for config in (ModelConfig(**fields), fields, OmegaConf.structured(ModelConfig(**fields))):
        torch.manual_seed(0)
        models.append(build_model(config))
    assert all(model.config == models[0].config for model in models)
    assert all(type(model) is type(models[0]) for model in models)
    for model in models[1:]:
        for (name, got), (_, want) in zip(
            model.state_dict().items(), models[0].state_dict().items(), strict=True
        ):
            assert torch.equal(got, want), name
    with pytest.raises(ValueError, match="hidden_sise"):
        build_model({**fields, "hidden_sise": 8})  # a misspelt field is named, as in any config


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


def test_a_numpy_bool_becomes_a_python_bool_as_numpy_numbers_become_python_numbers() -> None:
    # numpy bools were kept: build_model refused them as "np.True_ (bool) must be true or false", which
    # contradicts itself, while numpy ints and floats were converted (and JSON cannot write np.bool_)
    config = ModelConfig(tie_embeddings=np.False_, ttt={"use_gate": np.True_})
    assert (type(config.tie_embeddings), type(config.ttt.use_gate)) == (bool, bool)
    assert (config.tie_embeddings, config.ttt.use_gate) == (False, True)
    json.dumps(config.to_dict())


def test_a_numpy_bool_set_after_building_gets_a_message_that_says_what_to_do() -> None:
    config = ModelConfig()
    config.ttt.use_gate = np.True_
    with pytest.raises(
        ValueError, match=r"model\.ttt\.use_gate=.* must be a Python bool \(convert it with bool"
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_e2e_refuses_fast_weights_of_a_narrower_float_dtype(dtype: torch.dtype) -> None:
    """Fast weights are kept in at least float32: narrower ones were rounded by a cast. A wider one
    (float64 in a float32 model) continues in the model's dtype:
    tests/models/test_e2e_states.py::test_a_state_in_another_dtype_continues_in_the_models_dtype."""
    model = _e2e()
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        _, state = model(ids[:, :3])
        entry = r"fast\['blocks\.1\.prime\.gate_proj\.weight'\]"
        with pytest.raises(
            TypeError, match=rf"state\.{entry} is {dtype} but this model keeps it in torch\.float32"
        ):
            model(ids[:, 3:], state.to(dtype))


@pytest.mark.parametrize("test_time_training", [True, False])
def test_e2e_continues_its_state_made_before_model_float(test_time_training: bool) -> None:
    """A state made while the model was bfloat16 holds bfloat16 pending inputs (the embedding's dtype):
    after ``model.float()`` it continues (bfloat16 is exact in float32), as the same state with those
    inputs cast up does."""
    model = _e2e(test_time_training).to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        _, state = model(ids[:, :3])
        assert state.pending.dtype == torch.bfloat16
        model.float()
        continued, _ = model(ids[:, 3:], state)
        cast_up = dataclasses.replace(state, pending=state.pending.float())
        expected, _ = model(ids[:, 3:], cast_up)
    assert torch.equal(continued, expected)


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


class _Wrapper(nn.Module):
    """A user's own module around an innerloop model, kept as ``.model`` (a common name), with the
    contract generate calls: ``logits, state = model(ids, state)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, state=None):
        logits, state = self.model(input_ids, state)
        return 2 * logits, state


def _tiny_lm() -> CausalLM:
    return build_model(
        ModelConfig(hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32, vocab_size=20)
    )


def test_generate_refuses_a_hugging_face_model_when_called() -> None:
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    torch.manual_seed(0)
    hf_model = InnerloopForCausalLM(
        InnerloopConfig(model={"hidden_size": 32, "num_heads": 2, "num_layers": 1})
    )
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(
        TypeError, match=r"Hugging Face model .*use model\.generate\(\.\.\.\).*generate\(model\.model"
    ):
        generate(hf_model, prompt, 2)  # not read: refused before the first token


@pytest.mark.parametrize("model", [None, 3, "model"])
def test_generate_refuses_a_model_that_is_not_callable_when_called(model: object) -> None:
    with pytest.raises(
        TypeError, match=r"model must be an innerloop language model \(CausalLM or E2ELM\), got"
    ):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 2)


def test_generate_still_drives_a_wrapped_innerloop_model() -> None:
    """A module of the user's own around the model (here doubling its logits), kept as ``.model``, is not
    taken for a Hugging Face model: it follows generate's contract."""
    model = _tiny_lm().eval()
    prompt = torch.zeros(1, 2, dtype=torch.long)
    wrapped = [int(t) for t, _ in generate(_Wrapper(model), prompt, 3, temperature=0)]
    plain = [int(t) for t, _ in generate(model, prompt, 3, temperature=0)]
    assert wrapped == plain  # greedy: doubled logits pick the same tokens


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
