"""innerloop's import of ttt-lm-pytorch models against the reference code itself, live (review s51d).

The stored conformance vectors and the s20 fuzz cases hold numbers the reference computed for fixed
configs; here the reference's own ``ttt.py`` (test-time-training/ttt-lm-pytorch, not committed: set
``INNERLOOP_TTT_LM_PYTORCH`` to its path, or fetch a mirror: tests/reference_code.py) runs beside innerloop on configs hypothesis draws: TTT-Linear and
TTT-MLP, mini-batches of 1, 2, 5 and 16 with sequences that are not a multiple of them (T = 1 included),
1 or 3 heads of widths that are not powers of two, gate, shared QK, pre-conv with kernels 2 to 5, base
learning rates 0 to 2.5, RoPE thetas, tied heads, RMSNorm epsilons and batches of 3 different sequences.

Each example compares, in float64, the logits of one call, the logits of a prefill followed by
token-by-token decoding against the reference's own cache path (``TTTCache``), and the gradient of a
loss that every logit feeds with respect to every parameter, on innerloop's torch path and on the path
``kernel='auto'`` picks (the CPU kernel where it claims the block).

Two changes to the reference only widen float32 casts (in float32 they are the same code): its
``RMSNorm`` normalises in the input's dtype, and the logits are its ``lm_head`` output before
``.float()``. Its RoPE table stays float32 as written: innerloop reproduces that table, so both read the
same rounded cos / sin. Under transformers 5 the reference cannot tie its head itself (its
``_tied_weights_keys`` is a list), so a tied reference model shares the parameter by hand.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_code import MISSING, reference_checkout
from safetensors.torch import save_file

from innerloop.core.functional import gelu_tanh
from innerloop.interop.ttt_lm_pytorch import _our_key, load_model

COMMON = dict(vocab_size=29, intermediate_size=14, num_hidden_layers=1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The reference module (a fresh import of its ttt.py, patched to keep float64 in RMSNorm)."""
    checkout = reference_checkout(tmp_path_factory.mktemp("reference"))
    if checkout is None:
        pytest.skip(MISSING)
    path = checkout / "ttt.py"
    pytest.importorskip("transformers", reason="the reference ttt.py imports transformers")
    spec = importlib.util.spec_from_file_location("ttt_lm_pytorch_reference_s51d", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)

    def rms_norm_in_input_dtype(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    module.RMSNorm.forward = rms_norm_in_input_dtype  # this module's own class: no shared object
    module.F = _FunctionalWithPolynomialGeluDerivative()  # this module's own name ``F``

    def gate_with_autograd_gelu(
        self, hidden_states, ttt_output
    ):  # the output gate: plain F.gelu, as innerloop's
        return torch.nn.functional.gelu(self.g_proj(hidden_states), approximate="tanh") * ttt_output

    module.TTTBase.apply_gate = gate_with_autograd_gelu
    return module


class _FunctionalWithPolynomialGeluDerivative:
    """``torch.nn.functional`` whose tanh-GELU differentiates with the reference's own polynomial, for
    TTT-MLP's inner GELU (innerloop's choice, innerloop/core/functional.py: its truncated constant 0.79788456 moves TTT-MLP's
    outer gradients by ~1e-9 relative from autograd's exact derivative); everything else unchanged."""

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def gelu(x, approximate="none"):
        if approximate == "tanh":
            return gelu_tanh(x)
        return torch.nn.functional.gelu(x, approximate=approximate)


@contextlib.contextmanager
def float64_default():
    """The reference builds its buffers and cache in the default dtype: float64 inside this block."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _reference_model(reference, fields: dict, seed: int):
    tied = fields.get("tie_word_embeddings", True)
    config = reference.TTTConfig(**{**COMMON, **fields, "tie_word_embeddings": False})
    torch.manual_seed(seed)
    model = reference.TTTForCausalLM(config).double()
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            if name.endswith(("norm.weight", "ttt_norm_weight")):
                parameter.copy_(1 + 0.2 * noise)
            elif name.endswith("learnable_token_idx"):
                parameter.copy_(0.3 * noise)  # some entries clamp at zero
            elif "bias" in name:
                parameter.copy_(0.1 * noise)
            elif name.endswith("embed_tokens.weight"):
                parameter.copy_(0.7 * noise)
            else:
                fan_in = parameter.shape[-1] if parameter.dim() > 1 else 1
                parameter.copy_(noise * 0.8 / fan_in**0.5)
    return model.eval()


def _imported(model, fields: dict, folder: Path):
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**COMMON, **fields, "model_type": "ttt"}))
    return load_model(folder)


def _reference_logits(model, ids, cache=None):
    out = model.model(input_ids=ids, cache_params=cache, use_cache=cache is not None, return_dict=True)
    return model.lm_head(out.last_hidden_state)


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A loss every logit feeds, at T = 1 too: a fixed projection plus next-token cross-entropy."""
    direction = torch.randn(logits.shape, generator=torch.Generator().manual_seed(11), dtype=logits.dtype)
    cross_entropy = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids.roll(-1, 1).reshape(-1)
    )
    return (logits * direction).sum() + cross_entropy


