"""The causal LM: streaming = whole sequence (decoding from a 1-token prompt, uneven pieces, a kept state
decoded from twice: for every kind of model, TTT-E2E included), causality, windows, backbones, paper
shapes."""

from __future__ import annotations

import pytest
import torch
from lm_testing import state_tensors

from innerloop.config import load_config
from innerloop.models import (
    BACKBONES,
    E2ELM,
    MIXERS,
    MODEL_SIZES,
    CausalLM,
    E2EConfig,
    ModelConfig,
    TTTConfig,
    build_model,
    generate,
)
from innerloop.models.config import FamilyConfig

MIXERS_AND_BACKBONES = [(m, b) for m in MIXERS for b in BACKBONES]  # every mixer is tested

# Every kind of language model the library builds, with mini-batches, windows and chunks of 4 tokens, so
# that a sequence of 14 tokens crosses three of their boundaries (deltanet and gated_deltanet update at
# every token; their short convs carry 3 tokens).
MODEL_KINDS = {
    "ttt-linear": {"mixer": "ttt", "ttt": TTTConfig(mini_batch_size=4)},
    "ttt-mlp-mamba": {
        "mixer": "ttt",
        "backbone": "mamba",
        "ttt": TTTConfig(inner_model="mlp", mini_batch_size=4),
    },
    "attention": {"mixer": "attention"},
    "swa": {"mixer": "swa", "window": 4},
    "linear_attention": {"mixer": "linear_attention", "family": FamilyConfig(mini_batch_size=4)},
    "deltanet": {"mixer": "deltanet"},
    "gated_deltanet": {"mixer": "gated_deltanet"},
    "titans-mlp": {"mixer": "titans", "family": FamilyConfig(mini_batch_size=4, memory="mlp")},
    "e2e": {"mixer": "e2e", "window": 4, "e2e": E2EConfig(chunk_size=4, suffix_fraction=0.5)},
}

# The paper's model shapes, written here as the independent source the package is checked against:
# hidden / layers / heads from the paper's table (Sun et al. 2024, arXiv 2407.04620), MLP width from the
# reference code's TTT_STANDARD_CONFIGS (ttt-lm-pytorch).
PAPER_SIZES = {
    "125m": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 2048},
    "350m": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "intermediate_size": 2736},
    "760m": {"hidden_size": 1536, "num_layers": 24, "num_heads": 16, "intermediate_size": 4096},
    "1.3b": {"hidden_size": 2048, "num_layers": 24, "num_heads": 32, "intermediate_size": 5504},
}


def tiny(mixer: str, backbone: str = "transformer", **kw) -> CausalLM | E2ELM:
    """Two blocks of width 32 in float64 (window 8 unless ``kw`` says otherwise)."""
    torch.manual_seed(0)
    options = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "window": 8, **kw}
    return build_model(ModelConfig(mixer=mixer, backbone=backbone, **options)).double().eval()


@pytest.mark.parametrize(("mixer", "backbone"), MIXERS_AND_BACKBONES)
def test_chunks_with_state_equal_the_whole_sequence(mixer: str, backbone: str) -> None:
    model = tiny(mixer, backbone)
    ids = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(1))
    whole, _ = model(ids)
    state, pieces = None, []
    for start, end in [(0, 5), (5, 6), (6, 23), (23, 24), (24, 45)]:  # splits inside mini-batches too
        logits, state = model(ids[:, start:end], state)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=1e-10)


def decoded_logits(model: CausalLM | E2ELM, ids: torch.Tensor, cuts: list[int], state=None):
    """The logits of ``ids [B, N]`` read in the pieces between consecutive ``cuts`` (from 0 to N), each
    piece continuing from the state the one before it returned (the first from ``state``), and the
    last state."""
    pieces = []
    with torch.no_grad():
        for start, end in zip(cuts[:-1], cuts[1:], strict=True):
            logits, state = model(ids[:, start:end], state)
            pieces.append(logits)
    return torch.cat(pieces, dim=1), state


