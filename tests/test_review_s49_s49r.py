"""Seeded differential checks of whole language models, one per mixer family (review s49r).

Each draw builds a small float64 model and checks that chunked forwards with carried
state, prefill plus token-by-token decode, the HF wrapper with a cache, and greedy
``generate`` all agree with one whole forward of the sequence.
"""

import pytest
import torch

from innerloop.models import build_model, generate

pytestmark = pytest.mark.slow


def _draw(mixer: str, sizes: tuple[int, int, int, int, int], **options) -> dict:
    """A drawn model config: the ``mixer``, its ``sizes`` (vocabulary, hidden, heads, layers, MLP
    intermediate) and the mixer family's own ``options``."""
    vocab_size, hidden_size, num_heads, num_layers, intermediate_size = sizes
    return dict(
        mixer=mixer,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_layers=num_layers,
        intermediate_size=intermediate_size,
        **options,
    )


DRAWS = {
    "ttt": _draw(
        "ttt",
        (7, 4, 2, 3, 5),
        backbone="mamba",
        ttt=dict(
            inner_model="mlp",
            inner_loss="next_token",
            update_rule="momentum",
            mini_batch_size=3,
            conv_kernel=2,
            use_gate=True,
            inner_norm=True,
            kernel="torch",
        ),
    ),
    "deltanet": _draw("gated_deltanet", (50, 6, 3, 3, 7), family=dict(short_conv=True, conv_kernel=3)),
    "titans": _draw(
        "titans",
        (7, 4, 2, 2, 6),
        tie_embeddings=True,
        family=dict(mini_batch_size=2, memory="mlp", short_conv=True, conv_kernel=2),
    ),
    "e2e_swa": _draw("e2e", (7, 4, 1, 5, 5), window=3, e2e=dict(chunk_size=2, first_order=False)),
}


def _whole_split_decode(model, ids, cuts, prefill):
    """Logits of one whole forward, of chunks at ``cuts`` with carried state, and of
    a ``prefill``-token forward followed by one-token decode steps."""
    whole = model(ids)[0]
    pieces, state, start = [], None, 0
    for end in [*cuts, ids.shape[1]]:
        logits, state = model(ids[:, start:end], state)
        pieces.append(logits)
        start = end
    logits, state = model(ids[:, :prefill])
    decoded = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, state = model(ids[:, t : t + 1], state)
        decoded.append(logits)
    return whole, torch.cat(pieces, 1), torch.cat(decoded, 1)


def _hf_cached_logits(config, model, ids, prefill):
    from innerloop.hf.configuration import InnerloopConfig
    from innerloop.hf.modeling import InnerloopForCausalLM

    hf = InnerloopForCausalLM(InnerloopConfig(model=config)).double().eval()
    hf.model.load_state_dict(model.state_dict())
    full = hf(input_ids=ids).logits
    out = hf(input_ids=ids[:, :prefill], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(prefill, ids.shape[1]):
        out = hf(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits[:, -1:])
        cache = out.past_key_values
    return full, torch.cat(steps, 1)


@pytest.mark.parametrize("name", sorted(DRAWS))
def test_whole_model_split_decode_hf_and_generate_agree(name):
    config = dict(DRAWS[name], init_std=0.3)
    torch.manual_seed(sum(map(ord, name)))
    model = build_model(config).to(torch.float64).eval()
    ids = torch.randint(0, config["vocab_size"], (2, 9))
    with torch.no_grad():
        whole, split, decoded = _whole_split_decode(model, ids, cuts=[1, 4, 5], prefill=3)
        torch.testing.assert_close(split, whole, rtol=0, atol=1e-10)
        torch.testing.assert_close(decoded, whole, rtol=0, atol=1e-10)
        hf_full, hf_cached = _hf_cached_logits(config, model, ids, prefill=4)
        torch.testing.assert_close(hf_full, whole, rtol=0, atol=1e-10)
        torch.testing.assert_close(hf_cached, whole, rtol=0, atol=1e-10)
        prompt = ids[:, :4]
        tokens = torch.stack([t for t, _ in generate(model, prompt, 4, temperature=0)], 1)
        sequence = prompt
        for _ in range(4):
            next_token = model(sequence)[0][:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], 1)
        assert torch.equal(tokens, sequence[:, 4:])
