"""Session 34c (decoding and generation): sample_next and generate check every argument when called."""

from __future__ import annotations

import pytest
import torch

from innerloop.models import ModelConfig, build_model
from innerloop.models.generate import generate, sample_next


def test_sample_next_refuses_an_empty_vocabulary_naming_logits() -> None:
    """Logits ``[B, 0]`` have no token to draw: refused naming them (was a bare IndexError from amax)."""
    for temperature in (0.0, 1.0):
        with pytest.raises(
            ValueError, match=r"logits must be .*\[batch, vocab\] with vocab >= 1, got torch.float32 \(2, 0\)"
        ):
            sample_next(torch.zeros(2, 0), temperature, None, None)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: a CPU generator with logits on the GPU"
)
def test_a_generator_on_another_device_is_refused_when_generate_is_called() -> None:
    """torch.multinomial refused a CPU generator for CUDA logits only once the iterator ran, in torch's words."""
    model = build_model(
        ModelConfig(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8)
    )
    model = model.cuda().eval()
    ids = torch.tensor([[1, 2, 3]], device="cuda")
    with pytest.raises(ValueError, match=r"generator is on cpu but prompt_ids are on cuda:0"):
        generate(model, ids, 2, temperature=1.0, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"generator is on cpu but logits are on cuda:0"):
        sample_next(torch.zeros(1, 4, device="cuda"), 1.0, None, torch.Generator())
    greedy = [token for token, _ in generate(model, ids, 2, temperature=0, generator=torch.Generator())]
    assert len(greedy) == 2  # greedy decoding reads no generator: accepted as before
    seeded = [torch.Generator(device="cuda").manual_seed(5) for _ in range(2)]
    runs = [torch.stack([t for t, _ in generate(model, ids, 4, generator=g)]) for g in seeded]
    assert torch.equal(runs[0], runs[1])


def test_hugging_face_generate_refuses_an_empty_batch_naming_input_ids() -> None:
    """``generate(ids[:0])`` failed after the first forward in transformers' stopping check (torch's
    "max(): Expected reduction dim ..."): refused before the prompt is read, naming input_ids."""
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    model = InnerloopForCausalLM(
        InnerloopConfig(model={"vocab_size": 11, "hidden_size": 8, "num_heads": 2, "num_layers": 1})
    ).eval()
    with pytest.raises(ValueError, match=r"input_ids of batch size 0 \(shape \[0, 3\]\)"):
        model.generate(torch.zeros(0, 3, dtype=torch.long), max_new_tokens=2)


def test_generate_refuses_a_prompt_on_another_device_than_the_model_when_called() -> None:
    """The sibling of the generator's device: a prompt the model cannot read was refused by torch only
    once the iterator ran. (A model on the meta device stands for an accelerator on a CPU-only machine.)"""
    config = ModelConfig(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8)
    model = build_model(config).to("meta")
    with pytest.raises(ValueError, match=r"prompt_ids are on cpu but the model's weights are on meta"):
        generate(model, torch.tensor([[1, 2, 3]]), 2, temperature=0)


def test_no_generator_function_is_decorated_with_a_grad_mode() -> None:
    """The kind of review s20's generate fix: torch's no_grad (inference_mode, enable_grad) wrapper around a
    generator printed "Exception ignored ... 'NoneType' object has no attribute 'is_scripting'" at
    interpreter exit for an iterator left half read; E2ELM.stream and stream_losses still had it. Grad
    mode goes around the calls inside instead. Every generator function of the library is read."""
    import ast
    from pathlib import Path

    import innerloop

    wrapped = []
    modes = ("no_grad", "inference_mode", "enable_grad")
    for path in sorted(Path(innerloop.__file__).parent.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if "yield" not in text or not any(f"@torch.{m}" in text for m in modes):
            continue  # parsed only where a decorated generator can be (a fast test)
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            own = [n for n in ast.walk(node) if isinstance(n, (ast.Yield, ast.YieldFrom))]
            decorators = [ast.unparse(d) for d in node.decorator_list]
            if own and any(m in d for d in decorators for m in modes):
                wrapped.append(f"{path.name}:{node.name}")
    assert wrapped == []


def test_e2e_stream_runs_without_autograd_and_leaves_grad_mode_alone() -> None:
    """The fix keeps what the decorator did: no graph in the yields, the caller's grad mode untouched."""
    config = ModelConfig(
        mixer="e2e", vocab_size=11, hidden_size=8, num_heads=2, num_layers=1, intermediate_size=8
    )
    model = build_model(config).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    logits, _ = next(model.stream(iter([ids, ids])))
    losses = next(model.stream_losses(iter([ids, ids])))
    assert not logits.requires_grad and not losses.requires_grad and torch.is_grad_enabled()