def whole_logits(model: CausalLM | E2ELM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_one_token_prompt_then_token_by_token_decoding_equals_the_whole_sequence(kind: str) -> None:
    """Token 0 alone, then each token alone: 13 steps across three mini-batch, window and chunk ends."""
    model = tiny(**MODEL_KINDS[kind])
    ids = torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(4))
    decoded, _ = decoded_logits(model, ids, list(range(15)))
    torch.testing.assert_close(decoded, whole_logits(model, ids), rtol=0, atol=1e-10)


@pytest.mark.parametrize("pieces", [(3, 5, 1), (2, 7, 6)], ids=str)
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_prompt_read_in_uneven_pieces_equals_the_whole_sequence(kind: str, pieces: tuple[int, ...]) -> None:
    """Prompts of 9 and 15 tokens (not multiples of 4), read in uneven pieces, most of which end inside
    a mini-batch, window or chunk; the state they leave continues as the whole prompt's does."""
    model = tiny(**MODEL_KINDS[kind])
    length = sum(pieces)
    ids = torch.randint(0, 256, (2, length + 2), generator=torch.Generator().manual_seed(5))
    cuts = [sum(pieces[:i]) for i in range(len(pieces) + 1)]
    decoded, state = decoded_logits(model, ids[:, :length], cuts)
    torch.testing.assert_close(decoded, whole_logits(model, ids[:, :length]), rtol=0, atol=1e-10)
    continued, _ = decoded_logits(model, ids[:, length:], [0, 1, 2], state)
    torch.testing.assert_close(continued, whole_logits(model, ids)[:, length:], rtol=0, atol=1e-10)


def copy_of(state) -> dict[str, torch.Tensor]:
    """A copy of every tensor of ``state``, by its path (:func:`assert_unchanged` compares with it)."""
    return {name: t.clone() for name, t in state_tensors(state).items()}


def assert_unchanged(state, snapshot: dict[str, torch.Tensor], which: str) -> None:
    now = state_tensors(state)
    assert now.keys() == snapshot.keys(), which
    for name, value in snapshot.items():
        assert torch.equal(now[name], value), f"{which}: {name} was changed in place"


@pytest.mark.slow  # ~2.6 s in all: 18 model kinds and positions; prefill then decode stays in the fast loop (test_a_one_token_prompt_then_token_by_token_decoding_equals_the_whole_sequence)
@pytest.mark.parametrize("kept_at", [0, 2], ids=["after-the-prompt", "after-2-generated-tokens"])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_state_kept_from_generation_stays_valid_after_decoding_goes_on_from_it(
    kind: str, kept_at: int
) -> None:
    """A state ``generate`` yields (after a 6-token prompt, or 2 tokens later: full attention's cache then
    has room that the later tokens are written into), kept while generation goes on from it, is decoded
    from three times: the generated tokens, other tokens, the generated tokens again. Both decodings of
    the generated tokens give the whole sequence's logits, bit for bit the same, and after each decoding
    no state kept along the way (nor the first decoding's last one) has a tensor written in place."""
    model = tiny(**MODEL_KINDS[kind])
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(6))
    tokens, kept, snapshots = [], [], []
    for token, state in generate(
        model, prompt, 9, temperature=1.0, generator=torch.Generator().manual_seed(7)
    ):
        tokens.append(token)  # ``state``: after the prompt and the tokens before ``token``
        kept.append(state)
        snapshots.append(copy_of(state))
    tokens = torch.stack(tokens, dim=1)
    cuts = list(range(tokens.shape[1] - kept_at + 1))
    once, last = decoded_logits(model, tokens[:, kept_at:], cuts, kept[kept_at])
    kept.append(last)
    snapshots.append(copy_of(last))
    for continuation in ((tokens[:, kept_at:] + 1) % 256, tokens[:, kept_at:]):  # other tokens, the same
        again, _ = decoded_logits(model, continuation, cuts, kept[kept_at])
        for step, (state, snapshot) in enumerate(zip(kept, snapshots, strict=True)):
            assert_unchanged(state, snapshot, f"state {step}")
    torch.testing.assert_close(again, once, rtol=0, atol=0)
    whole = whole_logits(model, torch.cat((prompt, tokens), dim=1))
    torch.testing.assert_close(once, whole[:, prompt.shape[1] + kept_at :], rtol=0, atol=1e-10)