def _decoded(step, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of ``ids[:, :prefill]`` in one call, then of each later token alone (``step(chunk)``)."""
    pieces = [step(ids[:, :prefill])]
    pieces += [step(ids[:, t : t + 1]) for t in range(prefill, ids.shape[1])]
    return torch.cat(pieces, dim=1)


def _max_relative_gradient_difference(reference_model, ours, ids) -> float:
    reference_model.zero_grad()
    _loss(_reference_logits(reference_model, ids), ids).backward()
    ours.zero_grad()
    _loss(ours(ids)[0], ids).backward()
    our_parameters = dict(ours.named_parameters())
    worst, seen = 0.0, set()
    for key, parameter in reference_model.named_parameters():  # a tied head is listed once, as the embedding
        mine = our_parameters[_our_key(key)]
        seen.add(_our_key(key))
        scale = max(1.0, parameter.grad.abs().max().item())
        worst = max(worst, (mine.grad - parameter.grad).abs().max().item() / scale)
    assert seen == set(our_parameters), "a parameter of one model has no counterpart in the other"
    return worst


@st.composite
def reference_configs(draw, kind: str):
    """A reference config, sequence length, prefill length and seed. Each list starts with its richest
    value (hypothesis's first example takes the first of each, booleans excepted): a mini-batch of 5 over
    12 tokens (two whole mini-batches on the kernel path, then a remainder), RoPE that rotates, 3 heads,
    gate, shared QK and pre-conv on, decoding that starts inside a mini-batch."""
    mini_batch = draw(st.sampled_from([5, 2, 16, 1]))
    length = draw(st.sampled_from([12, 7, 1]))  # the script in the report ran 33 and 100 too
    if mini_batch > 1 and length > 1 and length % mini_batch == 0:
        length += 1  # never a multiple: the reference's remainder path
    heads = draw(st.sampled_from([3, 1]))
    head_dim = draw(st.sampled_from([10, 6]))
    flag = st.sampled_from([True, False])
    fields = dict(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        mini_batch_size=mini_batch,
        ttt_layer_type=kind,
        use_gate=draw(flag),
        share_qk=draw(flag),
        pre_conv=draw(flag),
        conv_kernel=draw(st.sampled_from([3, 2, 4, 5])),
        ttt_base_lr=draw(st.sampled_from([2.5, 0.3, 1.0, 0.0])),
        rope_theta=draw(st.sampled_from([100.0, 5e5, 10000.0])),
        tie_word_embeddings=draw(flag),
        rms_norm_eps=draw(st.sampled_from([1e-2, 1e-6])),
    )
    prefill = max(1, min(length - 1, draw(st.sampled_from([6, 1, 3, 11]))))
    return fields, length, prefill, draw(st.integers(0, 2**16))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linear", "mlp"])
@settings(max_examples=2, deadline=None)  # ~2 s of CPU an example (measured); the grid in the report ran more
@given(data=st.data())
def test_imported_model_equals_the_reference_code_on_drawn_configs(reference, tmp_path_factory, kind, data):
    """Logits, prefill-then-decode and every parameter's gradient (torch path and the ``auto`` path) of
    the imported model equal the reference's, in float64. Measured: logits and decoding within 1e-14 of
    logits of size ~3, gradients within 1e-14 relative (the reference's tanh-GELU differentiated with its
    own polynomial, as innerloop does: with autograd's exact derivative TTT-MLP's differ by ~1e-9)."""
    case = data.draw(reference_configs(kind))
    with float64_default():
        _compare_with_reference(reference, tmp_path_factory.mktemp("model"), *case)


def _compare_with_reference(
    reference, folder: Path, fields: dict, length: int, prefill: int, seed: int
) -> None:
    model = _reference_model(reference, fields, seed)
    ours = _imported(model, fields, folder)
    ids = torch.randint(0, COMMON["vocab_size"], (3, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = _reference_logits(model, ids)
        assert (ours(ids)[0] - expected).abs().max().item() <= 1e-13
        if length > 1:
            cache = reference.TTTCache(model.model, ids.shape[0])
            reference_decoded = _decoded(lambda chunk: _reference_logits(model, chunk, cache), ids, prefill)
            state = [None]

            def our_step(chunk):
                logits, state[0] = ours(chunk, state[0])
                return logits

            assert (_decoded(our_step, ids, prefill) - reference_decoded).abs().max().item() <= 1e-13
    for kernel in ("torch", "auto"):
        for block in ours.blocks:
            block.mixer.kernel = kernel
        assert _max_relative_gradient_difference(model, ours, ids) <= 1e-13, kernel
