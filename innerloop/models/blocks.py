"""The parts of a block: SwiGLU MLP, the causal depthwise pre-conv, the mixer factory, the block.

A block of the paper's models is::

    h = h + PreConv(RMSNorm(h))        # mamba backbone (or model.pre_conv) only
    h = h + Mixer(RMSNorm(h))          # TTT layer, full attention or sliding-window attention
    h = h + SwiGLU(RMSNorm(h))

Every part that looks back in time (the pre-conv, the mixer) takes and returns a state, so a block
runs a whole sequence, a chunk of it or one token with the same call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from innerloop.core.functional import RMSNorm, causal_depthwise_conv
from innerloop.core.layer import TTTLayer, check_device_and_dtype, check_positive_int
from innerloop.core.protocol import InnerLoss
from innerloop.core.state import TTTState, cat_rows, check_batch_rows, check_states, take_rows
from innerloop.models.attention import CausalSelfAttention, KVCache, check_hidden_states, check_not_narrower
from innerloop.models.config import MIXER_TABLE, ModelConfig, require_model_config, uses_pre_conv
from innerloop.registry import get_registry


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, the MLP of Llama and of the paper's models."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        hidden_size = check_positive_int("hidden_size", hidden_size)
        intermediate_size = check_positive_int("intermediate_size", intermediate_size)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., hidden_size]`` (any leading dims), floating point, on the weights' device and in their
        dtype (another one under ``torch.autocast``) -> ``[..., hidden_size]``."""
        check_features(x, self.gate_proj.weight)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def check_features(x: Any, weight: torch.Tensor) -> None:
    """``x`` is a floating-point ``[..., in_features]`` tensor for the linear map of ``weight [out, in]``,
    on its device and in its dtype (another one only under ``torch.autocast``); each error names ``x``,
    what it is and what is valid (shapes and dtypes only: no value is read)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [..., hidden_size], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x must have shape [..., hidden_size={weight.shape[-1]}], got {tuple(x.shape)}")
    check_device_and_dtype(x, weight)


class CausalDepthwiseConv(nn.Module):
    """Causal depthwise 1-D convolution over time (with bias) that carries its last inputs as state.

    ``forward(x [B, T, D], history [B, k-1, D] | None)`` returns ``y [B, T, D]`` and the new history:
    feeding a sequence in pieces gives the same outputs as feeding it whole.
    """

    def __init__(self, hidden_size: int, kernel_size: int) -> None:
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("kernel_size", kernel_size)
        hidden_size, kernel_size = int(hidden_size), int(kernel_size)
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(hidden_size, hidden_size, kernel_size, groups=hidden_size, bias=True)

    def forward(
        self, x: torch.Tensor, history: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convolve ``x [B, T, D]`` after ``history`` (None: zeros, a new sequence); return ``(y [B, T, D],
        the new history [B, kernel_size - 1, D])``."""
        check_hidden_states(x, self.conv.in_channels, self.conv.weight)
        batch, _, hidden = x.shape
        if history is None:  # the start of a sequence: zeros before it
            history = x.new_zeros(batch, self.kernel_size - 1, hidden)
        else:
            self.check_history(history, batch)
        return causal_depthwise_conv(x, self.conv.weight, self.conv.bias, history)

    def check_history(self, history: Any, batch: int, name: str = "history") -> None:
        """``history`` is the ``[batch, kernel_size - 1, hidden]`` tensor this conv returns (shapes only:
        no value is read, so the check costs no device sync and traces under ``torch.compile``)."""
        wanted = (batch, self.kernel_size - 1, self.conv.in_channels)
        given = tuple(history.shape) if isinstance(history, torch.Tensor) else type(history).__name__
        if given != wanted:
            raise ValueError(
                f"{name} must be the pre-conv history [batch, kernel_size - 1, hidden] = {wanted}, got "
                f"{given}: the state was made for another batch size or by another model"
            )
        if not history.is_floating_point():  # an integer history would truncate the inputs it holds
            raise TypeError(
                f"{name} is {history.dtype} but the pre-conv history holds floating-point inputs: pass the "
                "state the model returned, or None"
            )
        check_not_narrower(name, history, self.conv.weight)
        if history.device != self.conv.weight.device:
            raise ValueError(
                f"{name} is on {history.device}, the conv on {self.conv.weight.device}: move the state to it"
            )


