"""``torch.compile`` on a TTT language model (issue 13, item 2): training (forward and backward) and
inference (a prefill and token-by-token decoding too) give what eager gives, with no error and no
graph break but the deliberate ones.

The inner scan and the value-reading checks run eagerly by design (``innerloop.core.layer``,
``_run_scan_eagerly``): the projections, norms, gates and MLPs around them compile. Compiled code
fuses and reorders float32 operations, so "equal" is to float32 rounding: relative error (RMS) below
``1e-5``, about 100 units of float32's roundoff for these few-hundred-operation sums (measured: ~1e-7).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from lm_testing import tiny_ttt_lm
from torch._dynamo.utils import counters

from innerloop.core.eager import run_eagerly
from innerloop.core.functional import apply_rope_interleaved, relative_error
from innerloop.models import CausalLM, E2EConfig, ModelConfig, build_model

# What Dynamo warns of in innerloop's code is a defect here (e.g. a functools.cache it meets while
# tracing E2E's option checks: it warns at every compile)
pytestmark = pytest.mark.filterwarnings("error:Dynamo detected a call to a:UserWarning")

EQUAL_TO_ROUNDING = 1e-5


def _seeded_tiny_lm(inner_model: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_ttt_lm(inner_model)


def _train_step(lm, ids):
    logits, _ = lm(ids)
    return logits, torch.autograd.grad(logits.square().mean(), list(lm.parameters()))


def _decode(lm, ids: torch.Tensor, prefill: int = 6, end: int = 10) -> torch.Tensor:
    """Logits of tokens ``prefill..end-1``, read one token at a time after a prefill of the ones before
    (the state's position changes at every call)."""
    _, state = lm(ids[:, :prefill])
    steps = []
    for index in range(prefill, end):
        logits, state = lm(ids[:, index : index + 1], state)
        steps.append(logits)
    return torch.cat(steps, dim=1)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


# reason: dynamo traces training, inference, prefill and decoding (~8 s on 2 cores). The backend is
# aot_eager (dynamo and AOTAutograd: the parts that graph-break or fail on Python control flow);
# inductor's first compile of a whole model's C++ kernels takes a minute more here (CI starts with an
# empty cache: `python benchmarks/train_speed.py` times the default backend, and the test below
# compiles with it the one part written for inductor). TTT-MLP only: the inner model runs inside the eager
# scan, so the compiled code (projections, norms, gates, the state's dataclass across the graph breaks) is
# the same for every inner model; TTT-MLP's state holds TTT-Linear's weights and two more (TTT-Linear's
# case, ~15 s on 2 cores, compiled nothing this one does not)
@pytest.mark.slow
@pytest.mark.parametrize(("inner_model", "backend"), [("mlp", "aot_eager")])
def test_a_compiled_ttt_language_model_trains_and_infers_as_eager(inner_model, backend):
    lm = _seeded_tiny_lm(inner_model)
    eager = copy.deepcopy(lm)
    compiled = torch.compile(lm, backend=backend)
    ids = torch.randint(0, 256, (2, 20))
    torch._dynamo.reset()
    counters.clear()
    logits, grads = _train_step(compiled, ids[:, :16])
    with torch.no_grad():
        # inference at the training shape, and decoding after a prefill of the same tokens (its graphs
        # are inference's): one shape per kind of graph (s59c: an inference of another length than the
        # prefill's compiled the same graphs again, with dynamic shapes)
        inferred, _ = compiled(ids[:, :16])
        decoded = _decode(compiled, ids, 16, 20)
    # the only graph breaks are the deliberate ones, around the eager scan and checks
    assert counters["graph_break"] and all("innerloop: " in reason for reason in counters["graph_break"])

    want_logits, want_grads = _train_step(eager, ids[:, :16])
    assert relative_error(logits, want_logits) < EQUAL_TO_ROUNDING
    assert relative_error(_flat(grads), _flat(want_grads)) < EQUAL_TO_ROUNDING
    with torch.no_grad():
        want_inferred, _ = eager(ids[:, :16])
        want_decoded = _decode(eager, ids, 16, 20)
    assert relative_error(inferred, want_inferred) < EQUAL_TO_ROUNDING
    assert relative_error(decoded, want_decoded) < EQUAL_TO_ROUNDING
    ttt_layer = lm.blocks[0].mixer
    assert ttt_layer.last_dispatch is not None  # the layer's dispatch record works under compile


# reason: dynamo traces a prefill and four decoded tokens (~7 s on 2 cores)
@pytest.mark.slow
def test_a_compiled_attention_model_decodes_as_eager_and_still_checks_its_inputs():
    # the language model's input and state checks read values (the ids' range): they run eagerly, as
    # the TTT layer's do, so the model compiles around them and still refuses bad input
    torch.manual_seed(0)
    config = ModelConfig(mixer="swa", window=4, backbone="mamba", hidden_size=32, num_heads=2,
                         intermediate_size=64, num_layers=2)  # fmt: skip
    lm = CausalLM(config).eval()
    compiled = torch.compile(copy.deepcopy(lm), backend="aot_eager")
    ids = torch.randint(0, 256, (2, 10))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        decoded = _decode(compiled, ids)
        assert relative_error(decoded, _decode(lm, ids)) < EQUAL_TO_ROUNDING
        assert counters["graph_break"] and all("innerloop: " in reason for reason in counters["graph_break"])
        with pytest.raises(ValueError, match=r"input_ids holds token id 256, .*vocab_size=256"):
            compiled(torch.tensor([[1, 256]]))
        _, state = compiled(ids[:, :6])
        with pytest.raises(ValueError, match=r"state.blocks\[0\].conv must be the pre-conv history"):
            compiled(ids[:1, 6:7], state)


def _tiny_e2e_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(mixer="e2e", window=8, hidden_size=32, num_heads=2, intermediate_size=64,
                         num_layers=2, e2e=E2EConfig(chunk_size=4))  # fmt: skip
    return build_model(config)


# reason: dynamo traces a TTT-E2E model's training step (~8 s on 2 cores)
@pytest.mark.slow
def test_a_compiled_e2e_model_trains_through_its_inner_steps_as_eager():
    # the outer gradient differentiates the inner steps' backward (second order), which a compiled
    # backward cannot be: the inner step runs eagerly, the rest compiles (review s10: "a leaf Variable
    # that requires grad is being used in an in-place operation")
    lm = _tiny_e2e_lm()
    eager = copy.deepcopy(lm)
    compiled = torch.compile(lm, backend="aot_eager")
    ids = torch.randint(0, 256, (2, 12))
    torch._dynamo.reset()
    logits, grads = _train_step(compiled, ids)
    want_logits, want_grads = _train_step(eager, ids)
    assert relative_error(logits, want_logits) < EQUAL_TO_ROUNDING
    assert relative_error(_flat(grads), _flat(want_grads)) < EQUAL_TO_ROUNDING


# reason: dynamo compiles the prefill, the first decoded tokens and the decoding with a full window (~10 s
# on 2 cores)
@pytest.mark.slow
def test_a_compiled_e2e_model_decodes_as_eager_without_a_compile_per_token():
    # chunks of 4: the prefill (5 tokens) trains the first chunk, every fourth decoded token the next (the
    # tokens before it wait in the chunk). The suffix runs eagerly: where its chunks start depends on the
    # count of waiting tokens, and compiled it recompiled at every decoded token, to dynamo's limit
    # (seconds each). The inner step's gradient runs eagerly too: a compiled backward may free its
    # buffers after one use (AOTAutograd's donated buffers), and the update rule's gradient keeps the graph
    #
    # Every graph break is a deliberate one (run_eagerly, its reason "innerloop: "): before review s48e the
    # option checks' dataclasses.fields and torch.is_inference_mode_enabled broke the graph too,
    # unannounced (7 breaks in a prefill). tests/test_review_s48_s48e.py checked that on its own compile of
    # a prefill and a decoded token (the eager backend; dynamo breaks the graph where aot_eager's does)
    lm = _tiny_e2e_lm()
    compiled = torch.compile(copy.deepcopy(lm), backend="aot_eager")
    ids = torch.randint(0, 256, (2, 22))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        prefill, state = compiled(ids[:, :5])
        steps, graphs = [], None
        for index in range(5, 22):
            if index == 14:  # two chunks decoded, the window of 8 filled: every shape decoding will see
                graphs = counters["stats"]["unique_graphs"]
            logits, state = compiled(ids[:, index : index + 1], state)
            steps.append(logits)
        decoded, want = torch.cat(steps, dim=1), _decode(lm, ids, 5, 22)
        # the prefill and the first decoded token within s48e's bound (measured: 0)
        assert relative_error(prefill, lm(ids[:, :5])[0]) < 1e-6
        assert relative_error(decoded[:, :1], want[:, :1]) < 1e-6
        assert relative_error(decoded, want) < EQUAL_TO_ROUNDING
    assert counters["stats"]["unique_graphs"] == graphs, "two more chunks of decoding compiled again"
    breaks = dict(counters["graph_break"])
    assert breaks and all("innerloop: " in reason for reason in breaks), list(breaks)


@pytest.mark.slow  # ~19 s from an empty cache: inductor compiles one small kernel and its backward
def test_rope_compiles_with_inductor_as_real_arithmetic():
    # inductor generates no code for complex numbers: under compile RoPE rotates pairs in real arithmetic
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(5, 1, 4, dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    compiled = torch.compile(apply_rope_interleaved, backend="inductor", fullgraph=True)
    got, want = compiled(x, cos, sin), apply_rope_interleaved(x, cos, sin)
    assert relative_error(got, want) < 1e-12
    (got_grad,) = torch.autograd.grad(got.square().sum(), x)
    (want_grad,) = torch.autograd.grad(want.square().sum(), x)
    assert relative_error(got_grad, want_grad) < 1e-12


@pytest.mark.slow  # ~2 s: a fresh interpreter imports innerloop
def test_importing_innerloop_does_not_load_dynamo():
    # torch.compiler.disable imports torch._dynamo (~2 s, as long as torch itself): innerloop defers it
    # (innerloop.core.eager) to the first call of a wrapped function once something else loaded dynamo
    script = (
        "import sys, innerloop\n"
        "from innerloop.core.eager import DEFERS_DYNAMO_IMPORT\n"
        "assert DEFERS_DYNAMO_IMPORT, 'this torch lacks the frame-skipping API: the fallback imports dynamo'\n"
        "assert 'torch._dynamo' not in sys.modules, 'import innerloop loaded torch._dynamo'\n"
        "innerloop.TTTLayer(hidden_size=8, num_heads=2)(__import__('torch').randn(1, 16, 8))\n"
        "assert 'torch._dynamo' not in sys.modules, 'a forward loaded torch._dynamo'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # ~0.3 s: a torch.compile
def test_a_function_run_eagerly_breaks_the_graph_and_runs_untraced():
    calls = []

    @run_eagerly("innerloop: test")
    def loop(x):
        calls.append(torch.compiler.is_compiling())
        for _ in range(3):
            x = x * 2 + 1
        return x

    def caller(x):
        return loop(x.sin()).cos()

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(4)
    assert torch.equal(torch.compile(caller, backend="eager")(x), caller(x))
    assert calls == [False, False]  # it ran eagerly under compile (and once directly)
    assert list(counters["graph_break"]) and all("innerloop: test" in r for r in counters["graph_break"])
