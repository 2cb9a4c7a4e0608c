"""Seeded differential fuzzing of whole language models in float64 (review s53k).

Each draw is a small random model: a mixer of every kind ``build_model`` builds (and stacks whose
blocks have different mixers), 1-3 layers, 1-3 heads of width 2-17, mini-batch 1-9, the inner
norm/residual, gates, pre-conv, tied head and padding id on or off, vocabulary 3-50. For each, four
things that must not depend on how the model is run are compared:

(a) every kernel the dispatcher admits for its layers (forced by name) against the torch path, logits
    and every parameter's gradient, to 1e-10;
(b) the whole sequence against pieces with the state carried, and against a prefill then one-token
    decoding, for the torch path and every admitted kernel, to 1e-10;
(c) a batch against each row alone, and a left-padded batch with its mask (one call, and a prefill
    then cached decoding, through the Hugging Face wrapper) against no padding, to 1e-10;
(d) the model exported (safetensors) and loaded in a new object: every weight bitwise, and the
    logits bitwise once the weights sit in aligned memory (safetensors maps them at offsets that
    are not 64-byte aligned, where BLAS rounds the same products differently: 1e-16).

The full run (``python tests/test_review_s53_s53k.py FIRST COUNT``) drew 1000s of models; the test keeps a
few fixed, small draws.
"""

from __future__ import annotations

import random
import sys
import tempfile
from typing import Any

import pytest
import torch

from innerloop.core.layer import TTTLayer
from innerloop.kernels.dispatch import KernelUnavailableError
from innerloop.models import build_model
from innerloop.models.config import FAMILY_MIXERS, MIXERS, ModelConfig
from innerloop.registry import get_registry

TOLERANCE = 1e-10
SLOW_KERNELS = ("compiled_torch", "triton")  # torch.compile takes ~30 s a shape; Triton needs a GPU


def _draw_ttt(rng: random.Random) -> dict[str, Any]:
    return dict(
        inner_model=rng.choice(["linear", "mlp", "matrix"]),
        inner_loss=rng.choice(["reconstruction", "reconstruction", "next_token", "dot_product"]),
        update_rule=rng.choice(["dual_form", "dual_form", "minibatch_gd", "momentum"]),
        mini_batch_size=rng.randint(1, 9),
        base_lr=rng.choice([0.0, 0.1, 1.0, 3.0]),
        conv_kernel=rng.randint(1, 5),
        share_qk=rng.choice([None, True, False]),
        use_gate=rng.choice([None, True, False]),
        inner_norm=rng.random() < 0.7,
        inner_residual=rng.random() < 0.7,
    )


def _draw_family(rng: random.Random, mixer: str) -> dict[str, Any]:
    family: dict[str, Any] = dict(
        base_lr=rng.choice([0.1, 1.0, 2.0]), output_gate=rng.choice([None, True, False])
    )
    if mixer in ("linear_attention", "titans"):
        family["mini_batch_size"] = rng.randint(1, 9)
    if mixer != "linear_attention":
        family["short_conv"] = rng.random() < 0.7
        if family["short_conv"]:
            family["conv_kernel"] = rng.randint(1, 5)
    if mixer == "titans":
        family["memory"] = rng.choice(["matrix", "mlp"])
    return family


def _draw_e2e(rng: random.Random) -> dict[str, Any]:
    return dict(
        chunk_size=rng.randint(1, 5),
        suffix_fraction=rng.choice([0.25, 0.5, 1.0]),
        first_order=rng.random() < 0.5,
        inner_grad_clip=rng.choice([0.0, 1.0]),
        chunk_targets=rng.choice(["next_token", "within_chunk"]),
        rope_positions=rng.choice(["relative", "absolute"]),
        test_time_training=rng.random() < 0.8,
    )