def build_mixer(config: ModelConfig) -> nn.Module:
    """The sequence mixer named by ``config.mixer`` (an entry of :data:`~innerloop.models.config.MIXER_TABLE`);
    every mixer is called as ``y, state = m(x, state)``."""
    config = require_model_config(config)
    mixer = MIXER_TABLE.get(config.mixer)
    if mixer is None:
        raise ValueError(f"model.mixer={config.mixer!r} is not a mixer; valid mixers: {list(MIXER_TABLE)}")
    return mixer.build(config)


@dataclass(frozen=True)
class BlockState:
    """What one block carries between chunks: the pre-conv history and the mixer's state."""

    conv: torch.Tensor | None
    mixer: Any

    def detach(self) -> BlockState:
        """The same state cut from the autograd graph."""
        return BlockState(
            None if self.conv is None else self.conv.detach(),
            self.mixer.detach() if hasattr(self.mixer, "detach") else self.mixer,
        )

    def to(self, *args: Any, **kwargs: Any) -> BlockState:
        """The state moved or cast like ``Tensor.to``: the pre-conv history and the mixer's state."""
        return BlockState(
            None if self.conv is None else self.conv.to(*args, **kwargs),
            self.mixer.to(*args, **kwargs) if hasattr(self.mixer, "to") else self.mixer,
        )

    def clone(self) -> BlockState:
        """A copy whose tensors own their memory (gradients flow back through the copy)."""
        return BlockState(
            None if self.conv is None else self.conv.clone(),
            self.mixer.clone() if hasattr(self.mixer, "clone") else self.mixer,
        )

    @property
    def batch_size(self) -> int:
        """Sequences held (the pre-conv history's rows, or the mixer state's)."""
        if self.conv is not None:
            return int(self.conv.shape[0])
        return int(self.mixer.batch_size)

    def index_select(self, rows: torch.Tensor) -> BlockState:
        """The state of the sequences ``rows`` (a 1-D int64 tensor of batch rows, repeats allowed), in
        that order: the pre-conv history's rows and the mixer state's (:func:`select_mixer_rows`)."""
        return self._take_rows(check_batch_rows(rows, self.batch_size))

    def _take_rows(self, rows: torch.Tensor) -> BlockState:
        """:meth:`index_select` with ``rows`` already checked."""
        conv = None if self.conv is None else take_rows(self.conv, rows)
        return BlockState(conv, select_mixer_rows(self.mixer, rows))

    @classmethod
    def cat(cls, states: Sequence[BlockState]) -> BlockState:
        """One state holding the sequences of ``states`` one after the other (:func:`cat_mixer_states`):
        states of one block at one position, in one dtype."""
        states = check_states(states, cls, "BlockState")
        convs = [s.conv for s in states]
        if any(c is None for c in convs) and any(c is not None for c in convs):
            raise ValueError(
                "cannot concatenate BlockStates with and without a pre-conv history: other models"
            )
        conv = None if convs[0] is None else cat_rows([c for c in convs if c is not None], "conv")
        return BlockState(conv, cat_mixer_states([s.mixer for s in states]))


def registered_inner_loss(state: TTTState) -> InnerLoss | None:
    """The inner loss that reads ``state.loss_carry``: the one registered under the name the state
    records (None when the carry is empty, the loss then has nothing to say)."""
    if not state.loss_carry:
        return None
    name = state.signature.inner_loss
    try:
        return get_registry().inner_loss(name)
    except ValueError as error:
        raise ValueError(
            f"the state's loss carry was written by inner loss {name!r}, which is not registered: select "
            "its rows with TTTState.index_select(rows, inner_loss=...) given the layer's inner loss"
        ) from error


def select_mixer_rows(state: Any, rows: torch.Tensor) -> Any:
    """The mixer state ``state`` of the sequences ``rows`` (checked): a :class:`TTTState` (its loss
    carry read by its registered inner loss), a :class:`KVCache`, or a plugin mixer's state with an
    ``index_select(rows)`` method."""
    if isinstance(state, TTTState):
        return state._take_rows(rows, registered_inner_loss(state))
    if isinstance(state, KVCache):
        return state._take_rows(rows)
    if not hasattr(state, "index_select"):
        raise TypeError(
            f"the mixer state {type(state).__name__} has no index_select(rows): its rows cannot be selected"
        )
    return state.index_select(rows)


