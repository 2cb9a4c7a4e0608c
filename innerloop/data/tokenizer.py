"""Tokenizers: how text becomes token ids, everywhere a run reads or writes text.

Two kinds, behind one interface (:class:`Tokenizer`):

- :class:`ByteTokenizer` (``data.tokenizer: bytes``, the default): token ``b`` is byte ``b``, 256 tokens.
  Nothing to load, no library imported.
- :class:`HFTokenizer`: any Hugging Face ``tokenizers`` tokenizer, given as a ``tokenizer.json`` file
  or a folder holding one (e.g. one written by :func:`train_bpe` / ``innerloop tokenizer train``, or by
  ``AutoTokenizer.save_pretrained``).

and a third that reads no text: :class:`UnknownTokenizer`, the tokenizer of a checkpoint that records
that it does not know its tokenizer (a model converted from another implementation without
``--tokenizer``): every use of it as text raises :class:`TokenizerError` saying so and how to give one.

:func:`load_tokenizer` turns a ``data.tokenizer`` spec into one; :meth:`Tokenizer.to_state` gives the
JSON-able form a checkpoint stores (the whole ``tokenizer.json``, never a pickle) and
:func:`tokenizer_from_state` reads it back, so evaluation, generation and a resumed run use exactly the
tokenizer the run was trained with. :meth:`Tokenizer.save_pretrained` writes files that
``transformers.AutoTokenizer.from_pretrained`` loads as an equivalent tokenizer (the byte tokenizer
too: a byte-level BPE without merges whose 256 ids are the 256 bytes).

``tokenizers`` is imported only when a Hugging Face tokenizer is used (see :func:`load_tokenizer`), so
the byte-level default costs nothing at start-up.
"""

from __future__ import annotations

import functools
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from innerloop.core.functional import as_integer, user_path
from innerloop.data.atomic import atomic_write_text, file_stamp, remove_stale_temporaries_of

BYTES = "bytes"
"""The ``data.tokenizer`` spec of the byte-level default."""

UNKNOWN = "unknown"
"""The ``kind`` of :class:`UnknownTokenizer`'s state, ``{"kind": "unknown"}``: written by ``innerloop
convert`` without ``--tokenizer``. (A checkpoint that records no tokenizer at all is one of an older
innerloop training run, which was byte-level.)"""

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
END_OF_TEXT = "<|endoftext|>"
"""The special token :func:`train_bpe` gives id 0: placed between documents, like the byte tokenizer's NUL."""

_EOS_NAMES = (END_OF_TEXT, "</s>", "<eos>", "<|end_of_text|>")
"""Special tokens taken as the end-of-text token of a ``tokenizer.json`` that comes without a
``tokenizer_config.json`` naming one."""


class TokenizerError(ValueError):
    """A ``data.tokenizer`` spec (or a stored tokenizer) that cannot be used; the message names it."""


def checked_text(text: Any) -> str:
    """``text`` for :meth:`Tokenizer.encode`: a :class:`TokenizerError` for anything but a str (None,
    bytes, a number), which the tokenizers raised about from inside Python or the Rust library."""
    if not isinstance(text, str):
        raise TokenizerError(
            f"text must be a str, got {type(text).__name__} {_shown_value(text)} (encode_bytes reads bytes)"
        )
    return text