def draw_config(rng: random.Random, mixer: str) -> dict[str, Any]:
    """A random small model config of ``mixer`` (possibly invalid: the caller draws again)."""
    heads = rng.randint(1, 3)
    rotary = mixer in ("ttt", "attention", "swa", "e2e")  # RoPE needs an even head width
    head_dim = rng.choice(range(2, 18, 2)) if rotary else rng.randint(2, 17)
    config: dict[str, Any] = dict(
        mixer=mixer,
        backbone=rng.choice(["transformer", "mamba"]),
        vocab_size=rng.randint(3, 50),
        hidden_size=heads * head_dim,
        num_layers=rng.randint(1, 3),
        num_heads=heads,
        intermediate_size=rng.randint(1, 9),
        window=rng.randint(1, 9),
        pre_conv=rng.choice([None, True, False]),
        pre_conv_kernel=rng.randint(1, 5),
        tie_embeddings=rng.random() < 0.5,
        init_std=rng.choice([0.02, 0.3, 1.0]),
        rope_theta=rng.choice([10000.0, 10000.0, 3.0]),
        norm_eps=rng.choice([1e-6, 1e-6, 0.1]),
    )
    if rng.random() < 0.2:
        config["padding_id"] = rng.randint(0, config["vocab_size"] - 1)
    if mixer == "ttt":
        config["ttt"] = _draw_ttt(rng)
    elif mixer in FAMILY_MIXERS:
        config["family"] = _draw_family(rng, mixer)
    elif mixer == "e2e":
        config["e2e"] = _draw_e2e(rng)
    return config


def _build(config: dict[str, Any], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_dict(config)).double()


def draw_model(rng: random.Random, seed: int, mixer: str) -> tuple[dict[str, Any], torch.nn.Module]:
    """A valid drawn config of ``mixer`` and its float64 model (configs the checks refuse are drawn again)."""
    while True:
        config = draw_config(rng, mixer)
        try:
            return config, _build(config, seed)
        except (ValueError, TypeError):
            continue


