"""``InnerloopForCausalLM``: every innerloop language model as a Hugging Face ``PreTrainedModel`` with
``GenerationMixin``.

The wrapped network is exactly the one :func:`innerloop.models.build_model` builds from the config's
``model`` section (a :class:`~innerloop.models.CausalLM` with any mixer and plugins, or the TTT-E2E
:class:`~innerloop.models.E2ELM`), held as ``self.model``: the logits are innerloop's own.

``generate()`` decodes through innerloop's recurrent state. The state travels between steps in an
:class:`InnerloopCache` (the ``cache`` of the outputs); the prompt is read in one call and each new
token alone, so with TTT or sliding-window mixers the memory does not grow with the tokens generated.
innerloop models read every token into their state, so padding before a token (left padding) cannot
be masked out: a batch must hold prompts of one length (batch size 1 in lm-eval's ``generate_until``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from innerloop.hf.configuration import InnerloopConfig
from innerloop.hf.remote_code import AUTO_MAP, write_shims
from innerloop.models import E2EState, LMState, build_model


class InnerloopCache:
    """The recurrent state of an innerloop model between calls, as ``generate()`` carries it.

    Attributes:
        state: innerloop's :class:`~innerloop.models.LMState` or :class:`~innerloop.models.E2EState`.
        seq_length: tokens read so far.

    Its size does not depend on ``seq_length`` for TTT and sliding-window mixers (full attention keeps
    every key and value). Beam search cannot reorder it (transformers then says so).
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, state: LMState | E2EState, seq_length: int):
        self.state = state
        self.seq_length = seq_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens read so far (``layer_idx`` is ignored: every block has read the same tokens)."""
        return self.seq_length

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return self.state.nbytes()


@dataclass
class InnerloopCausalLMOutput(ModelOutput):
    """Output of :meth:`InnerloopForCausalLM.forward`.

    Attributes:
        loss: mean next-token cross-entropy over the labels that are not -100 (when labels are given).
        logits: ``[B, T, vocab]``.
        cache: the state after the last token (:class:`InnerloopCache`), unless ``use_cache=False``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: InnerloopCache | None = None


def check_attention_mask(attention_mask: torch.Tensor | None, cached: bool) -> None:
    """Refuse a mask that would need a token to be skipped by the state (left or inner padding).

    A mask of ones, or ones then zeros in each row (right padding, e.g. a batch of scoring requests),
    is fine: a causal model's logits at a position never see the positions after it.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return
    mask = attention_mask.to(torch.int64)  # [B, L]
    rises = bool((mask[:, 1:] > mask[:, :-1]).any()) if mask.shape[1] > 1 else False
    if rises or cached:
        raise ValueError(
            "attention_mask has padding before a token (left padding): innerloop models read every "
            "token into their recurrent state, so padding cannot be skipped. Pass prompts of one length "
            "without padding (e.g. batch size 1), or pad on the right only when scoring"
        )


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse an id outside ``[0, vocab_size)`` (e.g. a tokenizer's special token past the bytes),
    naming it, rather than let the embedding fail with an index error."""
    if input_ids.numel() == 0:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise ValueError(
            f"input_ids holds token id {bad}, outside the model's vocabulary of {vocab_size} tokens "
            f"(0..{vocab_size - 1}); a byte-level model's tokenizer has <|endoftext|> at 256, which the "
            "model never saw (in lm-eval, give prefix_token_id=10 for tasks with empty contexts)"
        )


