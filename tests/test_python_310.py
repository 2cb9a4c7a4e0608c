"""innerloop supports Python 3.10 (``requires-python``), whose hashlib has no ``file_digest``: what
hashes files (an export's record of each file's SHA-256, the check of an export's weights on load, the
identity of a checkpoint that records no checksum) reads the files itself. Run here with
``hashlib.file_digest`` removed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import innerloop.hf  # noqa: F401  (registers the Auto classes)
from innerloop.checkpoints import checkpoint_identity
from innerloop.hf.export import export_model
from innerloop.models import ModelConfig, build_model

SWA = {
    "mixer": "swa",
    "hidden_size": 32,
    "num_heads": 2,
    "num_layers": 2,
    "intermediate_size": 48,
    "window": 8,
}


def test_export_and_load_need_no_python_3_11_hashlib(tmp_path: Path, monkeypatch) -> None:
    """innerloop supports Python 3.10, whose hashlib has no file_digest: exporting (its record of every
    file's SHA-256) and loading (the check of the weights against it) read the files themselves."""
    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(SWA)).eval()
    folder = export_model(model, tmp_path / "exported", tokenizer=None)
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids)[0])


def test_the_identity_of_a_checkpoint_without_a_recorded_checksum(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    path = tmp_path / "old run.safetensors"
    save_file({"w": torch.ones(3)}, path)  # no checksum in its metadata: hashed whole
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    assert checkpoint_identity(path) == f"old-run-{expected}"
