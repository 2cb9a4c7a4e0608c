"""The recurrent state of a TTT layer: its decoding cache.

A TTT layer is an RNN. Its state after reading ``position`` tokens is:

- ``params``: the inner weights at the start of the current mini-batch, ``[B, H, *shape]``;
- ``pending``: the lr-weighted gradient sums ``sum_j lr_j * grad_j`` of the tokens already read in
  the current mini-batch (zero at a mini-batch boundary), same shapes as ``params``;
- ``loss_carry``: what the inner loss needs from earlier tokens (e.g. the previous key);
- ``conv_history``: the last ``k - 1`` inputs of the causal convolutions (share_qk);
- ``momentum``: the ``momentum`` rule's surprise momentum ``S`` per weight (same shapes as
  ``params``), carried across mini-batches; empty when no momentum was given;
- ``decay``: ``{"product": [B, H]}``, the product of the decays (forgetting) of the tokens already
  read in the current mini-batch; empty when it is 1 (at a boundary, or without decay).

The weights a token at mini-batch offset ``i`` sees are ``product * params - tau_i * pending``
(after adding its own step; without decay ``params - tau_i * pending``), which is why this is
enough to continue a sequence from any split point (:meth:`TTTState.current_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

#: The groups of tensors of a state, in the order :meth:`TTTState.tensors` lists them.
TENSOR_GROUPS = ("params", "pending", "loss_carry", "conv_history", "momentum", "decay")
#: The signature's fields :meth:`TTTState.metadata` writes only when they are recorded (not None).
OPTIONAL_METADATA = ("update_rule", "layer", "inner_output")


def inner_output_label(inner_norm: bool, inner_residual: bool) -> str:
    """:attr:`StateSignature.inner_output` of ``f(x) = [x +] [LN](g(x))`` with these options."""
    return {(True, True): "residual+norm", (True, False): "norm", (False, True): "residual"}.get(
        (inner_norm, inner_residual), "bare"
    )


@dataclass(frozen=True)
class StateSignature:
    """What a state must agree on with the layer (and the input) that continues it.

    ``update_rule``, ``layer`` (the layer's class: ``TTTLayer``, ``DeltaNetLayer``,
    ``GatedDeltaNetLayer``, ...) and ``inner_output`` (what the inner model's output passes through:
    ``"residual+norm"``, ``"norm"``, ``"residual"`` or ``"bare"``, see :func:`inner_output_label`) are
    recorded by the layers: a state's pending sums are gradients of that function, which another
    option would read as another one's. They are None (not recorded) for a state built outside a
    layer (``innerloop.ops.scan``, the testing kit), which no layer takes.
    """

    batch_size: int
    num_heads: int
    head_dim: int
    mini_batch_size: int
    inner_model: str
    inner_loss: str
    update_rule: str | None = None
    layer: str | None = None
    inner_output: str | None = None


@dataclass(frozen=True)
class TTTState:
    """State of a TTT layer after ``position`` tokens. Immutable: layers return a new one."""

    params: dict[str, torch.Tensor]
    pending: dict[str, torch.Tensor]
    position: int
    signature: StateSignature
    loss_carry: dict[str, torch.Tensor] = field(default_factory=dict)
    conv_history: dict[str, torch.Tensor] = field(default_factory=dict)
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    decay: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.signature.batch_size

    @property
    def offset(self) -> int:
        """Position inside the current mini-batch (0 at a boundary)."""
        return self.position % self.signature.mini_batch_size

    def _map(self, fn) -> TTTState:
        return replace(
            self,
            params={k: fn(v) for k, v in self.params.items()},
            pending={k: fn(v) for k, v in self.pending.items()},
            loss_carry={k: fn(v) for k, v in self.loss_carry.items()},
            conv_history={k: fn(v) for k, v in self.conv_history.items()},
            momentum={k: fn(v) for k, v in self.momentum.items()},
            decay={k: fn(v) for k, v in self.decay.items()},
        )

    def detach(self) -> TTTState:
        """The same state cut from the autograd graph (truncated backpropagation, decoding)."""
        return self._map(lambda t: t.detach())

    def to(self, *args, **kwargs) -> TTTState:
        """Move or cast every tensor, like ``Tensor.to``."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def clone(self) -> TTTState:
        """A copy whose tensors own their memory (gradients flow back through the copy)."""
        return self._map(lambda t: t.clone())

    def decay_product(self) -> torch.Tensor | None:
        """``[B, H]``: the product of the decays read so far in the current mini-batch (None: 1)."""
        return self.decay.get("product")

    def current_weights(self, tau: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The inner weights after the last token read: ``product * params - tau_i * pending``, with
        ``i`` the last token's offset in its mini-batch (``params`` itself at a boundary).

        Args:
            tau: ``[K]`` the token-index scales the state was written with (None: 1, as for the
                ``momentum`` rule).
        """
        if self.offset == 0:
            return dict(self.params)
        scale = 1.0 if tau is None else tau[self.offset - 1]
        product = self.decay_product()
        weights = {}
        for key, value in self.params.items():
            base = (
                value
                if product is None
                else product.reshape(product.shape + (1,) * (value.dim() - 2)) * value
            )
            weights[key] = base - scale * self.pending[key]
        return weights

    def scan_weights(self, tau: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The state as ``innerloop.ops.scan`` returns it: :meth:`current_weights` by name, plus
        ``"momentum.<name>"`` for the momentum ``S`` when it is carried."""
        momentum = {f"momentum.{k}": v for k, v in self.momentum.items()}
        return {**self.current_weights(tau), **momentum}

    def with_weights(self, weights: dict[str, torch.Tensor]) -> TTTState:
        """This state with its inner weights (and momentum) replaced by ``weights``, as
        :meth:`scan_weights` gives them (``innerloop.ops.scan``'s ``initial`` and its result): the
        inverse of :meth:`scan_weights` at a mini-batch boundary, where a state is only weights."""
        if self.offset != 0:
            raise ValueError(
                f"with_weights: the state is inside a mini-batch (position {self.position}, mini_batch_size "
                f"{self.signature.mini_batch_size}); weights alone describe only a state at a boundary"
            )
        names = set(self.params) | {f"momentum.{k}" for k in self.params}
        unknown = sorted(set(weights) - names)
        missing = sorted(set(self.params) - set(weights))
        if unknown or missing:
            raise ValueError(f"weights: missing {missing}, unknown {unknown}; valid names: {sorted(names)}")
        params = {k: weights[k] for k in self.params}
        momentum = {k: weights[f"momentum.{k}"] for k in self.params if f"momentum.{k}" in weights}
        pending = {k: torch.zeros_like(v) for k, v in params.items()}
        return replace(self, params=params, pending=pending, momentum=momentum, decay={})

    def is_finite(self) -> bool:
        """False if any tensor of the state holds NaN or inf (e.g. after ``non_finite='ignore'``)."""
        return all(bool(torch.isfinite(t).all()) for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor under a flat name (for serialisation, e.g. with safetensors)."""
        flat: dict[str, torch.Tensor] = {}
        for group in TENSOR_GROUPS:
            for key, value in getattr(self, group).items():
                flat[f"{group}.{key}"] = value
        return flat

    def metadata(self) -> dict[str, str]:
        """The non-tensor fields as strings (safetensors metadata)."""
        sig = self.signature
        return {
            "position": str(self.position),
            "batch_size": str(sig.batch_size),
            "num_heads": str(sig.num_heads),
            "head_dim": str(sig.head_dim),
            "mini_batch_size": str(sig.mini_batch_size),
            "inner_model": sig.inner_model,
            "inner_loss": sig.inner_loss,
            **{key: value for key in OPTIONAL_METADATA if (value := getattr(sig, key)) is not None},
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> TTTState:
        """Inverse of :meth:`tensors` + :meth:`metadata`."""
        groups: dict[str, dict[str, torch.Tensor]] = {group: {} for group in TENSOR_GROUPS}
        for name, value in tensors.items():
            group, _, key = name.partition(".")
            if group not in groups or not key:
                raise ValueError(
                    f"state tensor name {name!r} is not of the form '<group>.<key>' with group in {sorted(groups)}"
                )
            groups[group][key] = value
        try:
            signature = StateSignature(
                batch_size=int(metadata["batch_size"]),
                num_heads=int(metadata["num_heads"]),
                head_dim=int(metadata["head_dim"]),
                mini_batch_size=int(metadata["mini_batch_size"]),
                inner_model=metadata["inner_model"],
                inner_loss=metadata["inner_loss"],
                **{key: metadata[key] for key in OPTIONAL_METADATA if key in metadata},
            )
            position = int(metadata["position"])
        except KeyError as missing:
            raise ValueError(f"state metadata lacks {missing}; got keys {sorted(metadata)}") from None
        return cls(position=position, signature=signature, **groups)


__all__ = ["TENSOR_GROUPS", "StateSignature", "TTTState", "inner_output_label"]