@pytest.mark.parametrize(("mixer", "backbone"), MIXERS_AND_BACKBONES)
def test_logits_do_not_depend_on_future_tokens(mixer: str, backbone: str) -> None:
    model = tiny(mixer, backbone)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 30:] = (changed[0, 30:] + 1) % 256
    before, after = model(ids)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :30], after[:, :30], rtol=0, atol=0)
    assert not torch.allclose(before[:, 30:], after[:, 30:])


@pytest.mark.parametrize(("mixer", "backbone"), MIXERS_AND_BACKBONES)
def test_every_linear_projection_starts_as_the_reference_initialises_it(mixer: str, backbone: str) -> None:
    """The reference models draw every nn.Linear's weight from normal(0, initializer_range) with zero
    bias (ttt-lm-pytorch's TTTPreTrainedModel._init_weights, ttt-lm-jax's kernel_init, FLA's models),
    the mixers' projections included. PyTorch's default (uniform, std 1/sqrt(3 * 64) = 0.072 at width
    64) left a TTT layer's q/k/v/o 3.6x larger than the reference's, so it trained from another start."""
    torch.manual_seed(0)
    config = ModelConfig(mixer=mixer, backbone=backbone, hidden_size=64, num_layers=2, num_heads=4, window=8)
    model = CausalLM(config)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert any(".mixer." in name for name in linears) or mixer in ("attention", "swa")
    for name, linear in linears.items():
        # std of >= 1,024 normal draws: within 15% of 0.02 (PyTorch's default is 3.6x off at width 64)
        assert linear.weight.std().item() == pytest.approx(config.init_std, rel=0.15), name
        assert abs(linear.weight.mean().item()) < 0.005, name
        if linear.bias is not None:
            assert torch.count_nonzero(linear.bias) == 0, name


def test_sliding_window_does_not_see_past_its_window() -> None:
    # One block, no pre-conv: position t sees tokens t - window + 1 .. t only.
    torch.manual_seed(0)
    swa = CausalLM(ModelConfig(mixer="swa", hidden_size=32, num_layers=1, num_heads=2, window=8)).double()
    full = CausalLM(ModelConfig(mixer="attention", hidden_size=32, num_layers=1, num_heads=2)).double()
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 256
    for model, sees_far in ((swa, False), (full, True)):
        far = (model(ids)[0] - model(changed)[0])[0, 8:].abs().max()  # positions >= window
        assert (far > 1e-8) == sees_far
    near = (swa(ids)[0] - swa(changed)[0])[0, 1:8].abs().max()
    assert near > 1e-8


def test_head_is_tied_to_the_embedding() -> None:
    model = tiny("attention")
    assert model.lm_head.weight is model.embed.weight


def test_mamba_backbone_turns_on_pre_conv_share_qk_and_gate() -> None:
    mamba, transformer = tiny("ttt", "mamba"), tiny("ttt", "transformer")
    for block in mamba.blocks:
        assert block.pre_conv is not None and block.mixer.share_qk and block.mixer.use_gate
    for block in transformer.blocks:
        assert block.pre_conv is None and not block.mixer.share_qk and not block.mixer.use_gate


def test_state_of_ttt_and_sliding_window_stays_constant_but_full_attention_grows() -> None:
    sizes = {}
    for mixer in ("ttt", "swa", "attention"):
        model = tiny(mixer)
        state, per_length = None, []
        for _ in range(3):
            _, state = model(torch.zeros(1, 16, dtype=torch.long), state)
            per_length.append(state.nbytes())
        sizes[mixer] = per_length
    assert sizes["ttt"][0] == sizes["ttt"][-1]
    assert sizes["swa"][0] == sizes["swa"][-1]
    assert sizes["attention"][-1] == 3 * sizes["attention"][0]


