"""The tokenizer files of an exported folder, so that ``AutoTokenizer.from_pretrained(folder)`` (and
lm-eval, which loads one) works.

innerloop's default runs are byte-level: token ``i`` is the byte ``i``. :func:`byte_tokenizer` is
that tokenizer for the ``tokenizers`` library: a byte-level pre-tokenizer (which maps each byte to one
printable character, as GPT-2's does) and a vocabulary of the 256 bytes with no merges, so
``encode(text).ids == list(text.encode("utf-8"))`` for any text.

It also declares an end-of-text token, ``<|endoftext|>`` with id 256, past the model's vocabulary:
tools need one (lm-eval adds it to the stop strings of ``generate_until`` and uses it as the prefix of
an empty context), and a byte-level model has none. The model never produces it, and refuses it as
input with a clear error (:meth:`~innerloop.hf.modeling.InnerloopForCausalLM.forward`).
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast


def byte_characters() -> dict[int, str]:
    """GPT-2's byte -> character table, the one ``tokenizers``' ByteLevel pre-tokenizer uses: printable
    bytes stand for themselves, the others are shifted to the characters from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


END_OF_TEXT = "<|endoftext|>"
"""The byte-level tokenizer's end-of-text token (id 256, outside the bytes)."""


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """innerloop's byte-level tokenizer: token id = byte value (256 tokens), and :data:`END_OF_TEXT`."""
    vocab = {character: byte for byte, character in byte_characters().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT)


BYTES = "bytes"
"""The name of innerloop's byte-level tokenizer (as ``data.tokenizer`` calls it)."""


def load_tokenizer(source: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer to export: ``"bytes"`` for innerloop's bytes, else a ``tokenizer.json`` file or a
    folder that ``AutoTokenizer`` loads (offline). Raises ``ValueError`` naming the path when it is
    neither."""
    if source == BYTES:
        return byte_tokenizer()
    path = Path(source)
    if path.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    raise ValueError(f"tokenizer {str(path)!r} is neither a tokenizer.json file nor a folder")


def write_tokenizer_files(
    folder: str | os.PathLike[str], vocab_size: int, source: str | os.PathLike[str] = BYTES
) -> None:
    """Write the tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` ...) into ``folder``.

    Args:
        folder: the export folder (being assembled).
        vocab_size: the model's vocabulary; a tokenizer whose vocabulary (special tokens aside) is
            larger is refused (its ids would index past the embedding).
        source: see :func:`load_tokenizer` (``"bytes"``: the byte-level tokenizer).
    """
    tokenizer = load_tokenizer(source)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has {vocab_size}: "
            "export the tokenizer the model was trained with"
        )
    tokenizer.save_pretrained(str(folder))
