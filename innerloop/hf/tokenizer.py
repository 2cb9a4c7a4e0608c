"""The tokenizer files of an exported folder, so that ``AutoTokenizer.from_pretrained(folder)`` (and
lm-eval, which loads one) works.

innerloop's default runs are byte-level: token ``i`` is the byte ``i``. :func:`byte_tokenizer` is
that tokenizer for transformers (a byte-level pre-tokenizer and a vocabulary of the 256 bytes with no
merges, so ``encode(text).ids == list(text.encode("utf-8"))`` for any text); a run with a Hugging Face
tokenizer exports the one its checkpoint recorded.

It also declares an end-of-text token, ``<|endoftext|>`` with id 256, past the model's vocabulary:
tools need one (lm-eval adds it to the stop strings of ``generate_until`` and uses it as the prefix of
an empty context), and a byte-level model has none. The model never produces it, and refuses it as
input with a clear error (:meth:`~innerloop.hf.modeling.InnerloopForCausalLM.forward`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from innerloop.data.tokenizer import (
    END_OF_TEXT,
    ByteTokenizer,
    HFTokenizer,
    byte_level_tokenizer_json,
    without_template_tokens,
)
from innerloop.data.tokenizer import Tokenizer as RunTokenizer
from innerloop.data.tokenizer import load_tokenizer as load_run_tokenizer


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """innerloop's byte-level tokenizer (token id = byte value, the ``data.tokenizer: bytes`` of a run,
    :func:`~innerloop.data.tokenizer.byte_level_tokenizer_json`) with :data:`END_OF_TEXT` as id 256,
    the tokenizer ``ByteTokenizer.save_pretrained`` writes. The text ``<|endoftext|>`` is encoded as its
    bytes, as a run reads it (``split_special_tokens``); only the id 256 is the token."""
    backend = Tokenizer.from_str(byte_level_tokenizer_json(end_of_text=True))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_TEXT, split_special_tokens=True)


def from_run_tokenizer(tokenizer: RunTokenizer) -> PreTrainedTokenizerBase:
    """The transformers form of the tokenizer a run recorded (its checkpoint's, see
    :func:`~innerloop.checkpoints.checkpoint_tokenizer`)."""
    if isinstance(tokenizer, ByteTokenizer):
        return byte_tokenizer()
    if not isinstance(tokenizer, HFTokenizer):
        raise ValueError(f"cannot export {tokenizer.describe()} ({type(tokenizer).__name__})")
    # it reads text as the run did: special tokens' text as text, no template tokens (a start token)
    backend = Tokenizer.from_str(without_template_tokens(tokenizer.tokenizer_json))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=tokenizer.eos_token, split_special_tokens=True
    )


BYTES = "bytes"
"""The name of innerloop's byte-level tokenizer (as ``data.tokenizer`` calls it)."""


def load_tokenizer(source: str | os.PathLike[str] | RunTokenizer) -> PreTrainedTokenizerBase:
    """The tokenizer to export: a run's tokenizer (:func:`from_run_tokenizer`), ``"bytes"`` for
    innerloop's bytes, else a ``tokenizer.json`` file or a folder that ``AutoTokenizer`` loads
    (offline). Raises ``ValueError`` naming the path when it is none of these, or when the folder's
    tokenizer has no vocabulary (special tokens aside): transformers makes one of a folder holding only a
    ``tokenizer_config.json`` (its ``tokenizer.json`` not copied), which encodes every text as nothing."""
    if isinstance(source, RunTokenizer):
        return from_run_tokenizer(source)
    if source == BYTES:
        return byte_tokenizer()
    path = Path(source)
    if path.is_file():  # innerloop's reading of it: its end-of-text token found as data.tokenizer finds it
        return from_run_tokenizer(load_run_tokenizer(str(path), "tokenizer"))
    if path.is_dir():
        loaded = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if base_id_bound(loaded) == 0:
            raise ValueError(
                f"{str(path)!r}: the tokenizer transformers makes of this folder has no vocabulary (special "
                f"tokens aside; the folder holds {sorted(p.name for p in path.iterdir())}): copy the "
                "tokenizer's tokenizer.json (or its vocabulary files) into it"
            )
        return loaded
    raise ValueError(f"tokenizer {str(path)!r} is neither a tokenizer.json file nor a folder")


def base_id_bound(tokenizer: Any) -> int:
    """One past the largest id of ``tokenizer``'s vocabulary, its added (special) tokens aside, which
    may lie past a model's vocabulary: the rows a model needs. Not the number of entries, which is
    smaller when ids skip (a WordLevel vocabulary {"a": 0, "b": 5000}). ``tokenizer``: a transformers
    tokenizer or innerloop's :class:`~innerloop.data.tokenizer.HFTokenizer`."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "backend", None)
    if backend is None:
        return tokenizer.vocab_size
    return max(backend.get_vocab(with_added_tokens=False).values(), default=-1) + 1


def write_tokenizer_files(
    folder: str | os.PathLike[str],
    vocab_size: int,
    source: str | os.PathLike[str] | RunTokenizer | PreTrainedTokenizerBase = BYTES,
) -> None:
    """Write the tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` ...) into ``folder``.

    Args:
        folder: the export folder (being assembled).
        vocab_size: the model's vocabulary; a tokenizer whose vocabulary (special tokens aside) is
            larger is refused (its ids would index past the embedding).
        source: see :func:`load_tokenizer` (``"bytes"``: the byte-level tokenizer), or a tokenizer it
            loaded.
    """
    tokenizer = source if isinstance(source, PreTrainedTokenizerBase) else load_tokenizer(source)
    bound = base_id_bound(tokenizer)
    if bound > vocab_size:
        raise ValueError(
            f"the tokenizer has ids up to {bound - 1} (special tokens aside) but the model's vocabulary has "
            f"{vocab_size}: export the tokenizer the model was trained with"
        )
    tokenizer.save_pretrained(str(folder))
