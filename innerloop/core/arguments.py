"""Checks of a public entry's arguments, shared by the update rules, inner models and inner losses: each
names where it is (``where``), the parameter, what was given and what is valid."""

from __future__ import annotations

import torch

from innerloop.core.wording import a_type


def check_kind(where: str, name: str, value: object, kind: type) -> None:
    """``value`` must be an instance of ``kind`` (an innerloop class)."""
    if not isinstance(value, kind):
        raise TypeError(f"{where}: {name} must be an innerloop {kind.__name__}, got {a_type(value)}")


def check_tensor(
    where: str,
    name: str,
    value: object,
    shape: tuple[int | None, ...],
    what: str,
    like: torch.Tensor | None,
    like_name: str = "the state's",
) -> None:
    """``value`` must be a tensor of ``shape`` (None: any size, shown ``T``) in ``like``'s dtype and on its
    device (``like_name``: whose they are, the state's weights' by default; anything when ``like`` is None)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor {what}, got {a_type(value)}")
    given = tuple(value.shape)
    if len(given) != len(shape) or any(
        want is not None and want != got for want, got in zip(shape, given, strict=False)
    ):
        valid = ", ".join("T" if want is None else str(want) for want in shape)
        raise ValueError(f"{where}: {name} must have shape {what} = [{valid}], got {list(given)}")
    if like is None:
        return
    if value.dtype != like.dtype:
        raise TypeError(f"{where}: {name} must be in {like_name} dtype {like.dtype}, got {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{where}: {name} must be on {like_name} device {like.device}, got {value.device}")
