"""Choosing a fast path for a run of whole mini-batches, and falling back to torch.

The update rule hands over the block; this module asks the registry for the kernels registered for
(inner model, inner loss, update rule), keeps the first by priority whose ``verify`` accepts the
inputs, and otherwise runs the pure-torch ``fallback``. Every decision is reported through
``InnerTask.on_dispatch`` so that a layer can show which path ran and why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from innerloop.core.functional import transformed_or_dual
from innerloop.core.identity import registered_mismatch
from innerloop.core.layer import TTTLayer
from innerloop.core.protocol import InnerTask, Params, UpdateRule
from innerloop.core.scan import ChunkInputs
from innerloop.kernels import first_use
from innerloop.kernels.first_use import BlockPath, TokenPath
from innerloop.kernels.spec import KernelInputs, KernelSpec, check_kernel_output, names_parameter

TORCH_PATH = "torch"


class KernelUnavailableError(RuntimeError):
    """A kernel was requested by name but cannot run on these inputs."""


class KernelCheckError(KernelUnavailableError):
    """A kernel requested by name failed its first-use check (:mod:`innerloop.kernels.first_use`)."""


TRANSFORMED_REASON = (
    "torch: inside a torch.func transform (vmap, grad, ...) or forward-mode AD, where kernels do not run"
)


def kernel_inputs(
    task: InnerTask,
    chunk: ChunkInputs,
    params: Params,
    *,
    tau: torch.Tensor | None = None,
    decode: bool = False,
    decay: bool | None = None,
    momentum: bool = False,
    closes_mini_batch: bool | None = None,
) -> KernelInputs:
    """What ``verify`` sees about a block (``tau``: the token-index scales it uses, when known;
    ``decay``: whether the block forgets, by default whether ``chunk.decay`` is given; ``momentum``:
    whether it is the momentum rule's, with its state ``S``; ``closes_mini_batch``: for a decoded
    token, whether it commits its mini-batch)."""
    tensors = (
        chunk.query,
        chunk.inputs,
        chunk.targets,
        chunk.lr,
        chunk.decay,
        tau,
        task.norm_weight,
        task.norm_bias,
    )
    present = [t for t in (*tensors, *params.values()) if t is not None]
    transformed = transformed_or_dual(present)
    requires_grad = torch.is_grad_enabled() and (
        any(t is not None and t.requires_grad for t in tensors)
        or any(p.requires_grad for p in params.values())
    )
    return KernelInputs(
        device=chunk.query.device,
        dtype=chunk.query.dtype,
        head_dim=chunk.query.shape[-1],
        mini_batch_size=task.mini_batch_size,
        num_tokens=chunk.query.shape[2],
        requires_grad=requires_grad,
        needs_double_backward=task.needs_double_backward,
        extra={
            **block_flags(
                task,
                decode=decode,
                decay=chunk.decay is not None if decay is None else decay,
                momentum=momentum,
                functorch=transformed,
                empty=chunk.query.numel() == 0,
            ),
            **({} if closes_mini_batch is None else {"closes_mini_batch": closes_mini_batch}),
        },
    )


def block_flags(
    task: InnerTask, *, decode: bool, decay: bool, momentum: bool, functorch: bool, empty: bool
) -> dict[str, bool]:
    """``KernelInputs.extra``'s flags for a block of ``task``: every caller sets each one, since a first-use
    verdict is kept under the set of them (:func:`~innerloop.kernels.first_use.signature`) and a verdict
    asked for with fewer flags is never found."""
    return {
        "residual": task.residual,
        "norm": task.use_norm,
        "decode": decode,
        "decay": decay,
        "momentum": momentum,
        "functorch": functorch,
        "empty": empty,
    }


def verify_refusal(kernel: KernelSpec, inputs: KernelInputs) -> str | None:
    """``kernel.verify(inputs)``, held to its contract (None, or a reason string): a verify that raises
    or returns anything else is a broken plugin, reported naming it, not an error of whatever layer
    happened to ask (``kernel="auto"`` asks every registered kernel)."""
    try:
        reason = kernel.verify(inputs)
    except Exception as error:
        raise RuntimeError(f"kernel {kernel.name!r}: its verify() raised {error!r}") from error
    if reason is not None and (not isinstance(reason, str) or not reason.strip()):
        raise TypeError(
            f"kernel {kernel.name!r}: verify() must return None (it can run) or a non-empty str (why not), "
            f"got {reason!r}"
        )
    return reason


def capability_refusal(kernel: KernelSpec, inputs: KernelInputs) -> str | None:
    """Why ``kernel`` cannot take what the block needs besides its tensors (decay, momentum), or None."""
    if inputs.extra.get("momentum"):
        return f"{kernel.name}: no kernel contract carries the momentum rule's state (momentum S)"
    if inputs.extra.get("decay") and not kernel.supports_decay:
        return f"{kernel.name}: does not support decay (forgetting)"
    if inputs.extra.get("decay") and inputs.extra.get("decode"):
        return f"{kernel.name}: its decode path does not take decay (forgetting)"
    norm, residual = bool(inputs.extra.get("norm")), bool(inputs.extra.get("residual"))
    if kernel.fuses_inner_norm and not (norm and residual):
        return (
            f"{kernel.name}: fuses the inner LayerNorm and residual, which need both on; this layer has "
            f"inner_norm={norm}, inner_residual={residual}"
        )
    return None


def refusal(kernel: KernelSpec, inputs: KernelInputs, task: InnerTask, rule: UpdateRule) -> str | None:
    """Why ``kernel`` does not run blocks like ``inputs`` of ``task`` under ``rule``: what they need,
    its ``verify``, or a failed first-use check of its numbers on these very plugins
    (:mod:`innerloop.kernels.first_use`); None when it may run."""
    failed = first_use.failure(kernel, inputs, task, rule)
    if failed is not None:
        return first_use.refusal_message(kernel, failed)
    return capability_refusal(kernel, inputs) or verify_refusal(kernel, inputs)


def named_kernel_refusal(
    rule: UpdateRule,
    task: InnerTask,
    *,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    requires_grad: bool,
    decay: bool = False,
    momentum: bool = False,
) -> str | None:
    """Why (a clause) the kernel ``task.kernel`` names cannot run a layer's whole mini-batches on
    ``device`` in ``dtype`` (the scan's), training (``requires_grad``) or not, as :func:`select_kernel`
    would refuse it at the first call: its ``verify``, the capabilities the layer needs, a first-use check
    it failed. None where it runs, and for ``"auto"`` and ``"torch"`` (which always run). Lets a caller
    refuse a run before it starts rather than at its first step. ``decay`` / ``momentum``: whether the
    layer's blocks carry a forgetting gate / the momentum rule's state (:func:`layer_gates`), as its
    blocks tell ``verify`` and the first-use verdicts."""
    if task.kernel in ("auto", TORCH_PATH):
        return None
    device = torch.device(device)
    # first-use verdicts are kept per GPU index; without CUDA there is none to ask (nor any verdict)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    inputs = KernelInputs(
        device=device,
        dtype=dtype,
        head_dim=head_dim,
        mini_batch_size=task.mini_batch_size,
        num_tokens=task.mini_batch_size,
        requires_grad=requires_grad,
        needs_double_backward=task.needs_double_backward,
        extra=block_flags(task, decode=False, decay=decay, momentum=momentum, functorch=False, empty=False),
    )
    try:
        select_kernel(rule, task, inputs)
    except KernelUnavailableError as error:
        return str(error).removeprefix(f"kernel={task.kernel!r} cannot run here: ")
    return None


def refused_named_kernels(
    model: torch.nn.Module,
    devices: list[torch.device],
    *,
    requires_grad: bool,
    dtype: torch.dtype | None = None,
) -> dict[str, str]:
    """``{kernel name: why}`` for the kernels that the TTT layers of ``model`` name (not ``"auto"`` or
    ``"torch"``) and that some layer naming them runs on none of ``devices`` (:func:`named_kernel_refusal`,
    the reason on the first device), training (``requires_grad``) or not, in ``dtype`` (None: each layer's
    scan dtype). Every layer is asked: layers naming one kernel may differ in what it needs (head dim,
    inner LayerNorm, ...), and one it cannot run fails at its first step."""
    refused: dict[str, str] = {}
    for layer in model.modules():
        if not isinstance(layer, TTTLayer) or layer.kernel in ("auto", TORCH_PATH) or layer.kernel in refused:
            continue
        decay, momentum = layer_gates(layer)
        reasons = [
            named_kernel_refusal(
                layer.update_rule,
                layer.inner_task(),
                device=device,
                dtype=layer.scan_dtype if dtype is None else dtype,
                head_dim=layer.head_dim,
                requires_grad=requires_grad,
                decay=decay,
                momentum=momentum,
            )
            for device in devices
        ]
        if all(reason is not None for reason in reasons):
            refused[layer.kernel] = reasons[0]
    return refused


def layer_gates(layer: TTTLayer) -> tuple[bool, bool]:
    """``(decay, momentum)``: whether ``layer``'s blocks carry a forgetting gate and the momentum rule's
    state (a Gated DeltaNet layer's forget; a Titans layer's also have momentum), as its blocks report
    them to ``verify`` (:func:`kernel_inputs`). Told by the layer's class and settings
    (:meth:`~innerloop.core.layer.TTTLayer.declared_gates`), running nothing; a layer whose gates are its
    own code is asked (:meth:`~innerloop.core.layer.TTTLayer.scan_gates`) on one token of zeros, with its
    modules' forward hooks silenced and the random number generators as they were (a random gate's
    draws are undone), so that asking leaves no trace."""
    declared = layer.declared_gates()
    if declared is not None:
        return declared
    weight = next(layer.parameters(), None)
    device, dtype = (None, None) if weight is None else (weight.device, weight.dtype)
    cuda = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), forward_hooks_silenced(layer), torch.no_grad():
        decay, momentum, decay_log = layer.scan_gates(
            torch.zeros(1, 1, layer.hidden_size, device=device, dtype=dtype)
        )
    return decay is not None or decay_log is not None, momentum is not None


_FORWARD_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)
"""The tables of forward hooks torch keeps on each module, and (``_global`` before each) for all modules."""


@contextlib.contextmanager
def forward_hooks_silenced(module: torch.nn.Module) -> Iterator[None]:
    """No forward hook of ``module`` or its submodules, nor any global one, fires inside (each table
    emptied, and on leaving given back what it held, then what was registered meanwhile: by the code run
    inside, or another thread's, the global tables being shared; a hook removed meanwhile from an emptied
    table comes back)."""
    from torch.nn.modules import module as torch_module

    tables = [
        table
        for owner in (*module.modules(), torch_module)
        for name in _FORWARD_HOOK_TABLES
        if isinstance(
            table := getattr(owner, name if owner is not torch_module else "_global" + name, None), dict
        )
    ]
    saved = [dict(table) for table in tables]
    for table in tables:
        table.clear()
    try:
        yield
    finally:
        for table, kept in zip(tables, saved, strict=True):
            registered_meanwhile = {key: hook for key, hook in table.items() if key not in kept}
            table.clear()
            table.update(kept)
            table.update(registered_meanwhile)


def checked_choice(
    rule: UpdateRule, task: InnerTask, inputs: KernelInputs, probe: Callable[[KernelSpec], str | None]
) -> tuple[KernelSpec | None, str]:
    """:func:`select_kernel`, with the chosen kernel's numbers checked by ``probe`` on its first use
    for blocks like ``inputs``: a kernel that fails is refused (named: an error; ``"auto"``: a warning
    and the next choice); one whose probe is :class:`~innerloop.kernels.first_use.Deferred` leaves this
    block to the torch path and is probed again on the next."""
    while True:
        with first_use.one_lookup():  # select_kernel's and checked's questions read the settings once
            kernel, reason = select_kernel(rule, task, inputs)
            if kernel is None or first_use.checked(kernel, inputs, task, rule):
                return kernel, reason
        failed = probe(kernel)
        if failed is None:
            return kernel, reason
        if isinstance(failed, first_use.Deferred):
            return None, f"torch: {kernel.name}'s first-use check is deferred to a later block ({failed})"
        if task.kernel == kernel.name:
            raise KernelCheckError(
                f"kernel={task.kernel!r} cannot run here: {first_use.refusal_message(kernel, failed)}; "
                "kernel='auto' runs the layer on a kernel that passes, the torch path at worst"
            )
        first_use.warn_refused(kernel, failed)  # select_kernel refuses it from now on: choose again


def impostor_reason(rule: UpdateRule, task: InnerTask, head_dim: int) -> str | None:
    """None when the model, loss and rule are the registered ones of their names (or compute the
    same), else why the kernels registered for those names do not apply."""
    for kind, obj in (("inner_model", task.model), ("inner_loss", task.loss), ("update_rule", rule)):
        reason = registered_mismatch(kind, obj, head_dim if kind == "inner_model" else None)
        if reason is not None:
            return f"{reason}; kernels registered for that name do not compute it"
    return None


def select_kernel(rule: UpdateRule, task: InnerTask, inputs: KernelInputs) -> tuple[KernelSpec | None, str]:
    """The kernel to run (or None for torch) and a sentence saying why."""
    if task.kernel == TORCH_PATH:
        return None, "torch path forced (kernel='torch')"
    if inputs.device.type == "meta":  # shapes only: a kernel, and its first-use check, need values
        if task.kernel != "auto":
            raise KernelUnavailableError(
                f"kernel={task.kernel!r} cannot run on meta tensors (they hold no values); use "
                "kernel='auto' or 'torch', which trace the torch path"
            )
        return None, "torch: meta tensors hold no values (kernels run on real data)"
    if inputs.extra.get("empty"):  # a batch of 0: nothing to compute, nor to check a kernel's numbers on
        return None, "torch: an empty batch (no values for a kernel or its first-use check)"
    if inputs.extra.get("functorch"):  # vmap / grad / jacrev: no kernel (nor its first-use probe) runs there
        if task.kernel != "auto":
            raise KernelUnavailableError(
                f"kernel={task.kernel!r} cannot run inside a torch.func transform (vmap, grad, jacrev, ...) "
                "or on forward-mode AD's dual tensors; use kernel='auto' or 'torch', which run the torch path there"
            )
        return None, TRANSFORMED_REASON
    from innerloop.registry import get_registry

    rule_name = rule.name
    impostor = impostor_reason(rule, task, inputs.head_dim)
    if impostor is not None:
        if task.kernel != "auto":
            raise KernelUnavailableError(f"kernel={task.kernel!r} cannot run here: {impostor}")
        return None, f"torch: {impostor}"
    registry = get_registry()
    registered = registry.kernels_for(task.model.name, task.loss.name, rule_name)
    candidates = _candidates(registered, inputs)
    forced = [k for k in registered if k.name == task.kernel]
    if forced and forced[0].training_only and not inputs.requires_grad:
        # a training kernel named by the layer: blocks without a graph go where "auto" would send them
        kernel, reason = _best(candidates, inputs, task, rule, registered)
        return kernel, f"kernel {task.kernel!r} trains only and this block records no graph; {reason}"
    if task.kernel != "auto":
        named = [k for k in candidates if k.name == task.kernel]
        if forced and not named:  # registered, but this is a decoded token and it has no decode step
            raise KernelUnavailableError(
                f"kernel={task.kernel!r} has no decode step (one token at a time): tokens decode on torch"
            )
        if not named:
            known = [k.name for k in registry.kernels()]
            raise KernelUnavailableError(
                f"kernel={task.kernel!r} is not registered for (inner_model={task.model.name!r}, "
                f"inner_loss={task.loss.name!r}, update_rule={rule_name!r}); registered kernels: {known}; "
                "valid values are 'auto', 'torch' or one of those that match"
            )
        failed = first_use.failure(named[0], inputs, task, rule)
        if failed is not None:
            raise KernelCheckError(
                f"kernel={task.kernel!r} cannot run here: {first_use.refusal_message(named[0], failed)}"
            )
        reason = capability_refusal(named[0], inputs) or verify_refusal(named[0], inputs)
        if reason is not None:
            raise KernelUnavailableError(f"kernel={task.kernel!r} cannot run here: {reason}")
        return named[0], f"kernel {task.kernel!r} forced"
    return _best(candidates, inputs, task, rule, registered)


def _candidates(registered: list[KernelSpec], inputs: KernelInputs) -> list[KernelSpec]:
    """The kernels ``kernel="auto"`` may choose for a block: those with a decode step for a decoded
    token, and none that is ``training_only`` (it speeds up blocks that record a graph, no other) for a
    block that records no graph."""
    if inputs.extra.get("decode"):
        registered = [k for k in registered if k.decode is not None]
    return registered if inputs.requires_grad else [k for k in registered if not k.training_only]


def _best(
    candidates: list[KernelSpec],
    inputs: KernelInputs,
    task: InnerTask,
    rule: UpdateRule,
    registered: list[KernelSpec],
) -> tuple[KernelSpec | None, str]:
    """``kernel="auto"``'s choice: the first of ``candidates`` (by priority) that accepts the inputs
    (``registered``: every kernel of the block's model, loss and rule, which ``candidates`` narrows to
    those with a decode step for a decoded token, and to those not ``training_only`` for a block that
    records no graph)."""
    combination = f"({task.model.name}, {task.loss.name}, {rule.name})"
    decoded = inputs.extra.get("decode")
    if not candidates and registered and decoded and all(k.decode is None for k in registered):
        return None, (
            f"torch: no kernel registered for {combination} has a decode step (one token at a time); "
            f"without one: {[k.name for k in registered]}"
        )
    if not candidates and registered:  # each that fits is training_only, and this block records no graph
        return None, (
            f"torch: the kernels registered for {combination} train only and this block records no graph: "
            f"{[k.name for k in registered]}"
        )
    if not candidates:
        return None, f"torch: no kernel registered for {combination}"
    refusals = []
    for kernel in candidates:
        reason = refusal(kernel, inputs, task, rule)
        if reason is None:
            refused = f" (refused before it: {'; '.join(refusals)})" if refusals else ""
            return kernel, f"kernel {kernel.name!r} verified{refused}"
        refusals.append(reason if reason.startswith(kernel.name) else f"{kernel.name}: {reason}")
    return None, "torch: " + "; ".join(refusals)


def record_torch_part(task: InnerTask, reason: str) -> None:
    """Record a part of a call that only the torch path computes (no kernel contract covers it), with
    why, so that ``dispatches`` accounts for every part of a call."""
    if task.on_dispatch is not None:
        task.on_dispatch(TORCH_PATH, f"{TORCH_PATH}: {reason}")


def record_torch_block(rule: UpdateRule, task: InnerTask, chunk: ChunkInputs, params: Params) -> None:
    """Dispatch a block of the momentum rule: every kernel refuses it (none carries the momentum
    state), a kernel forced by name raises, and the decision is recorded like any other."""
    inputs = kernel_inputs(task, chunk, params, momentum=True)
    kernel, reason = select_kernel(rule, task, inputs)
    assert kernel is None  # capability_refusal refuses every kernel a momentum block
    if task.on_dispatch is not None:
        task.on_dispatch(TORCH_PATH, reason)


def run_aligned_block(
    rule: UpdateRule,
    task: InnerTask,
    params: Params,
    chunk: ChunkInputs,
    tau: torch.Tensor,
    fallback: BlockPath,
) -> tuple[torch.Tensor, Params]:
    """Run whole mini-batches (from a boundary, no pending gradients) on the best path (``fallback``:
    the torch path, which also checks a kernel's numbers on its first use)."""
    inputs = kernel_inputs(task, chunk, params, tau=tau)
    kernel, reason = checked_choice(
        rule,
        task,
        inputs,
        lambda candidate: first_use.check_block(candidate, inputs, task, rule, params, chunk, tau, fallback),
    )
    if task.on_dispatch is not None:
        task.on_dispatch(kernel.name if kernel is not None else TORCH_PATH, reason)
    if kernel is None:
        return fallback(task, params, chunk, tau)
    decay = {} if chunk.decay is None else {"decay": chunk.decay}  # only kernels that support it
    if chunk.decay_log is not None and names_parameter(kernel.forward, "decay_log"):
        decay = {
            "decay_log": chunk.decay_log
        }  # the gate as log a, where the kernel takes it (exact for small a)
    out, new_params = kernel.forward(
        xq=chunk.query,
        xk=chunk.inputs,
        xv=chunk.targets,
        lr=chunk.lr,
        tau=tau,
        params=params,
        ln_weight=task.norm_weight,
        ln_bias=task.norm_bias,
        eps=task.norm_eps,
        **decay,
    )
    check_kernel_output(kernel, chunk.query, params, out, new_params)
    return out, new_params


def run_decode_token(
    rule: UpdateRule,
    task: InnerTask,
    params: Params,
    pending: Params,
    chunk: ChunkInputs,
    tau_i: torch.Tensor,
    is_last: bool,
    fallback: TokenPath,
    decaying: bool = False,
) -> tuple[torch.Tensor, Params, Params] | None:
    """One token through a kernel's ``decode`` if one verifies; None means: use torch (``fallback``,
    the torch path, checks a kernel's numbers on its first use).

    Returns ``(out [B, H, 1, f], params, pending)`` with the mini-batch committed when ``is_last``.
    ``decaying``: the token forgets or the state carries a decay product (no decode kernel takes it).
    """
    inputs = kernel_inputs(
        task,
        chunk,
        first_use.joined_weights(params, pending),
        tau=tau_i,
        decode=True,
        decay=decaying,
        closes_mini_batch=is_last,
    )

    def probe(candidate: KernelSpec) -> str | None:
        return first_use.check_decode(
            candidate, inputs, task, rule, params, pending, chunk, tau_i, is_last, fallback
        )

    try:
        kernel, reason = checked_choice(rule, task, inputs, probe)
    except KernelCheckError:
        raise
    except KernelUnavailableError as error:  # a named kernel without a usable decode path
        kernel, reason = None, f"torch: {error}"
    if task.on_dispatch is not None:
        task.on_dispatch(TORCH_PATH if kernel is None else kernel.name + ".decode", reason)
    if kernel is None:
        return None
    given_params, given_pending = params, pending
    out, params, pending = kernel.decode(
        xq=chunk.query[:, :, 0],
        xk=chunk.inputs[:, :, 0],
        xv=chunk.targets[:, :, 0],
        lr=chunk.lr[:, :, 0],
        tau_i=tau_i,
        params=params,
        pending=pending,
        ln_weight=task.norm_weight,
        ln_bias=task.norm_bias,
        eps=task.norm_eps,
        is_last=is_last,
    )
    for given, returned in ((given_params, params), (given_pending, pending)):  # as on the first use
        check_kernel_output(kernel, chunk.query[:, :, 0], given, out, returned)
    return out[:, :, None], params, pending


__all__ = [
    "KernelCheckError",
    "KernelUnavailableError",
    "capability_refusal",
    "record_torch_block",
    "TORCH_PATH",
    "impostor_reason",
    "checked_choice",
    "kernel_inputs",
    "named_kernel_refusal",
    "refused_named_kernels",
    "refusal",
    "record_torch_part",
    "run_aligned_block",
    "run_decode_token",
    "select_kernel",
]
