"""Review s47d (Hugging Face integration, data and evaluation): regression tests.

- A left-padded batch (what a tokenizer with ``padding_side="left"`` gives, and what lm-eval's
  ``generate_until`` passes at ``--batch_size`` above 1) was refused by ``generate()`` and ``forward``:
  innerloop models read every token into their recurrent state, so the pads could not be skipped. Each
  row is now read as its prompt alone (rows of one length share a state), so each row of a left-padded
  ``generate()`` equals the generation of its prompt unpadded, and its logits those of the prompt alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "hf"))
from hf_testing import tiny_hf_model  # noqa: E402

PAD = 0


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` left-padded with ``PAD`` into ids and a mask ``[batch, longest]``."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


PROMPTS = [list(b"def f(x):"), list(b"ab"), list(b"import os"), list(b"xyz1")]


@pytest.mark.slow  # a batched generate and four unbatched ones per kind: about 1 s
@pytest.mark.parametrize("kind", ["ttt_linear", "swa", "attention", "e2e"])
def test_each_row_of_a_left_padded_generate_is_its_unpadded_generation(kind: str) -> None:
    model = tiny_hf_model(kind)
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
        for row, prompt in enumerate(PROMPTS):
            alone = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
            assert batch[row, ids.shape[1] :].tolist() == alone[0, len(prompt) :].tolist(), row
    assert torch.equal(batch[:, : ids.shape[1]], ids)  # the prompts as given, pads included


@pytest.mark.slow  # five forwards of a float64 TTT model: about 0.5 s
def test_left_padded_logits_hidden_states_and_cache_are_each_rows_own() -> None:
    model = tiny_hf_model("ttt_linear").double()
    ids, mask = left_padded(PROMPTS)
    width = ids.shape[1]
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, output_hidden_states=True)
        step = torch.tensor([[5], [6], [7], [8]])
        after = model(step, cache=batch.cache, attention_mask=torch.cat((mask, torch.ones_like(step)), 1))
        for row, prompt in enumerate(PROMPTS):
            pads = width - len(prompt)
            alone = model(torch.tensor([prompt]), output_hidden_states=True)
            assert (batch.logits[row, pads:] - alone.logits[0]).abs().max() <= 1e-10
            for got, want in zip(batch.hidden_states, alone.hidden_states, strict=True):
                assert (got[row, pads:] - want[0]).abs().max() <= 1e-10
            continued = model(step[row : row + 1], cache=alone.cache).logits
            assert (after.logits[row] - continued[0]).abs().max() <= 1e-10
    assert batch.cache.seq_length == width and after.cache.seq_length == width + 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # GPT-2's recipe: each row's own positions
    model(ids, attention_mask=mask, position_ids=positions, use_cache=False)


@pytest.mark.slow  # two forwards and backwards of a float64 model: about 0.4 s
def test_a_left_padded_loss_and_its_gradients_equal_the_rows_scored_alone() -> None:
    """The pads' labels and each row's first token (nothing but pads before it) are not scored."""
    model = tiny_hf_model("swa").double()
    ids, mask = left_padded([PROMPTS[0], PROMPTS[0][:5]])
    labels = ids.masked_fill(mask == 0, -100)
    batch = model(ids, attention_mask=mask, labels=labels).loss
    batch.backward()
    batch_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    first = model(ids[:1]).logits[0, :-1]
    second = model(ids[1:, 4:]).logits[0, :-1]
    logits = torch.cat((first, second))
    alone = torch.nn.functional.cross_entropy(logits, torch.cat((ids[0, 1:], ids[1, 5:])))
    alone.backward()
    assert abs(batch.item() - alone.item()) <= 1e-12
    for got, parameter in zip(batch_grads, model.parameters(), strict=True):
        assert (got - parameter.grad).abs().max() <= 1e-12


@pytest.mark.slow  # beam search and sampling over 4 prompts: about 1 s
def test_left_padded_beams_samples_and_no_cache_follow_each_row() -> None:
    model = tiny_hf_model("swa")
    ids, mask = left_padded(PROMPTS)
    options = {"max_new_tokens": 4, "pad_token_id": PAD, "do_sample": False}
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, **options)
        assert torch.equal(model.generate(ids, attention_mask=mask, use_cache=False, **options), cached)
        beams = model.generate(ids, attention_mask=mask, num_beams=3, num_return_sequences=2, **options)
        for row, prompt in enumerate(PROMPTS):
            alone = model.generate(torch.tensor([prompt]), num_beams=3, num_return_sequences=2, **options)
            assert torch.equal(beams[2 * row : 2 * row + 2, ids.shape[1] :], alone[:, len(prompt) :])
        out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **options)
        longer = torch.cat((mask, torch.ones_like(out.sequences[:, ids.shape[1] :])), dim=1)
        more = model.generate(out.sequences, attention_mask=longer, cache=out.cache, **options)
        whole = model.generate(ids, attention_mask=mask, **{**options, "max_new_tokens": 8})
    assert torch.equal(more, whole)


@pytest.mark.slow  # six refusals, two of them after generate()'s set-up, and two forwards: about 0.3 s
def test_left_padding_mixed_with_other_padding_is_refused_naming_both() -> None:
    model = tiny_hf_model("swa")
    ids = torch.ones(2, 5, dtype=torch.int64)
    for mask, named in (
        ([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]], r"left padding \(row 0\) and right padding \(row 1"),
        ([[0, 1, 1, 1, 1], [1, 0, 1, 1, 1]], r"left padding \(row 0\) and a hole \(row 1"),
        ([[0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], r"left padding \(row 0\) and an empty row \(row 1"),
    ):
        with pytest.raises(ValueError, match=named):
            model(ids, attention_mask=torch.tensor(mask))
        with pytest.raises(ValueError, match=named):
            model.generate(ids, attention_mask=torch.tensor(mask), max_new_tokens=1, pad_token_id=0)
    cache = model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1] * 5])).cache
    with pytest.raises(ValueError, match=r"does not continue the left padding of the cache passed in"):
        model(ids[:, :1], cache=cache, attention_mask=torch.ones(2, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="left padding"):  # a plain cache read the pads of no row
        model(ids[:, :1], cache=model(ids).cache, attention_mask=torch.tensor([[0] + [1] * 5, [1] * 6]))


@pytest.mark.slow  # lm-eval's import and a model exported and loaded: about 3 s
def test_lm_evals_batched_generate_until_gives_the_texts_of_batch_size_1(tmp_path: Path) -> None:
    """lm-eval left-pads the prompts of a ``generate_until`` batch: refused before, at any batch size
    above 1 with prompts of different lengths."""
    pytest.importorskip("lm_eval", reason="lm-eval is the hf extra (pip install -e '.[hf]')")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from innerloop.hf.export import export_model

    folder = export_model(tiny_hf_model("swa").model, tmp_path / "exported")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    contexts = ["def f(x):", "import os", "x"]
    settings = {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False}
    requests = [Instance("generate_until", {}, (c, settings), i) for i, c in enumerate(contexts)]
    texts = {}
    for batch_size in (1, 3):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
        texts[batch_size] = lm.generate_until(requests)
    assert texts[3] == texts[1]


# inputs_embeds: refused before ("inputs_embeds is not supported"), though every mixer but TTT-E2E starts
# from the embedding's output alone. They are now read as it.


@pytest.mark.slow  # forwards and two generates of a float64 TTT model: about 1 s
def test_inputs_embeds_give_the_logits_cache_and_generation_of_their_ids() -> None:
    model = tiny_hf_model("ttt_linear").double()
    ids, mask = left_padded(PROMPTS[:2])
    embeds = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        by_ids = model(ids, attention_mask=mask, output_hidden_states=True)
        by_embeds = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        assert torch.equal(by_embeds.logits, by_ids.logits)
        for got, want in zip(by_embeds.hidden_states, by_ids.hidden_states, strict=True):
            assert torch.equal(got, want)
        step = torch.tensor([[5], [6]])
        longer = torch.cat((mask, torch.ones_like(step)), dim=1)
        continued = model(step, cache=by_embeds.cache, attention_mask=longer).logits
        assert torch.equal(continued, model(step, cache=by_ids.cache, attention_mask=longer).logits)
        options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": PAD}
        generated = model.generate(inputs_embeds=embeds, attention_mask=mask, **options)
        assert torch.equal(generated, model.generate(ids, attention_mask=mask, **options)[:, ids.shape[1] :])
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    assert loss.item() == model(ids, attention_mask=mask, labels=labels).loss.item()


def test_inputs_embeds_of_another_shape_with_ids_or_for_e2e_are_refused_naming_them() -> None:
    model = tiny_hf_model("swa")
    with pytest.raises(ValueError, match=r"hidden_size=32\] .*got shape \[1, 2, 31\]"):
        model(inputs_embeds=torch.zeros(1, 2, 31))
    with pytest.raises(ValueError, match=r"got shape \[1, 2\] of torch.int64"):
        model(inputs_embeds=torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="takes input_ids or inputs_embeds: give one of them"):
        model(torch.tensor([[1, 2]]), inputs_embeds=torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match=r"not supported for the TTT-E2E model.*pass input_ids"):
        tiny_hf_model("e2e")(inputs_embeds=torch.zeros(1, 2, 32))
