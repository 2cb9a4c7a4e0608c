"""Review s47c (issue 9 across the public API, as an attacker):
- the tokenizers' ``encode`` / ``encode_many`` / ``decode`` take text and token ids only: a Hugging Face
  tokenizer decoded an id past its vocabulary as nothing (the text silently lost a token), a negative
  one raised a bare ``OverflowError`` from the Rust library, ``encode_many("text")`` encoded each
  character as its own text, and ``encode(None)`` / ``encode(b"...")`` raised from inside the library
  (``TextInputSequence must be str``) or Python (``'bytes' object has no attribute 'encode'``); the
  byte tokenizer's ``decode([300])`` raised Python's ``bytes must be in range(0, 256)``, naming no id.
  Each is now one :class:`~innerloop.data.tokenizer.TokenizerError` naming the argument, what was given
  and what is valid.
- ``train_bpe``: a float/str/bool ``vocab_size`` and bytes or non-str texts failed inside the trainer.
- ``atomic_write`` (every file innerloop writes) under a path whose folder is a file: mkdir's error.
- ``load_weights`` called directly: integer weights cast silently into a float model, ``keep_dtype="no"``
  read as true, missing/unexpected keys as load_state_dict's many-line error.
- ``make_problem`` / ``check_update_rule``: yes/no options read by truthiness (``norm="false"`` on).
- ``save_checkpoint``: a meta or sparse tensor failed inside torch, naming neither place nor fix.
- killed writes: ``save_pretrained``'s staging folder and a tokenizer's temporaries were never removed.
"""

from __future__ import annotations

import pytest

from innerloop.data.tokenizer import ByteTokenizer, TokenizerError, byte_level_tokenizer_json


def _hf_tokenizer():
    from innerloop.data.tokenizer import HFTokenizer

    return HFTokenizer(byte_level_tokenizer_json(end_of_text=True), source="the test's tokenizer")


def _tokenizers() -> list:
    return [ByteTokenizer(), _hf_tokenizer()]


@pytest.mark.parametrize("which", ["bytes", "huggingface"])
@pytest.mark.parametrize("bad_id", [257, 10**6, -1])
def test_decode_refuses_an_id_outside_the_vocabulary_naming_it(which, bad_id) -> None:
    tokenizer = _tokenizers()[which == "huggingface"]
    with pytest.raises(TokenizerError, match=rf"ids holds token id {bad_id}.*valid ids are 0\.\.\d+"):
        tokenizer.decode([104, 105, bad_id])


@pytest.mark.parametrize("which", ["bytes", "huggingface"])
@pytest.mark.parametrize("bad", ["hi", 3, None, [1.5], [True]])
def test_decode_refuses_what_is_not_a_sequence_of_token_ids(which, bad) -> None:
    tokenizer = _tokenizers()[which == "huggingface"]
    with pytest.raises(TokenizerError, match="ids must be a sequence of integer token ids"):
        tokenizer.decode(bad)


@pytest.mark.parametrize("which", ["bytes", "huggingface"])
def test_decode_takes_numpy_and_torch_integers(which) -> None:
    import numpy as np
    import torch

    tokenizer = _tokenizers()[which == "huggingface"]
    assert tokenizer.decode(torch.tensor([104, 105])) == "hi"
    assert tokenizer.decode(np.array([104, 105])) == "hi"


@pytest.mark.parametrize("which", ["bytes", "huggingface"])
@pytest.mark.parametrize("bad", [None, b"hi", 3])
def test_encode_refuses_what_is_not_text(which, bad) -> None:
    tokenizer = _tokenizers()[which == "huggingface"]
    with pytest.raises(TokenizerError, match=rf"text must be a str, got {type(bad).__name__}"):
        tokenizer.encode(bad)


def test_encode_many_refuses_one_string_instead_of_a_list_of_texts() -> None:
    tokenizer = _hf_tokenizer()
    with pytest.raises(TokenizerError, match=r"texts must be a sequence of str.*got one str"):
        tokenizer.encode_many("hello")
    with pytest.raises(TokenizerError, match=r"texts\[1\] must be a str, got NoneType"):
        tokenizer.encode_many(["a", None])
    assert tokenizer.encode_many(["hi", ""]) == [[104, 105], []]


# -- train_bpe's arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [300.0, "300", None, True])
def test_train_bpe_refuses_a_vocab_size_that_is_not_an_integer(vocab_size) -> None:
    from innerloop.data.tokenizer import train_bpe

    with pytest.raises(
        TokenizerError, match=rf"vocab_size={vocab_size!r} \({type(vocab_size).__name__}\) must be an integer"
    ):
        train_bpe(["hello world"] * 20, vocab_size)