def draw_mixed_stack(rng: random.Random, seed: int) -> tuple[dict[str, Any], torch.nn.Module]:
    """A stack whose blocks have mixers drawn each on its own: blocks of models of one shape, spliced."""
    config, _ = draw_model(rng, seed, rng.choice(MIXERS))
    heads = config["num_heads"]
    config.update(
        num_layers=rng.randint(2, 3),
        hidden_size=max(2 * heads, config["hidden_size"] // (2 * heads) * 2 * heads),
    )
    model = _build(config, seed)
    shared = (
        "hidden_size",
        "num_heads",
        "num_layers",
        "vocab_size",
        "backbone",
        "pre_conv",
        "pre_conv_kernel",
    )
    mixers = []
    for i in range(config["num_layers"]):
        while True:
            donor = {**draw_config(rng, rng.choice(MIXERS)), **{key: config[key] for key in shared}}
            try:
                model.blocks[i] = _build(donor, seed + 1 + i).blocks[i]
            except (ValueError, TypeError):
                continue
            mixers.append(donor["mixer"])
            break
    return {**config, "mixers": mixers}, model


def _layers(model: torch.nn.Module) -> list[TTTLayer]:
    return [module for module in model.modules() if isinstance(module, TTTLayer)]


def kernels_of(layer: TTTLayer) -> list[str]:
    """The registered kernels of the layer's (inner model, loss, rule), but the slow ones."""
    plugins = (layer.inner_model.name, layer.inner_loss.name, layer.update_rule.name)
    return [
        spec.name
        for spec in get_registry().kernels()
        if (spec.inner_model, spec.inner_loss, spec.update_rule) == plugins
        and not spec.name.startswith(SLOW_KERNELS)
    ]


def force_kernel(model: torch.nn.Module, name: str) -> bool:
    """``name`` on every layer it is a kernel of (the others on torch); False where a layer refuses it."""
    for layer in _layers(model):
        try:
            layer.kernel = name if name in ("auto", "torch") or name in kernels_of(layer) else "torch"
        except ValueError:  # e.g. a kernel that fuses the inner norm and residual, one of them off
            return False
    return True


def max_error(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """The largest difference of ``a`` from ``b``, relative to ``b``'s largest value where that is over 1:
    a padding id's zero embedding row meets the TTT layer's inner LayerNorm at zero variance, whose
    gradients reach 1e34 in a model of logits 0.4 (every path alike)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    assert a.shape == b.shape
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() if a.numel() else 0.0


def _logits_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logits = model(ids)[0]
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


def check_kernels(model: torch.nn.Module, ids: torch.Tensor, errors: dict[str, float]) -> list[str]:
    """(a): each admitted kernel's logits and gradients against the torch path; the kernels that ran."""
    kernels = sorted({name for layer in _layers(model) for name in kernels_of(layer)})
    force_kernel(model, "torch")
    logits, grads = _logits_and_grads(model, ids)
    ran = []
    for name in kernels:
        if not force_kernel(model, name):
            continue
        try:
            kernel_logits, kernel_grads = _logits_and_grads(model, ids)
        except KernelUnavailableError:
            continue
        ran.append(name)
        errors[f"{name} logits"] = max_error(kernel_logits, logits)
        errors[f"{name} grads"] = max((max_error(kernel_grads[n], grads[n]) for n in grads), default=0.0)
    force_kernel(model, "auto")
    return ran


@torch.no_grad()
def check_pieces(
    model: torch.nn.Module, ids: torch.Tensor, rng: random.Random, errors: dict, path: str
) -> torch.Tensor:
    """(b): pieces with the state carried, and a prefill then decoding, against the whole; the whole's logits."""
    whole, length = model(ids)[0], ids.shape[1]
    cuts = sorted(rng.sample(range(1, length), rng.randint(0, min(3, length - 1))))
    pieces, state = [], None
    for start, end in zip([0, *cuts], [*cuts, length], strict=True):
        logits, state = model(ids[:, start:end], state)
        pieces.append(logits)
    errors[f"pieces {cuts} [{path}]"] = max_error(torch.cat(pieces, 1), whole)
    prefill = rng.randint(1, length)
    logits, state = model(ids[:, :prefill])
    decoded = [logits]
    for t in range(prefill, length):
        logits, state = model(ids[:, t : t + 1], state)
        decoded.append(logits)
    errors[f"prefill {prefill} + decode [{path}]"] = max_error(torch.cat(decoded, 1), whole)
    return whole


@torch.no_grad()
def check_rows(model: torch.nn.Module, ids: torch.Tensor, whole: torch.Tensor, errors: dict) -> None:
    """(c): each row of the batch alone."""
    errors["rows alone"] = max(max_error(model(ids[b : b + 1])[0], whole[b : b + 1]) for b in range(len(ids)))


def _ragged(ids: torch.Tensor, rng: random.Random, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` with the first few tokens of some rows replaced by left padding (``pad_id``, masked out):
    a batch of prompts of different lengths, one row at least kept whole."""
    padded, mask = ids.clone(), torch.ones_like(ids)
    for row in range(1, len(ids)):
        pads = rng.randint(0, ids.shape[1] - 1)
        padded[row, :pads], mask[row, :pads] = pad_id, 0
    return padded, mask


@torch.no_grad()
def check_padding(loaded: Any, ids: torch.Tensor, rng: random.Random, errors: dict) -> None:
    """(c): a left-padded batch with its mask, in one call and as a prefill then cached decoding, each
    row against its tokens alone."""
    padded, mask = _ragged(ids, rng, rng.randint(0, loaded.config.vocab_size - 1))
    alone = [loaded.model(ids[row : row + 1, int((mask[row] == 0).sum()) :])[0] for row in range(len(ids))]
    logits = loaded(input_ids=padded, attention_mask=mask, use_cache=False).logits
    errors["left padding"] = max(
        max_error(logits[row, mask[row] == 1], alone[row][0]) for row in range(len(ids))
    )
    cut = rng.randint(int((mask == 0).sum(1).max()) + 1, ids.shape[1])  # no row of pads alone
    out = loaded(input_ids=padded[:, :cut], attention_mask=mask[:, :cut], use_cache=True)
    steps = [out.logits]
    for t in range(cut, ids.shape[1]):
        out = loaded(
            input_ids=padded[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache, use_cache=True
        )
        steps.append(out.logits)
    decoded = torch.cat(steps, 1)
    errors["left padding + cached decode"] = max(
        max_error(decoded[row, mask[row] == 1], alone[row][0]) for row in range(len(ids))
    )


@torch.no_grad()
def check_saved(
    model: torch.nn.Module, ids: torch.Tensor, whole: torch.Tensor, folder: str, errors: dict
) -> Any:
    """(d): exported and loaded, every weight bitwise and the logits compared; the loaded Hugging Face
    model. Not bitwise: the TTT layer's non-persistent ``token_idx`` (1/(i+1)) of a model cast by
    ``.double()`` holds float32's 1/3 widened, while ``from_pretrained(dtype=float64)`` builds it in
    float64 (exact 1/3), so the logits of a drawn model move by up to 7e-13."""
    from innerloop.hf.export import export_model
    from innerloop.hf.modeling import InnerloopForCausalLM

    export_model(model, f"{folder}/export", tokenizer=None)
    loaded = InnerloopForCausalLM.from_pretrained(f"{folder}/export", dtype=torch.float64).eval()
    saved, read = model.state_dict(), loaded.model.state_dict()
    assert saved.keys() == read.keys()
    for name, tensor in saved.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
    for parameter in loaded.parameters():  # out of safetensors' unaligned mapping (BLAS rounds by alignment)
        parameter.data = parameter.data.clone()
    errors["saved and loaded"] = max_error(loaded.model(ids)[0], whole)
    return loaded


def run_draw(
    seed: int, mixer: str | None = None, max_length: int = 40, save: bool = True
) -> dict[str, float]:
    """Every check of draw ``seed`` (of ``mixer``; None: any, mixed stacks a quarter of the time):
    the largest error of each comparison, by name (the saved model's are asserted bitwise)."""
    rng = random.Random(seed)
    if mixer == "mixed" or (mixer is None and rng.random() < 0.25):
        config, model = draw_mixed_stack(rng, seed)
        save = False  # a config does not describe a spliced stack
    else:
        config, model = draw_model(rng, seed, mixer or rng.choice([*MIXERS, "e2e"]))
    batch, length = rng.randint(1, 3), rng.randint(1, max_length)
    ids = torch.randint(
        0, config["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )
    errors: dict[str, float] = {}
    model.train()
    ran = check_kernels(model, ids, errors)
    model.eval()
    whole = check_pieces(model, ids, rng, errors, "auto")
    for name in ran:
        force_kernel(model, name)
        check_pieces(model, ids, rng, errors, name)
    force_kernel(model, "auto")
    check_rows(model, ids, whole, errors)
    if save:
        with tempfile.TemporaryDirectory() as folder:
            check_padding(check_saved(model, ids, whole, folder, errors), ids, rng, errors)
    return errors


DRAWS = ((23, "ttt", False), (42, "ttt", False), (1, "mixed", False), (2, "deltanet", True))
"""(seed, mixer, saved) of the test's draws: TTT-MLP and TTT-Linear where the CPU and fused kernels run,
a mixed stack, DeltaNet on delta_chunk, exported."""


@pytest.mark.slow
def test_drawn_models_agree_across_kernels_pieces_rows_padding_and_saving() -> None:
    for seed, mixer, save in (
        (0, "ttt", False),
        (3, "ttt", True),
        (1, "mixed", False),
        (2, "deltanet", False),
    ):
        errors = run_draw(seed, mixer, max_length=6, save=save)
        assert max(errors.values()) <= TOLERANCE, (seed, {k: v for k, v in errors.items() if v > TOLERANCE})


if __name__ == "__main__":  # the fuzzing run: python tests/test_review_s53_s53k.py FIRST_SEED COUNT [MIXER]
    import time

    torch.set_num_threads(1)
    first, count = int(sys.argv[1]), int(sys.argv[2])
    only = sys.argv[3] if len(sys.argv) > 3 else None
    largest: dict[str, float] = {}
    began = time.time()
    for done, seed in enumerate(range(first, first + count), 1):
        try:
            errors = run_draw(seed, only, save=seed % 10 == 0)
        except Exception as error:  # noqa: BLE001 (reported, the run goes on)
            print(f"seed {seed}: raised {type(error).__name__}: {error}", flush=True)
            continue
        for key, value in errors.items():
            kind = key.split(" [")[-1].rstrip("]") + ": " + key.split(" ")[0] if "[" in key else key
            largest[kind] = max(largest.get(kind, 0.0), value)
            if value > TOLERANCE:
                print(f"seed {seed}: {key} {value:.2e}", flush=True)
        if done % 10 == 0:
            shown = {key: f"{value:.1e}" for key, value in sorted(largest.items())}
            print(f"{done} draws in {time.time() - began:.0f}s: {shown}", flush=True)


@pytest.mark.slow
def test_a_float64_export_reloads_the_token_index_it_computed_with(tmp_path) -> None:
    """Found by the fuzzing (and fixed by s53e/s53m's token index record): .double() widens float32's
    1/3 while from_pretrained(dtype=float64) built it exact, so a float64 export did not reload bitwise."""
    from innerloop.hf.export import export_model
    from innerloop.hf.modeling import InnerloopForCausalLM

    config = dict(mixer="ttt", vocab_size=5, hidden_size=4, num_layers=1, num_heads=1, intermediate_size=2)
    model = _build({**config, "ttt": dict(mini_batch_size=3)}, 0).eval()
    export_model(model, tmp_path / "export", tokenizer=None)
    loaded = InnerloopForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float64).model
    saved, read = model.blocks[0].mixer.token_idx, loaded.blocks[0].mixer.token_idx
    assert torch.equal(read, saved), (saved.tolist(), read.tolist())
