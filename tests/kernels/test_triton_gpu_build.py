"""The Triton kernels as a GPU compiles them, checked here without one: Triton lowers them for an
sm_90 target on the CPU (no device is needed until launch), and the intermediate code says how wide
each pointer offset is. A 32-bit offset such as ``pid * T * F`` wraps past 2**31 elements (B=8, H=32,
T=128k, f=128) and reads and writes another tensor's memory without an error."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

pytest.importorskip("triton", reason="the Triton kernels need triton (the test extra installs it)")

LOWERING = textwrap.dedent(
    """
    import inspect
    import re
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from innerloop.kernels.triton.ttt_linear import _kernels as linear
    from innerloop.kernels.triton.ttt_mlp import _kernels as mlp

    TARGET = GPUTarget("cuda", 90, 32)
    BACKEND = make_backend(TARGET)


    def lower_to_ttir(source):
        # the first stage of triton.compile only: the code generated from the kernel's source, through
        # Triton's own passes (ttir); triton.compile goes on to ttgir, LLVM IR, PTX and a cubin (ptxas),
        # ~90% of its time from an empty cache, and none of them is read here
        options = BACKEND.parse_options(source.parse_options())
        context = ir.context()
        ir.load_dialects(context)
        BACKEND.load_dialects(context)
        given = {
            "target": TARGET,
            "options": options,
            "codegen_fns": BACKEND.get_codegen_implementation(options),
            "module_map": BACKEND.get_module_map(),
            "context": context,
        }
        wanted = inspect.signature(source.make_ir).parameters  # its arguments vary across Triton 3.x
        module = source.make_ir(**{name: value for name, value in given.items() if name in wanted})
        stages = {}
        BACKEND.add_stages(stages, options, source.language)
        return str(stages["ttir"](module, {}))


    F, BLOCK = 16, {"BK": 16, "GROUP": 2, "PREC": "ieee"}
    KERNELS = [
        (linear.linear_forward_kernel, {"F": F, **BLOCK}),
        (linear.linear_backward_kernel, {"F": F, **BLOCK}),
        (linear.linear_decode_kernel, {"F": F, "IS_LAST": True}),
        (mlp.mlp_forward_kernel, {"F": F, "F4": 4 * F, **BLOCK}),
        (mlp.mlp_backward_kernel, {"F": F, "F4": 4 * F, **BLOCK}),
        (mlp.mlp_decode_kernel, {"F": F, "F4": 4 * F, "IS_LAST": True}),
    ]
    for kernel, constants in KERNELS:
        names = kernel.arg_names
        kind = lambda a: "constexpr" if a in constants else "*fp32" if a.endswith("_ptr") else "fp32" if a == "eps" else "i32"
        source = ASTSource(
            kernel,
            signature={a: kind(a) for a in names},
            constexprs={(names.index(a),): v for a, v in constants.items()},
        )
        ttir = lower_to_ttir(source)
        for pointer, width in re.findall(r"tt\\.addptr %(\\w+_ptr), %\\S+ : !tt\\.ptr<\\w+>, (i\\d+)", ttir):
            print(kernel.fn.__name__, pointer, width)
    """
)


def lowered_offsets() -> str:
    """What :data:`LOWERING` prints: in this process (its torch and innerloop imported already: the child's
    start-up was ~3.7 s of the test's 5 s of CPU), unless ``TRITON_INTERPRET=1`` is set here, which made
    the kernels interpreted functions when their module was imported: then in a child process without it,
    as before. Nothing here is about a process: the lowering is the same code in either."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        printed = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            # Triton's own, at parse_options: the child printed it to the stderr the test never read
            warnings.filterwarnings("ignore", "TRITON_DEFAULT_FP_FUSION is unset", UserWarning)
            exec(LOWERING, {"__name__": "lowering"})
        return printed.getvalue()
    env = {
        k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"
    }  # the GPU compiler, not the interpreter
    result = subprocess.run(
        [sys.executable, "-c", LOWERING], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # reason: Triton lowers six kernels for a GPU target (to ttir), ~1.5 s
def test_every_offset_from_a_kernel_argument_is_64_bit() -> None:
    stdout = lowered_offsets()
    offsets = [line.split() for line in stdout.splitlines()]
    kernels = {kernel for kernel, _, _ in offsets}
    assert len(kernels) == 6, stdout  # every kernel was lowered and read
    # tau [K] is the mini-batch's token scale, shared by every program: its offsets stay below K
    narrow = [(k, p, w) for k, p, w in offsets if w != "i64" and p != "tau_ptr"]
    assert not narrow, f"32-bit offsets from kernel arguments: {narrow}"