class InnerloopPreTrainedModel(PreTrainedModel):
    """Base class of innerloop's Hugging Face models: the config class and how weights are set up."""

    config_class = InnerloopConfig
    config: InnerloopConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _is_stateful = True
    _no_split_modules: list[str] = []

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: innerloop's modules initialise themselves when they are built (innerloop's scheme)."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``, stricter and complete for innerloop models.

        Every weight of the model must be in the folder, and nothing else: a missing, unexpected or
        mismatched weight raises ``ValueError`` naming it (transformers would only warn, and leave
        missing weights uninitialised). transformers builds the model on the meta device and leaves
        its non-persistent buffers (e.g. the TTT layer's RoPE table) empty: they are copied from a
        freshly built network, whatever plugin registered them.
        """
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {
            kind: sorted(info.get(kind) or ())
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if info.get(kind)
        }
        if problems:
            raise ValueError(
                f"{args[0] if args else kwargs.get('pretrained_model_name_or_path')!r} does not hold the "
                f"weights of the model its config.json describes: {problems}"
            )
        model._refresh_non_persistent_buffers()
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        """transformers' ``save_pretrained``, plus ``auto_map`` in config.json and the two modules it
        names (:mod:`innerloop.hf.remote_code`), so that the folder also loads with
        ``trust_remote_code=True`` where innerloop is installed but not imported."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        write_shims(save_directory)

    def _refresh_non_persistent_buffers(self) -> None:
        buffers = dict(self.named_non_persistent_buffers())  # type: ignore[attr-defined]
        if not buffers:
            return
        with torch.device("cpu"):
            fresh = build_model(self.config.model_config)
        fresh_buffers = {f"model.{k}": v for k, v in fresh.named_buffers()}
        with torch.no_grad():
            for name, buffer in buffers.items():
                value = fresh_buffers[name].to(device=buffer.device, dtype=buffer.dtype)
                _set_buffer(self, name, value)


def _set_buffer(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the buffer ``name`` (dotted) of ``root`` with ``value``, keeping it non-persistent."""
    owner_name, _, buffer_name = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    owner.register_buffer(buffer_name, value, persistent=False)


class InnerloopForCausalLM(InnerloopPreTrainedModel, GenerationMixin):
    """An innerloop language model (``config.model_config``) with transformers' API.

    ``model(input_ids).logits`` equals ``build_model(config.model_config)(input_ids)[0]`` with the same
    weights. ``generate()`` supports GenerationMixin's options (greedy, sampling with top-k/top-p,
    repetition penalty, stopping criteria, streamers); the cache is innerloop's recurrent state.

    >>> import torch
    >>> from innerloop.hf import InnerloopConfig, InnerloopForCausalLM
    >>> model = InnerloopForCausalLM(InnerloopConfig(model={"hidden_size": 32, "num_heads": 2})).eval()
    >>> model(torch.tensor([[104, 105]])).logits.shape
    torch.Size([1, 2, 256])
    """

    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: InnerloopConfig):
        super().__init__(config)
        self.model = build_model(config.model_config)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No: the cache is innerloop's own state, made by the first forward (as Mamba's used to be)."""
        return False

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding ``[vocab, hidden]``."""
        return self.model.embed

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head (tied to the embedding unless ``model.tie_embeddings`` is false)."""
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: InnerloopCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> InnerloopCausalLMOutput | tuple:
        """``input_ids [B, T]`` -> logits ``[B, T, vocab]``, continuing from ``cache`` when given.

        Args:
            input_ids: token ids, ``[batch, length]``.
            attention_mask: ``[batch, cached + length]``; only ones, or right padding (see
                :func:`check_attention_mask`).
            cache: the :class:`InnerloopCache` of the previous call, to continue its sequence.
            labels: ``[batch, length]`` token ids; the loss is the next-token cross-entropy (labels
                shifted inside, -100 ignored).
            use_cache: return the state as ``cache`` (default: ``config.use_cache``).
            inputs_embeds: not supported (innerloop models start from token ids).
            return_dict: a tuple instead of the output object when false.
            **kwargs: what generate() passes along and a recurrent model has no use for
                (``position_ids``, ``output_attentions`` ...): ignored.
        """
        if inputs_embeds is not None or input_ids is None:
            raise ValueError(
                "InnerloopForCausalLM takes input_ids (token ids [batch, length]); inputs_embeds is not "
                "supported"
            )
        if cache is not None and not isinstance(cache, InnerloopCache):
            raise ValueError(
                f"cache must be the InnerloopCache returned by a previous call, got {type(cache).__name__}"
            )
        check_attention_mask(attention_mask, cached=cache is not None)
        check_token_ids(input_ids, self.config.vocab_size)
        logits, state = self.model(input_ids, None if cache is None else cache.state)  # [B, T, V]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        seen = (0 if cache is None else cache.seq_length) + input_ids.shape[1]
        new_cache = InnerloopCache(state, seen) if use_cache else None
        loss = None if labels is None else next_token_loss(logits, labels)
        output = InnerloopCausalLMOutput(loss=loss, logits=logits, cache=new_cache)
        return output if return_dict is not False else output.to_tuple()

    def _reorder_cache(self, cache: InnerloopCache, beam_idx: torch.Tensor) -> InnerloopCache:
        raise ValueError(
            "beam search is not supported by innerloop models (their recurrent state cannot be "
            "reordered between beams); use greedy decoding or sampling (num_beams=1)"
        )


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, T, V]`` at position t against ``labels [B, T]`` at t + 1
    (-100 ignored), in float32."""
    shifted_logits = logits[:, :-1].float()  # [B, T-1, V]
    shifted_labels = labels[:, 1:].to(logits.device)  # [B, T-1]
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1), ignore_index=-100
    )