@pytest.mark.parametrize(
    ("texts", "named"),
    [(b"hello hello", "bytes"), ([b"hello"], r"texts\[0\]"), ([1], r"texts\[0\]"), (None, "NoneType")],
)
def test_train_bpe_refuses_texts_that_are_not_text(texts, named) -> None:
    from innerloop.data.tokenizer import train_bpe

    with pytest.raises(TokenizerError, match=rf"texts.*{named}|{named}.*must be a str"):
        train_bpe(texts, 300)


def test_train_bpe_takes_a_numpy_integer_vocab_size() -> None:
    import numpy as np

    from innerloop.data.tokenizer import train_bpe

    assert train_bpe(["hello world"] * 20, np.int64(260)).vocab_size == 260


# -- atomic writes under a path whose folder is a file ----------------------------------------------------


def test_a_write_under_a_file_names_the_file_in_the_way(tmp_path) -> None:
    from innerloop.checkpoints import save_checkpoint
    from innerloop.data.atomic import atomic_write_text

    blocker = tmp_path / "notes.txt"
    blocker.write_text("the user's notes")
    for write in (lambda p: atomic_write_text(p, "x"), lambda p: save_checkpoint({}, p)):
        with pytest.raises(
            NotADirectoryError, match=rf"cannot write .*'{blocker}' is a file, not a folder"
        ) as err:
            write(blocker / "sub" / "out.safetensors")
        assert len(str(err.value).splitlines()) == 1
    assert blocker.read_text() == "the user's notes"


# -- load_weights checks what it is given, as load_model does before calling it ---------------------------


def _small_lm():
    import torch

    from innerloop.models import build_model

    torch.manual_seed(0)
    return build_model(dict(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8))


@pytest.mark.parametrize("keep_dtype", ["no", 1, None])
def test_load_weights_refuses_a_keep_dtype_that_is_not_a_bool(keep_dtype) -> None:
    import torch

    from innerloop.checkpoints import load_weights

    model = _small_lm()
    bfloat16 = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()
    }
    with pytest.raises(TypeError, match=rf"keep_dtype={keep_dtype!r} .* must be True or False"):
        load_weights(model, bfloat16, keep_dtype=keep_dtype)  # "no" would keep bfloat16: the opposite
    assert next(model.parameters()).dtype == torch.float32


def test_load_weights_refuses_integer_weights_for_floating_ones_in_one_line() -> None:
    import torch

    from innerloop.checkpoints import CheckpointError, load_weights

    model = _small_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    integers = {k: v.round().long() for k, v in model.state_dict().items()}  # silently cast to float before
    with pytest.raises(CheckpointError, match=r"dtype mismatch.*is torch\.int64, expected torch\.float32"):
        load_weights(model, integers)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("change", ["extra", "missing", "shape"])
def test_load_weights_names_missing_unexpected_and_misshapen_weights_in_one_line(change) -> None:
    import torch

    from innerloop.checkpoints import CheckpointError, load_weights

    model = _small_lm()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(iter(weights))
    if change == "extra":
        weights["stray.weight"] = torch.ones(1)
    elif change == "missing":
        del weights[first]
    else:
        weights[first] = torch.ones(3, 3)
    with pytest.raises(CheckpointError, match="does not fit CausalLM") as err:
        load_weights(model, weights)
    assert len(str(err.value).splitlines()) == 1


def test_load_weights_refuses_what_is_not_a_module() -> None:
    from innerloop.checkpoints import load_weights

    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        load_weights("model", _small_lm().state_dict())


# -- innerloop.testing's yes/no options -------------------------------------------------------------------


@pytest.mark.parametrize("option", ["norm", "residual", "decay", "momentum"])
@pytest.mark.parametrize("value", ["false", 0, None])
def test_make_problem_refuses_a_yes_no_option_that_is_not_a_bool(option, value) -> None:
    from innerloop.testing import make_problem

    # "false" built the problem with the option on: a check then tested another case than asked for
    with pytest.raises(TypeError, match=rf"{option}={value!r} .* must be True or False"):
        make_problem("linear", "reconstruction", **{option: value})


@pytest.mark.parametrize("option", ["gradients", "without_grad"])
def test_check_update_rule_refuses_a_yes_no_option_that_is_not_a_bool(option) -> None:
    from innerloop.testing import check_update_rule

    with pytest.raises(TypeError, match=rf"{option}='no' .* must be True or False"):
        check_update_rule("dual_form", **{option: "no"})


