"""Checks that a second mutation review found missing: each test fails on a small plausible bug that
no test (fast or slow) caught. Stored model settings against the earlier defaults filled in on load,
the checkpoint checksum's cover of dtypes, the file split's independence from where a corpus lies,
the size check against what is read, the end-of-text id after each file, a decoded attention cache
continued twice, one token of right padding, and the first-use probe on a trained layer's identical
batch rows and on underflowing data."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from plugin_testing import register_linear_dual_form_kernel

import innerloop
from innerloop.checkpoints import CheckpointError, load_checkpoint, load_model, save_checkpoint
from innerloop.data.text import read_tokens, split_by_file, text_split_lengths
from innerloop.data.tokenizer import HFTokenizer, byte_level_tokenizer_json
from innerloop.hf.modeling import mask_padding
from innerloop.kernels.dispatch import KernelCheckError
from innerloop.kernels.first_use import _weak
from innerloop.kernels.reference import reference_kernel
from innerloop.models import ModelConfig, build_model
from innerloop.models.attention import CausalSelfAttention
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel
from innerloop.train.data import TextDataModule

WRAPPINGS_OFF_THE_DEFAULT = [(True, False), (False, True), (False, False)]


def _ttt_model(inner_norm: bool, inner_residual: bool) -> torch.nn.Module:
    config = ModelConfig.from_dict(
        {
            "mixer": "ttt",
            "vocab_size": 256,
            "hidden_size": 32,
            "num_layers": 1,
            "num_heads": 2,
            "intermediate_size": 64,
            "ttt": {"inner_norm": inner_norm, "inner_residual": inner_residual, "mini_batch_size": 4},
        }
    )
    torch.manual_seed(0)
    return build_model(config).eval()


IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("inner_norm", "inner_residual"), WRAPPINGS_OFF_THE_DEFAULT)
def test_a_checkpoint_keeps_its_inner_wrapping_over_the_defaults_filled_in_for_older_ones(
    tmp_path, inner_norm, inner_residual
) -> None:
    """Loading fills in inner_norm / inner_residual for checkpoints from before they existed; a stored
    value must win over that default (same weights, another function otherwise)."""
    model = _ttt_model(inner_norm, inner_residual)
    tree = {
        "hyper_parameters": {"model": model.config.to_dict()},
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
    }
    loaded = load_model(save_checkpoint(tree, tmp_path / "last.safetensors"))
    assert (loaded.config.ttt.inner_norm, loaded.config.ttt.inner_residual) == (inner_norm, inner_residual)
    with torch.no_grad():
        assert torch.equal(loaded(IDS)[0], model(IDS)[0])


@pytest.mark.parametrize(("inner_norm", "inner_residual"), WRAPPINGS_OFF_THE_DEFAULT)
def test_an_export_keeps_its_inner_wrapping_over_the_defaults_filled_in_for_older_ones(
    tmp_path, inner_norm, inner_residual
) -> None:
    from transformers import AutoModelForCausalLM

    from innerloop.hf.export import export_model

    model = _ttt_model(inner_norm, inner_residual)
    loaded = AutoModelForCausalLM.from_pretrained(export_model(model, tmp_path / "exported")).eval()
    ttt = loaded.config.model["ttt"]
    assert (ttt["inner_norm"], ttt["inner_residual"]) == (inner_norm, inner_residual)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("saved", "relabelled"), [(torch.bfloat16, "F16"), (torch.float32, "I32")])
def test_a_tensor_relabelled_to_another_dtype_of_its_width_is_refused_as_corrupt(tmp_path, saved, relabelled):
    """Same bytes under another dtype are other numbers: the checksum covers each tensor's dtype."""
    path = save_checkpoint({"state_dict": {"w": torch.randn(4, 4).to(saved)}}, tmp_path / "c.safetensors")
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    (name,) = [k for k in header if k != "__metadata__"]
    header[name]["dtype"] = relabelled
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_the_files_held_out_do_not_depend_on_where_the_corpus_lies(tmp_path) -> None:
    """Without keys (the default corpus, the standard library's source) a file's side of the split is
    decided by its path inside the corpus: the same corpus installed elsewhere splits the same way."""
    names = [f"pkg{i % 5}/module{i}.py" for i in range(60)]
    held_out = []
    for place in ("usr/lib/python3.12", "opt/conda/lib/python3.12"):
        root = tmp_path / place
        for name in names:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("x = 1\n")
        _, validation = split_by_file(sorted(root / n for n in names), 0.2)
        held_out.append(sorted(p.relative_to(root).as_posix() for p in validation))
    assert held_out[0] and held_out[0] == held_out[1]


