"""Review s49e: TTT-E2E against cases nobody listed.

- A damaged official orbax checkpoint (any file of it truncated, emptied or deleted) is refused or reads
  the very same arrays: never a silently different model (docs/e2e.md: "a truncated array ... refused
  naming the array"). Bytes changed in place are not detectable (orbax stores no checksums), as
  docs/e2e.md says; this review measured 35 of 40 single-bit flips in the data file loading silently.
- The meta-gradient equals five-point finite differences in float64 at the window/chunk/length edges
  the existing test does not take (window shorter than a chunk, a sequence shorter than the window and
  not a multiple of the chunk, several suffix blocks, active clipping, the inner-lr warm-up).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_testing import directional_difference

from innerloop.models import E2EConfig, ModelConfig, build_model

DATA = Path(__file__).parent / "data" / "e2e"


def _damaged(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "emptied":
        path.write_bytes(b"")
    else:
        path.unlink()


@pytest.mark.slow  # ~1 s: 30 reads of the orbax checkpoint
def test_a_truncated_emptied_or_deleted_orbax_file_never_loads_other_weights(tmp_path) -> None:
    pytest.importorskip("tensorstore", reason="the e2e extra (tensorstore) is part of the test extra")
    from innerloop.interop.ttt_e2e import OfficialConfigError, read_orbax_weights

    source = DATA / "checkpoint"
    good = read_orbax_weights(source)
    files = sorted(p.relative_to(source) for p in (source / "0" / "model_weights").rglob("*") if p.is_file())
    files = [f for f in files if f.name != "_METADATA"]  # its damage: tested in tests/interop/test_ttt_e2e.py
    refused = 0
    for number, name in enumerate(files):
        for how in ("truncated", "emptied", "deleted"):
            copy = tmp_path / f"{number}-{how}"
            shutil.copytree(source, copy)
            (copy / name).chmod(0o644)
            _damaged(copy / name, how)
            try:
                arrays = read_orbax_weights(copy)
            except OfficialConfigError as err:
                assert "cannot be read" in str(err), (name, how, err)
                refused += 1
                continue
            assert arrays.keys() == good.keys(), (name, how)  # a file the reader does not use: same arrays
            for key, value in good.items():
                assert np.array_equal(arrays[key], value), (name, how, key)
    assert refused >= 12  # measured: the 2 data files, the manifest and b-tree node they are read by, 3 ways


EDGES = [  # (layers, window, chunk, length, suffix_fraction, clip, chunk_targets, progress)
    (2, 2, 3, 7, 0.5, 1.0, "next_token", 1.0),  # window shorter than a chunk, length not a multiple
    (2, 9, 4, 7, 1.0, 0.05, "within_chunk", 0.03),  # length shorter than the window, warm-up, clip active
    (3, 4, 3, 8, 1.0, 0.0, "next_token", 1.0),  # every block a suffix block, no clip
]


@pytest.mark.slow  # ~1-3 s: a meta-gradient and four forwards per config, in float64
@pytest.mark.parametrize("layers,window,chunk,length,suffix,clip,targets,progress", EDGES)
def test_meta_gradient_equals_finite_differences_at_window_and_chunk_edges(
    layers, window, chunk, length, suffix, clip, targets, progress
) -> None:
    e2e = E2EConfig(
        chunk_size=chunk, suffix_fraction=suffix, inner_grad_clip=clip, chunk_targets=targets, inner_lr=3.0
    )
    config = ModelConfig(
        mixer="e2e", vocab_size=13, hidden_size=8, num_heads=2, num_layers=layers, intermediate_size=12,
        window=window, e2e=e2e,
    )  # fmt: skip
    torch.manual_seed(layers)
    model = build_model(config).double().train()
    model.set_outer_progress(progress)
    ids = torch.randint(0, 13, (2, length + 1))

    def loss() -> torch.Tensor:
        logits, _ = model(ids[:, :-1])
        return model.training_loss(logits, ids[:, 1:], -100)

    params = list(model.parameters())
    gradient = torch.autograd.grad(loss(), params)
    direction = [torch.randn_like(p) for p in params]
    norm = torch.sqrt(sum((d * d).sum() for d in direction))
    direction = [d / norm for d in direction]  # a unit step: h is the distance moved
    analytic = sum((g * d).sum() for g, d in zip(gradient, direction, strict=True)).item()
    numeric = directional_difference(params, direction, loss, h=1e-5)
    assert abs(analytic - numeric) <= 1e-7 * abs(numeric), (analytic, numeric)
