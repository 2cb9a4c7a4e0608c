"""Sampling from a language model (:class:`~innerloop.models.CausalLM` or
:class:`~innerloop.models.E2ELM`) through its recurrent state.

The prompt is read in chunks of :data:`PROMPT_CHUNK_TOKENS` with the state carried, keeping only the
last position's logits; then each new token is fed alone (``T = 1``) with the state of the previous
step. Nothing else is kept: with TTT or sliding-window mixers the memory is constant, however long the
prompt and however many tokens are generated.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from innerloop.core.functional import integer_or_given, is_integer
from innerloop.core.layer import NonFiniteRowsError, is_real
from innerloop.models.lm import check_token_ids

if TYPE_CHECKING:  # annotations only: generate calls the model, whatever its class
    from innerloop.models.e2e import E2ELM, E2EState
    from innerloop.models.lm import CausalLM, LMState

PROMPT_CHUNK_TOKENS = 2048
"""How many prompt tokens one model call reads: a call holds ``[B, chunk, vocab]`` logits and every block's
activations for its tokens, so reading a long prompt whole took memory growing with its length."""


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Draw one token per row from ``logits [B, V]``; ``temperature == 0`` is greedy. Returns ``[B]``.

    The distribution is transformers' for the same settings: the logits divided by ``temperature``, then
    ``top_k`` keeps exactly ``top_k`` candidates per row (the indices ``torch.topk`` picks; among tokens
    tied with the ``top_k``-th logit, the rest are dropped), then ``top_p`` keeps the smallest set of the
    most likely of those whose probabilities add up to ``top_p`` or more (nucleus sampling; the most
    likely token always stays; None or 1: no cut). ``-inf`` logits (masked tokens) are never drawn; a
    row holding NaN or ``+inf``, or ``-inf`` for every token, is refused with a ValueError.
    ``temperature``, ``top_k``, ``top_p`` and ``generator`` are checked as :func:`generate` checks them.
    """
    tensor = isinstance(logits, torch.Tensor)
    if not tensor or logits.dim() != 2 or not logits.is_floating_point() or logits.shape[-1] < 1:
        described = f"{logits.dtype} {tuple(logits.shape)}" if tensor else type(logits).__name__
        raise ValueError(
            f"logits must be a floating-point tensor [batch, vocab] with vocab >= 1, got {described}"
        )
    temperature, top_k = _checked_sampling(temperature, top_k, generator)
    top_p = _checked_top_p(top_p)
    _check_generator_device(generator, temperature, logits.device, "logits")
    bad = _non_finite_rows(logits)
    if bad:
        raise ValueError(
            f"logits are not finite in rows {bad} (NaN or +inf, or -inf for every token): there is no "
            "distribution to draw a token from"
        )
    return _draw(logits, temperature, top_k, generator, top_p)


def _non_finite_rows(logits: torch.Tensor) -> list[int]:
    """The rows of ``logits [B, V]`` that hold NaN or ``+inf``, or ``-inf`` for every token (one
    reduction: a row's maximum is finite iff none of these holds, since max propagates NaN)."""
    finite = torch.isfinite(logits.amax(dim=-1))  # [B]
    if bool(finite.all()):
        return []
    return (~finite).nonzero().flatten().tolist()


def _non_finite_logits_error(
    model: CausalLM | E2ELM, state: LMState | E2EState, step: int, rows: list[int]
) -> NonFiniteRowsError:
    """generate's error for non-finite logits at ``step`` in batch ``rows``, with the model's own
    diagnosis where it has one (``E2ELM.explain_non_finite_logits``: a call that only scores is unchecked)."""
    read = "the prompt" if step == 0 else f"the prompt and {step} sampled token(s)"
    explain = getattr(model, "explain_non_finite_logits", None)
    cause = (
        explain(state, rows)
        if callable(explain)
        else "the model's weights or its state have overflowed or hold NaN"
    )
    error = NonFiniteRowsError(
        f"generate: the model produced non-finite logits at step {step} (after reading {read}) "
        f"in rows {rows}: NaN or +inf, or -inf for every token, from which no token can be drawn; {cause}"
    )
    error.rows = rows
    error.finite_rows = sorted(set(range(state.batch_size)) - set(rows))
    return error


