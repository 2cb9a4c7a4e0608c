"""Review s49b: training through Lightning, configs, metrics and the CLI (issue 3), with configs and
hostile inputs the issue does not name (report: the session's closing message).

Each test pins a defect the review found (the commit that fixes it names it):

- ``trainer.max_time`` of no time or less (``00:00:00:00``, ``{minutes: -1}``) was taken by the config
  checks; the run then built its model and data, made its ``logs/version_<n>`` folder and stopped
  before its first step with "its trainer.max_time, -60 s over all its launches, is spent", a limit
  no launch can ever meet.
- ``innerloop tokenizer train --overwrite`` (every ``save_pretrained``) replaced ``tokenizer_config.json``
  and then ``tokenizer.json``, each atomically: a write of the second that failed (a full disk, a kill)
  left the folder's previous ``tokenizer.json`` beside the new config, a pair that loads as a tokenizer
  neither run wrote (where the configs differ: another end-of-text token, another class). Now the
  previous ``tokenizer.json`` is removed first where the config changes, so such a cut leaves a folder
  that is no tokenizer (refused by name), never a mixed pair.
"""

from __future__ import annotations

import pytest

import innerloop.data.tokenizer as tokenizer_module
from innerloop.config import ConfigError
from innerloop.config.load import load_config


@pytest.mark.parametrize(
    ("value", "shown"), [("00:00:00:00", "0 s"), ("{minutes: -1}", "-60 s"), ("{seconds: 0}", "0 s")]
)
def test_a_time_limit_of_no_time_is_refused_naming_the_key(tmp_path, value, shown) -> None:
    with pytest.raises(ConfigError, match=rf"trainer.max_time=.* is {shown}: a time limit must be positive"):
        load_config("tiny", [f"trainer.max_time={value}", f"out_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["00:00:01:30", "{days: -1, hours: 25}"])  # the second: one hour
def test_a_positive_time_limit_is_kept(tmp_path, value) -> None:
    run, _ = load_config("tiny", [f"trainer.max_time={value}", f"out_dir={tmp_path / 'run'}"])
    assert run.trainer.lightning["max_time"] in ("00:00:01:30", {"days": -1, "hours": 25})


def test_a_tokenizer_save_cut_between_its_two_files_leaves_no_mixed_pair(tmp_path, monkeypatch) -> None:
    out = tmp_path / "tok"
    previous = tokenizer_module.train_bpe(["the previous tokenizer's text " * 20], 300)
    previous.save_pretrained(out)
    config = out / tokenizer_module.TOKENIZER_CONFIG_FILE  # another program's config of that tokenizer
    config.write_text('{"tokenizer_class": "GPT2TokenizerFast", "eos_token": "<|endoftext|>"}\n')
    new = tokenizer_module.train_bpe(["a new text, other merges " * 20], 280)
    write = tokenizer_module.atomic_write_text

    def full_disk_at_the_tokenizer(path, text):
        if path.name == tokenizer_module.TOKENIZER_FILE:
            raise OSError(28, "No space left on device")
        return write(path, text)

    monkeypatch.setattr(tokenizer_module, "atomic_write_text", full_disk_at_the_tokenizer)
    with pytest.raises(OSError, match="No space"):
        new.save_pretrained(out)
    assert "PreTrainedTokenizerFast" in config.read_text()  # the new config is in place ...
    with pytest.raises(tokenizer_module.TokenizerError, match="tokenizer.json"):  # ... and no old tokenizer
        tokenizer_module.load_tokenizer(str(out))