def checked_texts(texts: Any) -> list[str]:
    """``texts`` for :meth:`HFTokenizer.encode_many`: a list of str; one str (which would be encoded
    character by character, each as its own text) or an item that is not a str is refused."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        got = "one str" if isinstance(texts, str) else f"{type(texts).__name__} {_shown_value(texts)}"
        raise TokenizerError(f"texts must be a sequence of str (e.g. [text]), got {got}")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerError(
                f"texts[{index}] must be a str, got {type(text).__name__} {_shown_value(text)}"
            )
    return texts


def checked_ids(ids: Any, vocab_size: int) -> list[int]:
    """``ids`` for :meth:`Tokenizer.decode` as a list of ints (numpy and 0-d torch integers, and a 1-D
    integer tensor or array, are integers): a :class:`TokenizerError` naming the first id outside
    ``0 .. vocab_size - 1`` (a Hugging Face tokenizer decoded it as nothing, silently dropping a token;
    a negative one raised an ``OverflowError`` from the Rust library), or a value that is not a token id
    (a bool, a float, a str, which ``bytes()`` read as bytes or as a length)."""
    items = ids.tolist() if hasattr(ids, "tolist") and getattr(ids, "ndim", 1) == 1 else ids
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TokenizerError(
            f"ids must be a sequence of integer token ids, got {type(ids).__name__} {_shown_value(ids)}"
        )
    values = [as_integer(item) for item in items]
    if None in values:
        bad = next(item for item, value in zip(items, values, strict=True) if value is None)
        raise TokenizerError(
            f"ids must be a sequence of integer token ids, got {type(bad).__name__} {_shown_value(bad)} in it"
        )
    outside = next((value for value in values if not 0 <= value < vocab_size), None)
    if outside is not None:
        raise TokenizerError(
            f"ids holds token id {outside}, outside this tokenizer's vocabulary of {vocab_size} tokens: "
            f"valid ids are 0..{vocab_size - 1} (a model with a larger vocabulary than its tokenizer "
            "sampled an id the tokenizer has no text for)"
        )
    return values


def _shown_value(value: Any, limit: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


UTF8_BYTE_ORDER_MARK = "\ufeff"
"""The character a UTF-8 byte-order mark (``EF BB BF``) decodes to."""


def utf8_file_text(data: bytes) -> str:
    """A file's bytes ``data`` decoded as UTF-8 text, without a byte-order mark at its start: that is a
    signature of the encoding (Windows Notepad writes one), not text, as Python's ``utf-8-sig`` and the
    ``datasets`` library's json and csv readers take it; one inside the text is a character of it.
    Raises :class:`UnicodeDecodeError` as ``bytes.decode`` does (its positions those of ``data``)."""
    text = data.decode("utf-8")
    return text[1:] if text.startswith(UTF8_BYTE_ORDER_MARK) else text


class Tokenizer(ABC):
    """Text to token ids and back. ``vocab_size`` ids, ``0 .. vocab_size - 1``."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (one more than the largest id)."""

    @property
    @abstractmethod
    def eos_id(self) -> int | None:
        """The id placed between documents when text is packed into windows (None: none)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` (no special tokens added)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (invalid UTF-8 shows as U+FFFD)."""

    @abstractmethod
    def to_state(self) -> dict[str, Any]:
        """A JSON-able description that :func:`tokenizer_from_state` turns back into this tokenizer."""

    @abstractmethod
    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir`` (atomically, each
        file; a leading ``~`` is the home folder, as innerloop reads every path) so that
        ``AutoTokenizer.from_pretrained(out_dir)`` loads an equivalent tokenizer; return
        the files written."""

    def encode_bytes(self, data: bytes) -> list[int]:
        """The token ids of a file's contents (:func:`utf8_file_text`: a byte-order mark at its start is
        not text); raises :class:`UnicodeDecodeError` unless the tokenizer reads raw bytes or ``data`` is
        UTF-8."""
        return self.encode(utf8_file_text(data))

    def describe(self) -> str:
        """A short description for messages, e.g. ``bytes`` or ``a tokenizer.json of 1000 tokens``."""
        return f"a Hugging Face tokenizer of {self.vocab_size} tokens"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_state() == other.to_state()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_state(), sort_keys=True))


class ByteTokenizer(Tokenizer):
    """Byte-level: token ``b`` is byte ``b`` (256 tokens); documents are separated by byte 0 (NUL)."""

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def eos_id(self) -> int | None:
        return 0

    def encode(self, text: str) -> list[int]:
        return list(checked_text(text).encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(data)  # any bytes, UTF-8 or not

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(checked_ids(ids, self.vocab_size)).decode("utf-8", errors="replace")

    def to_state(self) -> dict[str, Any]:
        return {"kind": BYTES}

    def describe(self) -> str:
        return BYTES

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        """The byte-level tokenizer for transformers, with :data:`END_OF_TEXT` as id 256 (past the
        model's 256 bytes: tools such as lm-eval need an end-of-text token, and the model never
        produces it). The text ``<|endoftext|>`` is read as its 13 bytes, as :meth:`encode` reads it
        (``split_special_tokens``); only the id 256 means the token. ``innerloop export`` writes the
        same files."""
        return _save_tokenizer_files(
            byte_level_tokenizer_json(end_of_text=True), END_OF_TEXT, out_dir, split_special_tokens=True
        )


class UnknownTokenizer(Tokenizer):
    """The tokenizer of a checkpoint that records that its tokenizer is unknown (``innerloop convert``
    without ``--tokenizer``: another implementation's model comes without its tokenizer, and a
    vocabulary's size does not say which it is). It reads and writes no text: :meth:`encode`,
    :meth:`decode`, :meth:`save_pretrained` and :attr:`vocab_size` raise :class:`TokenizerError`
    naming ``where`` and how to record the model's tokenizer. Data that is token ids already never
    reaches it.

    Args:
        where: the checkpoint, for messages (e.g. ``"'runs/x/last.safetensors'"``).
    """

    def __init__(self, where: str = "the checkpoint") -> None:
        self.where = where

    def _refuse(self) -> TokenizerError:
        return TokenizerError(no_tokenizer_message(self.where))

    @property
    def vocab_size(self) -> int:
        raise self._refuse()

    @property
    def eos_id(self) -> int | None:
        return None

    def encode(self, text: str) -> list[int]:
        raise self._refuse()

    def encode_bytes(self, data: bytes) -> list[int]:
        raise self._refuse()

    def decode(self, ids: Sequence[int]) -> str:
        raise self._refuse()

    def to_state(self) -> dict[str, Any]:
        return {"kind": UNKNOWN}

    def describe(self) -> str:
        return "no recorded tokenizer (converted without --tokenizer)"

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        raise self._refuse()


def no_tokenizer_message(where: str) -> str:
    """One line: the checkpoint ``where`` records no tokenizer, so text cannot become its token ids,
    and how to record one."""
    return (
        f"{where} records no tokenizer (a model converted by `innerloop convert` without --tokenizer), so "
        "text cannot be turned into its token ids or back: convert the model again with --tokenizer "
        "naming its own tokenizer (a tokenizer.json or a tokenizer folder; bytes for a byte-level model)"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: a printable character for each byte (what the ``tokenizers``
    ByteLevel pre-tokenizer maps bytes to)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    characters = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in characters]
    characters.update({b: chr(256 + n) for n, b in enumerate(others)})
    return characters


def byte_level_tokenizer_json(end_of_text: bool = False) -> str:
    """The ``tokenizer.json`` of :class:`ByteTokenizer`: a byte-level BPE without merges over the 256
    bytes (id ``b`` = byte ``b``), no regex split, no special tokens (with ``end_of_text``: the special
    token :data:`END_OF_TEXT` as id 256). Encoding a text gives its UTF-8 bytes and decoding them gives
    the text back, exactly (tests/data_pipeline/test_tokenizer.py)."""
    vocab = {character: byte for byte, character in _bytes_to_unicode().items()}
    added = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": 256, "content": END_OF_TEXT, **added}] if end_of_text else [],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": False,
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": dict(sorted(vocab.items(), key=lambda item: item[1])),
            "merges": [],
        },
    }
    return json.dumps(document, ensure_ascii=False, indent=2)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer``, from the text of its ``tokenizer.json``.

    Args:
        tokenizer_json: the ``tokenizer.json`` text.
        eos_token: the token placed between documents (None: taken from the special tokens
            ``<|endoftext|>``, ``</s>``, ``<eos>`` or ``<|end_of_text|>`` when one exists, else none).
        source: where it came from, for messages.
    """

    def __init__(
        self, tokenizer_json: str, eos_token: str | None = None, source: str = "a tokenizer.json"
    ) -> None:
        tokenizers = import_tokenizers(source)
        try:
            self.backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as err:  # the Rust library raises plain Exceptions for malformed JSON
            raise TokenizerError(_not_a_tokenizer_json(source, tokenizer_json, err)) from None
        # Text is encoded as text: a special token's text inside a document or prompt (the string
        # "<|endoftext|>" in a file about tokenizers) is ordinary characters, never the token itself,
        # which the data pipeline places between documents (as the byte tokenizer reads a NUL in text).
        self.backend.encode_special_tokens = True
        # A document is read whole and alone: a tokenizer.json saved with truncation or padding on (as
        # many saved by transformers are, e.g. max_length 512) cut every document to its first tokens and
        # padded each chunk of documents read together with pad ids, silently, in the training stream.
        self.backend.no_truncation()
        self.backend.no_padding()
        self.tokenizer_json = tokenizer_json
        vocabulary = self.backend.get_vocab(with_added_tokens=True)
        if not vocabulary:
            raise TokenizerError(f"{source} has an empty vocabulary")
        self._vocab_size = max(vocabulary.values()) + 1
        if eos_token is None:
            special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
            eos_token = next((name for name in _EOS_NAMES if name in special), None)
        if eos_token is not None and eos_token not in vocabulary:
            raise TokenizerError(f"{source}: its end-of-text token {eos_token!r} is not in its vocabulary")
        self.eos_token = eos_token
        self._eos_id = vocabulary[eos_token] if eos_token is not None else None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(checked_text(text), add_special_tokens=False).ids

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text (batched in the library)."""
        return [e.ids for e in self.backend.encode_batch(checked_texts(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(checked_ids(ids, self.vocab_size), skip_special_tokens=False)

    def to_state(self) -> dict[str, Any]:
        return {"kind": "huggingface", "tokenizer_json": self.tokenizer_json, "eos_token": self.eos_token}

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        """``tokenizer.json`` and a ``tokenizer_config.json`` that encodes special tokens' text as text,
        as this tokenizer does (``split_special_tokens``)."""
        reading = without_template_tokens(self.tokenizer_json)  # transformers' encode then gives encode's ids
        return _save_tokenizer_files(reading, self.eos_token, out_dir, split_special_tokens=True)


_TEMPLATE_PROCESSORS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")
"""The ``tokenizers`` post-processors that add special tokens around a text (a start token, a separator)."""


def without_template_tokens(tokenizer_json: str) -> str:
    """``tokenizer_json`` without the post-processors that add special tokens around an encoded text
    (Llama's start token, BERT's [CLS]/[SEP]); unchanged, byte for byte, when it has none.

    innerloop reads text without them (:meth:`HFTokenizer.encode`, ``add_special_tokens=False``: the
    training data, ``innerloop generate``'s prompt, eval); transformers' tokenizers add them by default,
    so a saved tokenizer that kept them would give ``generate()`` and lm-eval other ids for the same text
    than the model read. Other post-processors (ByteLevel's offsets) are kept; ids are the same."""
    document = json.loads(tokenizer_json)
    processor = document.get("post_processor")
    kept = _processor_without_templates(processor)
    if kept is processor:
        return tokenizer_json
    document["post_processor"] = kept
    return json.dumps(document, ensure_ascii=False)


def _processor_without_templates(processor: Any) -> Any:
    """``processor`` (a ``post_processor`` of a tokenizer.json) without its template processors: the same
    object when it has none, None when nothing is left."""
    if not isinstance(processor, dict):
        return processor
    if processor.get("type") in _TEMPLATE_PROCESSORS:
        return None
    parts = processor.get("processors")
    if processor.get("type") != "Sequence" or not isinstance(parts, list):
        return processor
    kept = [_processor_without_templates(part) for part in parts]
    if all(new is old for new, old in zip(kept, parts, strict=True)):
        return processor
    kept = [part for part in kept if part is not None]
    return {**processor, "processors": kept} if kept else None


def _save_tokenizer_files(
    tokenizer_json: str,
    eos_token: str | None,
    out_dir: str | os.PathLike[str],
    split_special_tokens: bool = False,
) -> list[Path]:
    """``tokenizer.json`` and a ``tokenizer_config.json`` naming the fast-tokenizer class (and the
    end-of-text token; with ``split_special_tokens``, special tokens' text is encoded as ordinary
    text), each written atomically; ``tokenizer.json``, which makes the folder a tokenizer, last: a
    write stopped between them (a kill, a full disk) leaves no tokenizer that transformers would read
    without its end-of-text token. The temporary files a killed earlier save of them left are removed
    first."""
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2**63 - 1}
    if eos_token is not None:
        config["eos_token"] = eos_token
    if split_special_tokens:
        config["split_special_tokens"] = True
    out = user_path(out_dir)  # "~/x" is the home folder's x, as load_tokenizer reads it
    remove_stale_temporaries_of([out / TOKENIZER_CONFIG_FILE, out / TOKENIZER_FILE])  # a killed save's
    config_text = json.dumps(config, indent=2) + "\n"
    _unpair_a_previous_tokenizer(out, config_text)
    written_config = atomic_write_text(out / TOKENIZER_CONFIG_FILE, config_text)
    return [atomic_write_text(out / TOKENIZER_FILE, tokenizer_json), written_config]


def _unpair_a_previous_tokenizer(out: Path, config_text: str) -> None:
    """Remove a previous ``tokenizer.json`` from ``out`` when the config about to replace its
    ``tokenizer_config.json`` differs from that one: a save cut between the two files (a kill, a full
    disk) then leaves a folder that is no tokenizer, never the previous tokenizer beside a config written
    for another (an innerloop tokenizer's config is the same for every one it trains: that pair stays)."""
    previous_config = out / TOKENIZER_CONFIG_FILE
    try:
        unchanged = previous_config.read_text(encoding="utf-8") == config_text
    except (OSError, UnicodeDecodeError):  # none, or not one to keep
        unchanged = False
    if not unchanged and (out / TOKENIZER_FILE).is_file():
        (out / TOKENIZER_FILE).unlink()


def _one_line(err: object) -> str:
    return " ".join(str(err).split())


TOKENIZER_JSON_KEYS: tuple[str, ...] = (
    "version",
    "truncation",
    "padding",
    "added_tokens",
    "normalizer",
    "pre_tokenizer",
    "post_processor",
    "decoder",
    "model",
)
"""The top-level keys of a ``tokenizer.json`` (the ``tokenizers`` library refuses any other); only
``model`` (the vocabulary and how text is split into it) is required."""


def _not_a_tokenizer_json(source: str, text: str, err: Exception) -> str:
    """Why ``text``, which ``tokenizers`` could not read (``err``), is not a ``tokenizer.json``: not JSON
    at all, JSON of another shape (which keys are missing or foreign), or a tokenizer.json whose
    content the library refuses."""
    try:
        document = json.loads(text)
    except ValueError as json_err:  # json.JSONDecodeError
        return f"{source} is not a valid tokenizer.json: it is not valid JSON ({_one_line(json_err)})"
    optional = list(TOKENIZER_JSON_KEYS[:-1])
    shape = f"a tokenizer.json is a JSON object with the key 'model' and optionally {optional}"
    if not isinstance(document, dict):
        return f"{source} is JSON ({type(document).__name__}) but not a tokenizer.json: {shape}"
    problems = [] if "model" in document else ["it has no key 'model'"]
    foreign = sorted(key for key in document if key not in TOKENIZER_JSON_KEYS)
    if foreign:
        problems.append(f"its keys {foreign} are not keys of a tokenizer.json")
    if problems:
        return f"{source} is JSON but not a tokenizer.json: {'; '.join(problems)} ({shape})"
    return f"{source} is not a valid tokenizer.json: {_one_line(err)}"


INSTALL_HF = 'pip install "innerloop[hf]"'
"""How to install the optional Hugging Face packages (``datasets``, ``tokenizers``)."""


def missing_package(user: str, package: str, err: ImportError) -> str:
    """One line: ``user`` needs ``package``, which ``err`` says is not installed (or cannot be imported,
    and why), and the command that installs it."""
    why = (
        "which is not installed here"
        if getattr(err, "name", None) == package
        else f"which cannot be imported here ({_one_line(err)})"
    )
    return f"{user} needs the {package!r} package, {why}: {INSTALL_HF}"


def import_tokenizers(user: str) -> Any:
    """The ``tokenizers`` module; :class:`TokenizerError` saying that ``user`` (e.g. ``data.tokenizer=...``)
    needs it, and how to install it, when it cannot be imported."""
    try:
        import tokenizers
    except ImportError as err:
        raise TokenizerError(missing_package(user, "tokenizers", err)) from None
    return tokenizers


def load_tokenizer(spec: str, option: str = "data.tokenizer") -> Tokenizer:
    """The tokenizer a ``data.tokenizer`` spec names: ``bytes``, a ``tokenizer.json`` file, or a folder
    holding one (its ``tokenizer_config.json``, when present, may name the end-of-text token as
    ``eos_token``). Raises :class:`TokenizerError` naming ``option`` (``data.tokenizer``, or the
    command-line option that gave ``spec``) otherwise."""
    valid = f"valid: {BYTES!r}, a {TOKENIZER_FILE} file or a folder holding one"
    spec = _checked_spec(spec, option, valid)
    if spec == BYTES:
        return ByteTokenizer()
    path = user_path(spec)
    if path.is_dir():
        folder, file = path, path / TOKENIZER_FILE
        if not file.is_file():
            raise TokenizerError(f"{option}={spec!r} is a folder without a {TOKENIZER_FILE}; {valid}")
    elif path.is_file():
        folder, file = path.parent, path
    else:
        raise TokenizerError(
            f"{option}={spec!r} is neither {BYTES!r} nor an existing file or folder; {valid} "
            "(tokenizers are read from local files only, nothing is downloaded)"
        )
    config = folder / TOKENIZER_CONFIG_FILE if file.name == TOKENIZER_FILE else None
    return _load_files(f"{option}={spec!r}", file, config, _stamp(file), _stamp(config))


def tokenizer_from_source(spec: str, option: str = "--tokenizer") -> Tokenizer:
    """The tokenizer of a command line's ``option`` (``innerloop convert --tokenizer``), in the form a
    checkpoint records: what :func:`load_tokenizer` reads (``bytes``, a ``tokenizer.json`` file or a
    folder holding one), or a tokenizer folder without a ``tokenizer.json`` (e.g. a ``tokenizer.model``
    with its ``tokenizer_config.json``) that ``transformers.AutoTokenizer`` loads, offline, as a fast
    tokenizer: its ``tokenizers`` form is recorded. The sources are those ``innerloop convert --format
    hf --tokenizer`` writes into a Hugging Face folder. Raises :class:`TokenizerError` naming ``option``."""
    spec = _checked_spec(spec, option, f"valid: {BYTES!r}, a {TOKENIZER_FILE} file or a tokenizer folder")
    path = user_path(spec)
    if spec != BYTES and path.is_dir() and not (path / TOKENIZER_FILE).is_file():
        return _transformers_tokenizer(path, f"{option}={spec!r}")
    return load_tokenizer(spec, option)


def _checked_spec(spec: Any, option: str, valid: str) -> str:
    """``spec`` as a str; :class:`TokenizerError` naming ``option`` for what is not a path (pathlib's
    TypeError named nothing) or an empty one (``''`` would name the current directory and read the
    ``tokenizer.json`` found there)."""
    if not isinstance(spec, (str, os.PathLike)) or not isinstance(os.fspath(spec), str):
        raise TokenizerError(f"{option}={spec!r} ({type(spec).__name__}) is not a str or a path; {valid}")
    text = os.fspath(spec)
    if not text.strip():
        raise TokenizerError(f"{option}={text!r} is empty (it would name the current directory); {valid}")
    return text


def _transformers_tokenizer(folder: Path, source: str) -> HFTokenizer:
    """The fast form of the tokenizer ``transformers.AutoTokenizer`` loads from ``folder`` (offline)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise TokenizerError(
            missing_package(f"{source} (a folder without a {TOKENIZER_FILE})", "transformers", err)
        ) from None
    try:
        loaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for what it cannot read
        raise TokenizerError(
            f"{source} is a folder without a {TOKENIZER_FILE} from which transformers' AutoTokenizer "
            f"cannot load a tokenizer: {_one_line(err)}"
        ) from None
    backend = getattr(loaded, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(
            f"{source}: transformers loads it as {type(loaded).__name__}, which has no `tokenizers` form "
            f"to record; give a folder holding its {TOKENIZER_FILE}"
        )
    if not backend.get_vocab(with_added_tokens=False):  # e.g. a folder holding only tokenizer_config.json
        raise TokenizerError(
            f"{source}: the tokenizer transformers makes of this folder has no vocabulary (special tokens "
            f"aside; the folder holds {sorted(p.name for p in folder.iterdir())}): copy the tokenizer's "
            f"{TOKENIZER_FILE} (or its vocabulary files) into it"
        )
    eos = loaded.eos_token if isinstance(loaded.eos_token, str) else None
    return HFTokenizer(backend.to_str(), eos, source)


def _stamp(path: Path | None) -> tuple[int, ...] | None:
    """:func:`~innerloop.data.atomic.file_stamp` of a file (device, inode, modification time, size, change
    time), None if there is none: a changed file is read again, one rewritten with its old time and size
    too, and one replaced by a file of another file system that has the same inode number."""
    if path is None or not path.is_file():
        return None
    return file_stamp(path, device=True)


@functools.lru_cache(maxsize=8)
def _load_files(
    source: str, file: Path, config: Path | None, file_stamp: object, config_stamp: object
) -> HFTokenizer:
    """:func:`load_tokenizer` of a file (cached by the files' stamps: a run's config checks, data and
    checkpoints each ask for the tokenizer, and a large tokenizer.json takes a while to parse);
    ``source`` names the spec in messages, e.g. ``data.tokenizer='runs/tok'``."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{source}: {str(file)!r} cannot be read: {_one_line(err)}") from None
    eos_token = _configured_eos_token(config, source) if config is not None else None
    return HFTokenizer(text, eos_token, source)


def _configured_eos_token(config_file: Path, source: str) -> str | None:
    """The ``eos_token`` a ``tokenizer_config.json`` beside the tokenizer names (a string, or a dict
    with ``content``), or None."""
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(
            f"{source}: {str(config_file)!r} is not readable JSON: {_one_line(err)}"
        ) from None
    eos = config.get("eos_token") if isinstance(config, dict) else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def tokenizer_from_state(state: Any, where: str = "the checkpoint") -> Tokenizer:
    """The tokenizer :meth:`Tokenizer.to_state` described; None (a checkpoint of a training run written
    before tokenizers were recorded, which was byte-level) is the byte tokenizer, and
    ``{"kind": "unknown"}`` (``innerloop convert`` without ``--tokenizer``) an :class:`UnknownTokenizer`.
    Raises :class:`TokenizerError` naming ``where``."""
    if state is None or state == {"kind": BYTES}:
        return ByteTokenizer()
    if state == {"kind": UNKNOWN}:
        return UnknownTokenizer(where)
    if (
        not isinstance(state, dict)
        or state.get("kind") != "huggingface"
        or not isinstance(state.get("tokenizer_json"), str)
        or not isinstance(state.get("eos_token"), (str, type(None)))
    ):
        raise TokenizerError(f"{where} records a tokenizer this innerloop cannot read: {str(state)[:200]!r}")
    return HFTokenizer(state["tokenizer_json"], state["eos_token"], f"the tokenizer recorded in {where}")


MIN_TRAINED_VOCAB = 258
"""The smallest vocabulary :func:`train_bpe` is asked for: the 256 bytes, the end-of-text token and at
least one merge (257 would be the byte-level tokenizer with its ids moved; ``innerloop tokenizer train
--vocab-size`` has the same minimum)."""
MAX_TRAINED_VOCAB = 2**24
"""The largest vocabulary :func:`train_bpe` is asked for (16.7M tokens; the trainer allocates tables of
that size up front, and aborts with an out-of-memory message past about 2**31)."""


def train_bpe(
    texts: Iterable[str], vocab_size: int, files: Sequence[str | os.PathLike[str]] | None = None
) -> HFTokenizer:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``texts`` with the ``tokenizers``
    library: id 0 is :data:`END_OF_TEXT` (the document separator), ids 1..256 the 256 bytes, the rest
    merges. The same texts give the same tokenizer (the library's trainer is deterministic). Text with
    fewer distinct pairs than ``vocab_size`` asks for gives fewer tokens (the library stops when nothing
    is left to merge).

    Raises :class:`TokenizerError` when ``texts`` hold no text to learn merges from (nothing, or only
    whitespace) or too little for a single merge: such a tokenizer would be the byte-level one with its
    ids moved. ``files``, the files the texts were read from, are named in these messages. A string
    ``texts`` is one text (not one per character), a string ``files`` one file.
    """
    if as_integer(vocab_size) is None:  # a float reached the Rust trainer, a str the comparison below
        raise TokenizerError(
            f"vocab_size={vocab_size!r} ({type(vocab_size).__name__}) must be an integer in "
            f"[{MIN_TRAINED_VOCAB}, {MAX_TRAINED_VOCAB}]"
        )
    vocab_size = as_integer(vocab_size)
    if isinstance(texts, bytes) or not isinstance(texts, Iterable):
        raise TokenizerError(
            f"texts must be a str or an iterable of str, got {type(texts).__name__} {_shown_value(texts)}"
        )
    if vocab_size < MIN_TRAINED_VOCAB:
        raise TokenizerError(
            f"vocab_size={vocab_size} must be >= {MIN_TRAINED_VOCAB} (the end-of-text token, the 256 bytes "
            "and at least one merge); for byte-level tokens use data.tokenizer=bytes"
        )
    if vocab_size > MAX_TRAINED_VOCAB:
        raise TokenizerError(
            f"vocab_size={vocab_size} must be <= {MAX_TRAINED_VOCAB} (the tokenizers library's trainer "
            "reserves memory for every token asked for, and aborts the process when it cannot)"
        )
    tokenizers = import_tokenizers("training a BPE tokenizer")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [texts] if isinstance(texts, str) else texts  # one text, not one text per character
    files = [files] if isinstance(files, (str, os.PathLike)) else files  # one file, not its letters
    tally = _TextTally()
    backend.train_from_iterator(tally.count(texts), trainer)
    _check_merges_learned(tally, backend.get_vocab_size(with_added_tokens=True) - 257, files)
    return HFTokenizer(backend.to_str(), END_OF_TEXT, "the trained tokenizer")


class _TextTally:
    """What :func:`train_bpe` saw of its texts, counted as they pass (they may be read once only)."""

    def __init__(self) -> None:
        self.characters = 0
        self.has_text = False  # any character that is not whitespace

    def count(self, texts: Iterable[str]) -> Iterable[str]:
        """``texts``, unchanged, tallied on the way."""
        for index, text in enumerate(texts):
            if not isinstance(text, str):  # the Rust trainer's own error named neither the text nor its type
                raise TokenizerError(
                    f"texts[{index}] must be a str, got {type(text).__name__} {_shown_value(text)}"
                )
            self.characters += len(text)
            self.has_text = self.has_text or (bool(text) and not text.isspace())
            yield text


def _check_merges_learned(tally: _TextTally, merges: int, files: Sequence[Any] | None) -> None:
    """:class:`TokenizerError` when :func:`train_bpe`'s text held nothing to learn, or no merge was learned."""
    where = _describe_files(files)
    verb = "have" if files is not None and len(files) > 1 else "has"
    if not tally.has_text:
        raise TokenizerError(
            f"{where} {verb} no text to learn merges from (empty, or only whitespace); train on files "
            "that hold text"
        )
    if merges <= 0:
        characters = f"{tally.characters} character{'s' if tally.characters != 1 else ''}"
        raise TokenizerError(
            f"{where} {verb} too little text to learn a single merge ({characters}, no pair of bytes "
            "inside a word); train on more text, or use data.tokenizer=bytes for byte-level tokens"
        )


def _describe_files(files: Sequence[Any] | None, shown: int = 5) -> str:
    """``files`` for a message: ``'a.txt'``, ``the 2 files 'a.txt', 'b.txt'``, ``the 9 files 'a.txt', ...
    and 4 more``; ``the training input`` without files."""
    if not files:
        return "the training input"
    names = [repr(str(f)) for f in files]
    if len(names) == 1:
        return names[0]
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    return f"the {len(names)} files {listed}"