def _draw(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
    top_p: float | None = None,
) -> torch.Tensor:
    """:func:`sample_next` on logits already checked."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Subtract the largest logit first (the most likely token then scores 0, the others < 0), and divide
    # in float64: exact for any positive temperature, however small. (Dividing first overflows to
    # inf - inf = NaN for a tiny temperature, and a temperature below float32's range rounds to 0.)
    logits = logits.double()
    logits = ((logits - logits.amax(dim=-1, keepdim=True)) / temperature).float()  # [B, V], max 0
    if top_k is not None and top_k < logits.shape[-1]:
        # Keep the k entries topk picks, by index: a threshold (logits < k-th value) would keep every
        # token tied with the k-th, more than k candidates.
        kept = torch.topk(logits, top_k, dim=-1)  # values, indices [B, k]
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, kept.indices, kept.values)
    if top_p is not None and top_p < 1:
        logits = _nucleus(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    model: CausalLM | E2ELM,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    top_p: float | None = None,
) -> Iterator[tuple[torch.Tensor, LMState | E2EState]]:
    """An iterator of ``(tokens [B], state)`` for each of ``max_new_tokens`` sampled tokens.

    Args:
        model: the language model (put in eval mode by the caller).
        prompt_ids: ``[B, P]`` token ids with ``B >= 1`` and ``P >= 1``, each in
            ``[0, model.config.vocab_size)`` (a batch of 0 prompts is refused, as transformers' does).
        max_new_tokens: how many tokens to sample (an int >= 0).
        temperature: softmax temperature, a finite real number >= 0; 0 means greedy decoding.
        top_k: sample only among the ``top_k`` most likely tokens (an int >= 1; None: all).
        top_p: then only among the fewest most likely of those whose probabilities (at ``temperature``)
            add up to ``top_p`` or more: nucleus sampling, as transformers' ``top_p`` (a real number in
            [0, 1]; 0 keeps the most likely token alone; None or 1: no cut).

    Each number may be given as a Python number, a numpy scalar or 0-d array, or a 0-d tensor (an int where an int is
    asked: ``top_k=4.0`` and a tensor of more than one element are refused, naming the argument).
        generator: torch RNG for reproducible sampling, on the kind of device the model runs on (a CPU
            generator for a CUDA model is refused when sampling, temperature > 0).
        eos_token_id: an end-of-sequence id (or several: a list, or a 1-D tensor or numpy array): a row that has sampled one yields the first
            of them from then on, and the iterator ends once every row has (None: never). Each must
            be in the vocabulary (one outside it, which no row can sample, is refused as a mistaken id;
            ``innerloop generate`` drops a tokenizer's end id past the vocabulary, and Hugging Face
            ``generate`` takes a config's, both then ending no row at it).

    The arguments (the model's type among them) are checked when ``generate`` is called; the model runs as the iterator is read
    (with ``max_new_tokens=0`` the iterator is empty and the model never runs). Logits the model
    produces with NaN or ``+inf`` (or ``-inf`` for every token) raise a ValueError naming the step.
    Each ``state`` is the one its ``tokens`` were sampled from: it has read the prompt and the earlier
    tokens, not ``tokens`` (``model(tokens[:, None], state)`` continues the sequence). It is yielded so
    that callers can inspect it (e.g. its size) or continue from it; the iterator itself keeps only the
    latest state and the latest token.
    """
    _check_model(model)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    check_token_ids(prompt_ids, vocab_size if is_integer(vocab_size) else None, "prompt_ids", min_length=1)
    if prompt_ids.shape[0] == 0:
        raise ValueError(
            f"prompt_ids of batch size 0 (shape {list(prompt_ids.shape)}): there is no prompt to continue; "
            "give at least one row [batch >= 1, length >= 1]"
        )
    max_new_tokens = integer_or_given(max_new_tokens)
    if not is_integer(max_new_tokens) or max_new_tokens < 0:
        raise _bad("max_new_tokens", max_new_tokens, "an int >= 0", is_integer(max_new_tokens))
    temperature, top_k = _checked_sampling(temperature, top_k, generator)
    top_p = _checked_top_p(top_p)
    _check_prompt_device(model, prompt_ids)
    _check_generator_device(generator, temperature, prompt_ids.device, "prompt_ids")
    stops = _checked_eos(eos_token_id, vocab_size if is_integer(vocab_size) else None)
    return _sample(model, prompt_ids, int(max_new_tokens), temperature, top_k, generator, stops, top_p)


def _check_model(model: object) -> None:
    """``model`` is something :func:`generate` can call as ``logits, state = model(ids, state)``: refused
    now, before the iterator is read, if it is not callable, or if it is a Hugging Face model (a
    ``transformers.PreTrainedModel``, such as ``InnerloopForCausalLM``), whose forward returns an output
    object instead. A module of the user's own that wraps an innerloop model is taken as it is."""
    if not callable(model):
        raise TypeError(
            f"model must be an innerloop language model (CausalLM or E2ELM), got {type(model).__name__}"
        )
    if _is_hugging_face_model(model):
        raise TypeError(
            f"model is a Hugging Face model ({type(model).__name__}), whose forward returns an output "
            "object, not (logits, state): use model.generate(...) (transformers' generate) for it, or "
            "innerloop.models.generate(model.model, ...) for the innerloop model it holds"
        )


def _is_hugging_face_model(model: object) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (told by its classes, without importing
    transformers: a model of it exists only once transformers is imported)."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
        for cls in type(model).__mro__
    )


def _checked_eos(eos_token_id: object, vocab_size: int | None) -> list[int]:
    """``eos_token_id`` as a list of ids (empty for None), each an int in the vocabulary."""
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if is_integer(eos_token_id) else _listed(eos_token_id)
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids:
        raise TypeError(f"eos_token_id must be a token id, a non-empty list of them, or None, got {ids!r}")
    for token in ids:
        if not is_integer(token) or token < 0 or (vocab_size is not None and token >= vocab_size):
            valid = "an int >= 0" if vocab_size is None else f"an int in 0..{vocab_size - 1}"
            raise _bad("eos_token_id", token, valid, is_integer(token))
    return [int(token) for token in ids]


def _listed(ids: object) -> object:
    """A 1-D tensor or numpy array of ids as the list of its elements (transformers' ``generate()`` takes
    ``eos_token_id`` so), each then checked as an id; anything else as it is."""
    array = isinstance(ids, torch.Tensor) or type(ids).__name__ == "ndarray"  # numpy is not imported here
    if array and getattr(ids, "ndim", None) == 1:
        return list(ids)
    return ids


def _real_or_given(value: object) -> object:
    """A 0-d real tensor or numpy array (not bool, not complex) as the Python number it holds, else ``value``
    itself: a real argument is taken as a Python number, a numpy scalar or 0-d array, or a 0-d tensor, as an
    integer one is
    (:func:`~innerloop.core.functional.as_integer`)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        if not value.dtype.is_complex:
            return value.item()
    # a 0-d numpy array (numpy.array(0.5)), as as_integer takes numpy.array(3): numpy is not imported here
    if type(value).__name__ == "ndarray" and getattr(value, "ndim", None) == 0 and value.dtype.kind in "fiu":
        return value.item()
    return value


def _checked_sampling(temperature: object, top_k: object, generator: object) -> tuple[float, int | None]:
    """``(temperature, top_k)`` as a float and an int (or None), each checked and named if wrong; each a
    Python number, a numpy scalar or 0-d array, or a 0-d tensor."""
    temperature = _real_or_given(temperature)
    if not (is_real(temperature) and temperature >= 0):  # is_real: finite (10**400 too), not a bool
        raise _bad(
            "temperature", temperature, "a finite real number >= 0 (0 is greedy)", _is_real(temperature)
        )
    if top_k is not None and (not is_integer(top_k) or top_k < 1):
        raise _bad("top_k", top_k, "an int >= 1, or None for all tokens", is_integer(top_k))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return float(temperature), None if top_k is None else int(top_k)


def _checked_top_p(top_p: object) -> float | None:
    """``top_p`` as a float in [0, 1] (or None), named if wrong; a Python number, a numpy scalar or 0-d
    array, or a 0-d tensor."""
    if top_p is None:
        return None
    top_p = _real_or_given(top_p)
    if not (is_real(top_p) and 0 <= top_p <= 1):
        raise _bad("top_p", top_p, "a real number in [0, 1], or None for no cut", _is_real(top_p))
    return float(top_p)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits [B, V]`` with every token outside its row's nucleus set to ``-inf``: the nucleus is the
    fewest most likely tokens whose probabilities add up to ``top_p`` or more (the most likely token is
    always in it). The same cut as transformers' ``TopPLogitsWarper``: a token is dropped where the
    probabilities of the tokens less likely than it, and its own, add up to ``1 - top_p`` or less. The
    sums are taken in float64."""
    ascending, order = torch.sort(logits, dim=-1)  # [B, V] each
    mass_up_to = torch.softmax(ascending.double(), dim=-1).cumsum(dim=-1)  # [B, V]
    dropped = mass_up_to <= 1 - top_p
    dropped[:, -1] = False  # the most likely token stays whatever top_p is
    return logits.masked_fill(dropped.scatter(-1, order, dropped), float("-inf"))


def _check_prompt_device(model: object, prompt_ids: torch.Tensor) -> None:
    """Refuse, when called, ``prompt_ids`` on another device than the model's weights (torch refused
    them only once the iterator ran, in the embedding, in its own words). A model without parameters
    (a user's wrapper that holds none) is not checked."""
    weights = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
    first = next(weights, None)
    if first is not None and first.device != prompt_ids.device:
        raise ValueError(
            f"prompt_ids are on {prompt_ids.device} but the model's weights are on {first.device}: "
            f"move the prompt to the model's device (prompt_ids.to('{first.device}'))"
        )


def _check_generator_device(
    generator: torch.Generator | None, temperature: float, device: torch.device, tensors: str
) -> None:
    """Refuse, when called, a ``generator`` that sampling (``temperature > 0``; greedy decoding never reads
    it) would use on another kind of device than ``tensors``: torch draws the tokens where the logits
    are, and refused such a generator only once sampling began, in its own words."""
    if generator is not None and temperature > 0 and generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device.type} but {tensors} are on {device}: tokens are drawn where "
            f"the logits are; pass torch.Generator(device='{device.type}') (or None)"
        )


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bad(name: str, value: object, valid: str, right_type: bool) -> Exception:
    """The error for argument ``name``: a ValueError if only its value is wrong, else a TypeError."""
    given = f"{name}={value!r}" if right_type else f"{name}={value!r} ({type(value).__name__})"
    return (ValueError if right_type else TypeError)(f"{given} must be {valid}")