# -- save_checkpoint: tensors it cannot store ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda torch: torch.ones(2, device="meta"), "meta"),
        (lambda torch: torch.eye(3).to_sparse(), "sparse_coo"),
        (lambda torch: torch.eye(3).to_sparse_csr(), "sparse_csr"),
    ],
)
# torch notes that the sparse CSR tensor this test builds (to be refused) is a beta feature
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")
def test_save_checkpoint_names_a_tensor_it_cannot_store(tmp_path, make, named) -> None:
    import torch

    from innerloop.checkpoints import save_checkpoint

    path = tmp_path / "c.safetensors"
    with pytest.raises(TypeError, match=rf"cannot store .*{named}.* at checkpoint\['state'\]\['w'\]"):
        save_checkpoint({"state": {"w": make(torch)}}, path)
    assert not path.exists() and list(tmp_path.iterdir()) == []


# -- save_pretrained: the staging folders of a killed save ---------------------------------------------------


def _tiny_hf_model():
    import torch

    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    torch.manual_seed(0)
    model = dict(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8)
    return InnerloopForCausalLM(InnerloopConfig(model=model))


def test_save_pretrained_removes_the_staging_folder_a_killed_save_left_and_keeps_a_live_one(
    tmp_path, monkeypatch
) -> None:
    """A killed save's staging folder goes at the next save; a running save's stays: it holds the folder's
    save lock (s48), so the next save is refused while it runs, and where folders cannot be locked no
    staging folder is removed (s49c: the staging folders' own locks were redundant with the folder's)."""
    import fcntl
    import os

    import innerloop.hf.modeling as modeling

    folder = tmp_path / "saved"
    killed = (
        folder / ".innerloop-saving-k1ll3d00"
    )  # what a save killed mid-write leaves: a copy of the weights
    killed.mkdir(parents=True)
    (killed / "model.safetensors").write_bytes(b"\0" * 1000)
    live = folder / ".innerloop-saving-l1ve0000"  # another process's save, running now (it holds the lock)
    live.mkdir()
    handle = os.open(folder, os.O_RDONLY)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(RuntimeError, match=r"another save into that folder is running"):
            _tiny_hf_model().save_pretrained(folder)
        assert killed.is_dir() and live.is_dir()
    finally:
        os.close(handle)
    with monkeypatch.context() as unlockable:
        unlockable.setattr(modeling, "fcntl", None)  # a platform without flock: nothing is known to be dead
        _tiny_hf_model().save_pretrained(folder)
        assert killed.is_dir() and live.is_dir()
    _tiny_hf_model().save_pretrained(folder)  # their writers gone: both are leftovers
    assert not killed.exists() and not live.exists()
    assert (folder / "model.safetensors").is_file()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".innerloop-saving-")]


def test_saving_a_tokenizer_removes_the_temporaries_a_killed_save_of_it_left(tmp_path) -> None:
    from innerloop.data.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

    left = [tmp_path / f".{TOKENIZER_FILE}.k1ll3d00.tmp", tmp_path / f".{TOKENIZER_CONFIG_FILE}.k1ll3d00.tmp"]
    for path in left:  # what `innerloop tokenizer train` killed inside its atomic writes leaves
        path.write_text("{")
    others = tmp_path / ".notes.txt.k1ll3d00.tmp"  # not a tokenizer file's: left alone
    others.write_text("x")
    ByteTokenizer().save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [others.name, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]
    )


# -- innerloop.data.packing: window sizes --------------------------------------------------------------------


def _three_documents(epoch: int, first: int):
    return iter([(n, [1, 2, 3, 4, 5]) for n in range(first, 3)])


@pytest.mark.parametrize("seq_len", [0, -2, 2.0, True, None])
def test_packed_windows_refuses_a_seq_len_that_is_not_a_positive_integer_when_called(seq_len) -> None:
    from innerloop.data.packing import packed_windows

    # seq_len 0 gave the same one-token window forever, -2 an IndexError, 2.0 a TypeError from a slice
    with pytest.raises(ValueError, match=rf"seq_len must be a positive integer, got {seq_len!r}"):
        packed_windows(_three_documents, seq_len)


@pytest.mark.parametrize(
    ("seq_len", "count", "named"), [(0, 3, "seq_len"), (2, 0, "count"), (2, -1, "count")]
)
def test_validation_windows_refuses_sizes_that_are_not_positive_integers(seq_len, count, named) -> None:
    from innerloop.data.packing import validation_windows

    # count 0 blamed the data ("the validation documents hold fewer than ... tokens"); seq_len 0 gave
    # one-token windows
    with pytest.raises(ValueError, match=rf"{named} must be a positive integer"):
        validation_windows(_three_documents, seq_len, count)


def test_packed_windows_still_packs() -> None:
    import itertools

    from innerloop.data.packing import packed_windows

    windows = [w for w, _ in itertools.islice(packed_windows(_three_documents, 4), 2)]
    assert windows == [[1, 2, 3, 4, 5], [5, 1, 2, 3, 4]]
