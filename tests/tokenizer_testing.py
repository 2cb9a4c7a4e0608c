"""Tokenizers for tests: a small BPE whose template adds a start token (:func:`bos_tokenizer_json`),
and a checkpoint recording it, exported (:func:`export_a_checkpoint_with_a_bos_tokenizer`)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path


def bos_tokenizer_json() -> str:
    """A small byte-level BPE whose template adds a start token ``<s>`` (id 0), as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["def f(x): return x + 1\n" * 50, "hello world " * 50], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tokenizer.to_str()


def export_a_checkpoint_with_a_bos_tokenizer(tmp_path: Path) -> tuple[Path, Path, str]:
    """A tiny TTT checkpoint recording :func:`bos_tokenizer_json` as its tokenizer, exported with
    ``innerloop export``: the checkpoint, the export folder and the tokenizer.json text."""
    from innerloop.checkpoints import save_checkpoint
    from innerloop.cli import main
    from innerloop.models import ModelConfig, build_model

    tokenizer_json = bos_tokenizer_json()
    config = ModelConfig(hidden_size=32, num_heads=2, num_layers=1, intermediate_size=32, vocab_size=300)
    network = build_model(config).eval()
    checkpoint = save_checkpoint(
        {
            "hyper_parameters": {"model": config.to_dict()},
            "state_dict": {f"model.{key}": value for key, value in network.state_dict().items()},
            "tokenizer": {"kind": "huggingface", "tokenizer_json": tokenizer_json, "eos_token": "</s>"},
        },
        tmp_path / "last.safetensors",
    )
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(checkpoint), str(tmp_path / "hf")]) == 0
    return checkpoint, tmp_path / "hf", tokenizer_json