def cat_mixer_states(states: list[Any]) -> Any:
    """The mixer states ``states`` (of one type) joined along the batch, as :func:`select_mixer_rows`."""
    kinds = sorted({type(s).__name__ for s in states})
    if len(kinds) > 1:
        raise TypeError(f"cannot concatenate mixer states of different kinds {kinds}: states of other models")
    if isinstance(states[0], TTTState):
        return TTTState.cat(states, registered_inner_loss(states[0]))
    if not hasattr(type(states[0]), "cat"):
        raise TypeError(f"the mixer state {kinds[0]} has no cat(states): it cannot be concatenated")
    return type(states[0]).cat(states)


torch.serialization.add_safe_globals([BlockState])  # torch.load(weights_only=True): tensors, states


MIXER_STATES: tuple[tuple[type[nn.Module], type], ...] = (
    (TTTLayer, TTTState),
    (CausalSelfAttention, KVCache),
)
"""The state each kind of built-in mixer returns (a family layer is a TTT layer)."""


def check_mixer_state(mixer: nn.Module, state: Any, batch: int, name: str, mixer_name: str) -> None:
    """``state`` is of the kind ``mixer`` returns, for ``batch`` sequences: a state of a model with
    another mixer is named as such. The mixer checks the rest in its forward (a TTT layer) or here
    (attention's ``check_state``)."""
    for module_type, state_type in MIXER_STATES:
        if isinstance(mixer, module_type) and not isinstance(state, state_type):
            raise TypeError(
                f"{name} must be the {state_type.__name__} this model's mixer (model.mixer={mixer_name!r}) "
                f"returns, got {type(state).__name__}: the state was made by a model with another mixer; "
                "pass the state this model returned, or None"
            )
    if isinstance(state, TTTState) and state.batch_size != batch:
        raise ValueError(
            f"{name} is for batch size {state.batch_size}, input_ids has {batch}: pass the state made "
            "for this batch, or None"
        )
    if isinstance(mixer, CausalSelfAttention):
        mixer.check_state(state, batch, name)


class Block(nn.Module):
    """One residual block: optional pre-conv, mixer, SwiGLU MLP, each behind an RMSNorm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config = require_model_config(config)
        D = config.hidden_size
        self.pre_conv: CausalDepthwiseConv | None = None
        if uses_pre_conv(config):
            self.pre_conv_norm = RMSNorm(D, eps=config.norm_eps)
            self.pre_conv = CausalDepthwiseConv(D, config.pre_conv_kernel)
        self.mixer_norm = RMSNorm(D, eps=config.norm_eps)
        self.mixer = build_mixer(config)
        self.mlp_norm = RMSNorm(D, eps=config.norm_eps)
        self.mlp = SwiGLU(D, config.intermediate_size)
        self.mixer_name = config.mixer

    def check_state(self, state: Any, batch: int, name: str = "state") -> None:
        """``state`` is a :class:`BlockState` a block like this one returned for ``batch`` sequences:
        its pre-conv history (or none, without a pre-conv) and its mixer's state."""
        if not isinstance(state, BlockState):
            raise TypeError(f"{name} must be a BlockState, got {type(state).__name__}")
        if self.pre_conv is not None:
            if state.conv is None:
                raise ValueError(
                    f"{name}.conv is None, but this model's blocks have a pre-conv (mamba backbone or "
                    "model.pre_conv): the state was made by a model without one"
                )
            self.pre_conv.check_history(state.conv, batch, f"{name}.conv")
        elif state.conv is not None:
            raise ValueError(
                f"{name}.conv holds a pre-conv history, but this model's blocks have no pre-conv: the "
                "state was made by a model with one (mamba backbone or model.pre_conv)"
            )
        check_mixer_state(self.mixer, state.mixer, batch, f"{name}.mixer", self.mixer_name)

    def forward(self, h: torch.Tensor, state: BlockState | None = None) -> tuple[torch.Tensor, BlockState]:
        """``h [B, T, D]`` → ``h [B, T, D]`` and the block's new state."""
        check_hidden_states(h, self.mlp_norm.weight.shape[-1], self.mlp_norm.weight, "h")
        conv_history = None
        if self.pre_conv is not None:
            conv_out, conv_history = self.pre_conv(
                self.pre_conv_norm(h), None if state is None else state.conv
            )
            h = h + conv_out
        mixed, mixer_state = self.mixer(self.mixer_norm(h), state=None if state is None else state.mixer)
        h = h + mixed
        h = h + self.mlp(self.mlp_norm(h))
        return h, BlockState(conv_history, mixer_state)