def test_bad_config_names_the_field_and_the_choices() -> None:
    mixers = r"\['ttt', 'attention', 'swa', 'linear_attention', 'deltanet', 'gated_deltanet', 'titans'\]"
    with pytest.raises(ValueError, match=r"model\.mixer='lstm'.*" + mixers):
        CausalLM(ModelConfig(mixer="lstm"))
    with pytest.raises(ValueError, match=r"model\.ttt\.inner_model='rnn'.*'linear'"):
        CausalLM(ModelConfig(ttt=TTTConfig(inner_model="rnn")))
    with pytest.raises(ValueError, match=r"hidden_size=30 must be divisible by model\.num_heads=4"):
        CausalLM(ModelConfig(hidden_size=30))
    with pytest.raises(
        ValueError, match=r"unknown config key .model.hidden. in the model config; valid keys"
    ):
        ModelConfig.from_dict({"hidden": 3})


def test_the_ttt_kernel_option_reaches_every_layer() -> None:
    config = ModelConfig(
        hidden_size=32,
        num_heads=2,
        num_layers=2,
        ttt=TTTConfig(inner_model="mlp", kernel="compiled_torch_mlp"),
    )
    kernels = {module.kernel for module in CausalLM(config).modules() if hasattr(module, "inner_task")}
    assert kernels == {"compiled_torch_mlp"}


@pytest.mark.parametrize("size", sorted(PAPER_SIZES))
def test_paper_size_presets_have_the_paper_shapes(size: str) -> None:
    run, _ = load_config(f"ttt-linear-{size}")  # the preset file as users load it
    shape = {k: getattr(run.model, k) for k in PAPER_SIZES[size]}
    assert shape == PAPER_SIZES[size]
    assert run.model.mixer == "ttt" and run.model.ttt.inner_model == "linear"


def test_paper_table_matches_the_reference() -> None:
    """The package's table and ``ModelConfig.paper_size`` give the paper's shapes, and every paper-size
    preset is one of the sizes checked above."""
    from innerloop.config import preset_names

    assert MODEL_SIZES == PAPER_SIZES
    for size, shape in PAPER_SIZES.items():
        config = ModelConfig.paper_size(size)
        assert {k: getattr(config, k) for k in shape} == shape, size
    presets = {name.removeprefix("ttt-linear-") for name in preset_names() if name.startswith("ttt-linear-")}
    assert presets == set(PAPER_SIZES)


def test_125m_attention_model_has_the_expected_parameter_count() -> None:
    with torch.device("meta"):  # the count needs the shapes only, not 125M initialized weights
        model = CausalLM(ModelConfig.paper_size("125m", mixer="attention"))
    D, L, M, V = 768, 12, 2048, 256
    per_block = 4 * D * D + 3 * D * M + 2 * D  # attention, SwiGLU, two RMSNorms
    assert model.num_parameters() == V * D + L * per_block + D  # tied head; final norm


@pytest.mark.slow  # ~0.3 s: loads and validates every packaged preset
def test_every_packaged_preset_loads_and_writes_to_its_own_folder() -> None:
    from innerloop.config import preset_names

    names = preset_names()
    assert {"tiny", "tiny-attention", "tiny-swa", "tiny-mlp", "recall-ttt", "recall-swa"} <= set(names)
    for name in names:
        run, _ = load_config(name)  # validated: names, plugins, strategy, ...
        assert run.out_dir == f"runs/{name}"


def test_the_mixer_table_is_the_one_place_a_mixer_is_declared(monkeypatch) -> None:
    """A mixer added to MIXER_TABLE alone is accepted by the config validation and built by every block."""
    from torch import nn

    from innerloop.models import MIXER_TABLE, validate_model_config
    from innerloop.models.config import Mixer

    class Identity(nn.Module):
        def forward(self, x, state=None):
            return x, state

    config = ModelConfig(mixer="identity", hidden_size=32, num_layers=2, num_heads=2)
    with pytest.raises(ValueError, match=r"model.mixer='identity' is not a mixer; valid mixers: \['ttt'"):
        validate_model_config(config)
    monkeypatch.setitem(MIXER_TABLE, "identity", Mixer("returns its input", lambda config: Identity()))
    validate_model_config(config)
    model = CausalLM(config)
    assert [type(block.mixer) for block in model.blocks] == [Identity, Identity]