def _read_prompt(
    model: CausalLM | E2ELM, prompt_ids: torch.Tensor
) -> tuple[torch.Tensor, LMState | E2EState]:
    """``(logits [B, V] at the prompt's last position, the state after it)``, read without autograd in
    chunks of :data:`PROMPT_CHUNK_TOKENS` (any split of a sequence with the state carried equals the whole)."""
    state = None
    with torch.no_grad():
        for start in range(0, prompt_ids.shape[1], PROMPT_CHUNK_TOKENS):
            logits, state = model(prompt_ids[:, start : start + PROMPT_CHUNK_TOKENS], state)
            last = logits[:, -1].clone()  # [B, V]: its own copy, so that the chunk's [B, T, V] logits can go
            del logits
    return last, state


def _sample(
    model: CausalLM | E2ELM,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
    stops: list[int],
    top_p: float | None,
) -> Iterator[tuple[torch.Tensor, LMState | E2EState]]:
    """:func:`generate` on checked arguments. The model runs without autograd; grad mode is set around
    each call (not by decorating this generator, whose wrapper printed a traceback at interpreter exit
    for an iterator left half read)."""
    if max_new_tokens == 0:  # nothing to sample: the prompt need not be read
        return
    last, state = _read_prompt(model, prompt_ids)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=prompt_ids.device)
    ended = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)  # [B]
    for step in range(max_new_tokens):
        if stops:  # an ended row repeats its end-of-sequence id whatever it scores: not refused
            last = torch.where(ended[:, None], torch.zeros_like(last), last)
        bad = _non_finite_rows(last)
        if bad:
            raise _non_finite_logits_error(model, state, step, bad)
        token = _draw(last, temperature, top_k, generator, top_p)  # [B]
        if stops:  # a row that has ended repeats its end-of-sequence id
            token = torch.where(ended, stop_ids[0], token)
            ended |= torch.isin(token, stop_ids)
        yield token, state
        if stops and bool(ended.all()):
            return
        if step + 1 < max_new_tokens:  # the last token is not read: nothing would sample after it
            with torch.no_grad():
                logits, state = model(token[:, None], state)
            last = logits[:, -1]
