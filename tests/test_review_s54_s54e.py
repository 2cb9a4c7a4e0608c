"""Regression tests of review 54's helper s54e, the data pipeline under hostile input (each seen failing
before its fix)."""

from __future__ import annotations

import logging
from pathlib import Path

from innerloop.data.tokenizer import HFTokenizer, byte_level_tokenizer_json
from innerloop.train.data import TextDataModule


def _byte_level_tokenizer() -> HFTokenizer:
    """A Hugging Face tokenizer of the 256 bytes and an end-of-text token (id 256)."""
    return HFTokenizer(byte_level_tokenizer_json(end_of_text=True))


def test_too_few_validation_windows_of_a_tokenizer_run_are_counted_in_tokens(tmp_path: Path, caplog) -> None:
    """The warning that the validation text holds fewer windows than batches x batch size said "(251
    bytes)" of a run whose data.tokenizer counts tokens (make_val_examples passed no unit; the test
    text's and an evaluation's did). It now says tokens, and names the validation text."""
    (tmp_path / "a.txt").write_text("ab cd" * 100)
    module = TextDataModule(
        [str(tmp_path / "a.txt")],
        seq_len=4,
        batch_size=64,
        val_fraction=0.5,
        tokenizer=_byte_level_tokenizer(),
    )
    module.setup()
    with caplog.at_level(logging.WARNING, logger="innerloop.train.data"):
        inputs, _ = module.make_val_examples()
    assert inputs.shape == (62, 4)  # 251 tokens: (251 - 1) // 4 windows
    (message,) = [r.getMessage() for r in caplog.records if "windows of" in r.getMessage()]
    assert "(251 tokens)" in message and "bytes" not in message
    assert message.startswith("the validation text holds 62 windows")