@pytest.mark.parametrize("files", [1, 7])
def test_the_sizes_the_config_check_counts_are_what_the_data_module_reads(tmp_path, files) -> None:
    paths = []
    for i in range(files):
        paths.append(tmp_path / f"file{i}.txt")
        paths[-1].write_text("abcdefghij" * (3 + i))
    checked = text_split_lengths(paths, 0.3)
    module = TextDataModule([str(p) for p in paths], seq_len=8, batch_size=1, val_fraction=0.3)
    module.setup()
    assert tuple(checked) == (len(module.train_bytes), len(module.val_bytes))


def test_the_end_of_text_id_follows_each_file(tmp_path) -> None:
    tokenizer = HFTokenizer(byte_level_tokenizer_json(end_of_text=True))
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("c")
    ids = read_tokens([tmp_path / "a.txt", tmp_path / "b.txt"], tokenizer).tolist()
    assert ids == [97, 98, tokenizer.eos_id, 99, tokenizer.eos_id]


def test_a_decoded_attention_cache_continued_twice_keeps_each_continuation_its_own() -> None:
    """A cache a decode step wrote (it has room to grow in place) continued by two different tokens:
    the second continuation must not write over the first one's keys."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, 2, None).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        _, prompt = layer(x[:, :8])
        _, stepped = layer(x[:, 8:9], prompt)  # a decode step: this cache has room
        _, first = layer(x[:, 9:10], stepped)
        first_keys = first.key.clone()
        layer(torch.randn(2, 1, 16, dtype=torch.float64), stepped)  # a second continuation
        continued, _ = layer(x[:, 10:11], first)
        whole, _ = layer(x[:, :11])
    assert torch.equal(first.key, first_keys)
    torch.testing.assert_close(continued, whole[:, 10:11], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("mask", "kind"),
    [
        ([[1, 1, 1, 0], [1, 1, 1, 1]], "right"),
        ([[0, 1, 1, 1], [1, 1, 1, 1]], "left"),
        ([[1, 1, 0, 0]], "right"),
    ],
)
def test_one_token_of_padding_is_told_apart_like_several(mask, kind) -> None:
    assert mask_padding(torch.tensor(mask))[0] == kind


def test_a_kernel_reading_row_0s_weights_is_refused_on_a_trained_layers_identical_rows(
    fresh_global_registry,
) -> None:
    """A first block starts from the layer's initial weights, the same in every batch row, so a kernel
    that reads row 0's weights for every row passes it: such a pass is confirmed on rows that differ,
    also when the weights are a trained layer's (nonzero biases), not a fresh one's."""
    forward, decode = reference_kernel(LinearModel(), Reconstruction())

    def reads_row_zero(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
        row_zero = {k: v[:1].expand_as(v).clone() for k, v in params.items()}
        return forward(xq, xk, xv, lr, tau, row_zero, ln_weight, ln_bias, eps)

    register_linear_dual_form_kernel("reads_row_zero", reads_row_zero, decode=decode)
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(16, 2, inner_model="linear", mini_batch_size=4, kernel="reads_row_zero")
    with torch.no_grad():
        layer.initial_params.b1.copy_(0.5 * torch.randn_like(layer.initial_params.b1))
    x = torch.randn(2, 16, 16)
    with pytest.raises(KernelCheckError), torch.no_grad():
        _, state = layer(x[:, :8])
        layer(x[:, 8:], state)


def test_data_whose_products_underflow_is_too_weak_to_judge_a_kernel() -> None:
    x = 1e-25 * torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x * x, torch.zeros_like(x)) or (x * x).abs().max() < torch.finfo(torch.float32).tiny
    assert _weak(x) is not None
    assert _weak(torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))) is None
