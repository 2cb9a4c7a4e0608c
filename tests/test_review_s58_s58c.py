"""Review s58c: loose ends of session 57, each closed for its whole kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from innerloop.interop import ttt_lm_pytorch
from innerloop.models import ModelConfig

CONFIG = ModelConfig(hidden_size=16, num_heads=2, num_layers=1, intermediate_size=16, vocab_size=32)
REFERENCE = Path(__file__).parent / "data" / "models" / "ttt_linear_transformer"


def test_a_name_merely_containing_orig_mod_is_not_a_compiled_one(monkeypatch):
    """The Lightning module's state-dict hook took any name containing ``_orig_mod`` (``my_orig_mod_x``)
    for a compiled one and rebuilt its state dict, where every other reader splits a name's segments."""
    from innerloop.core.compiled import is_compiled_name, plain_names
    from innerloop.train import LanguageModelModule
    from innerloop.train import module as module_file

    assert not is_compiled_name("my_orig_mod_x.weight") and is_compiled_name("a._orig_mod.w")
    assert list(plain_names({"my_orig_mod_x.weight": 1, "_orig_mod.w": 2})) == ["my_orig_mod_x.weight", "w"]
    module = LanguageModelModule(CONFIG)
    module.my_orig_mod_x = torch.nn.Linear(1, 1)

    def refuse(*_: object) -> None:
        raise AssertionError("a plain name was read as a compiled one")

    monkeypatch.setattr(module_file, "plain_names", refuse)
    assert "my_orig_mod_x.weight" in module.state_dict()


def _compiled(state_dict: dict[str, torch.Tensor], where: str = "") -> dict[str, torch.Tensor]:
    """``state_dict`` named as torch.compile's wrapper of the module (or of its part ``where``) names it."""
    return {
        (f"_orig_mod.{key}" if not where else key.replace(where, f"{where}_orig_mod.", 1)): value
        for key, value in state_dict.items()
    }


def test_the_reference_converter_reads_a_compiled_reference_state_dict():
    """``torch.compile(reference).state_dict()`` (``_orig_mod.`` names) was refused with missing and
    unexpected keys by the reference-code converter, which every other loader reads."""
    weights = load_file(str(REFERENCE / "model.safetensors"))
    config = json.loads((REFERENCE / "config.json").read_text())
    plain_layer = ttt_lm_pytorch.layer_state_dict(weights, 0)
    block = "model.layers.0."
    for compiled in (_compiled(weights), _compiled(weights, block)):  # the whole model, or one block
        layer = ttt_lm_pytorch.layer_state_dict(compiled, 0)
        assert layer.keys() == plain_layer.keys()
    expected = ttt_lm_pytorch.load_layer(config, plain_layer).state_dict()
    got = ttt_lm_pytorch.load_layer(config, _compiled(plain_layer)).state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    model = ttt_lm_pytorch.CausalLM(ttt_lm_pytorch.model_config(config))
    tied = model.config.tie_embeddings
    plain = ttt_lm_pytorch.convert_model_state_dict(weights, model.state_dict(), tied)
    converted = ttt_lm_pytorch.convert_model_state_dict(_compiled(weights), model.state_dict(), tied)
    assert converted.keys() == plain.keys() and all(torch.equal(converted[k], plain[k]) for k in plain)
    with pytest.raises(ValueError, match="both with and without torch.compile's '_orig_mod'"):
        ttt_lm_pytorch.convert_state_dict({**plain_layer, **_compiled(plain_layer)})


def test_a_pending_only_run_folder_read_from_python_is_told_the_python_calls(tmp_path):
    """load_checkpoint / load_model / load_from_checkpoint of a run folder holding only its unconfirmed
    checkpoint told a Python caller to type `innerloop train --resume ...`, and that the resume goes on
    'if it is whole' (which no caller can judge); they now give the Python calls and what the resume checks."""
    from innerloop.checkpoints import CheckpointError, load_checkpoint, load_model
    from innerloop.data.text import PENDING_CHECKPOINT
    from innerloop.train import LanguageModelModule

    folder = tmp_path / "run #2"
    folder.mkdir()
    (folder / PENDING_CHECKPOINT).write_bytes(b"not judged here")
    config = str(folder / "config.yaml")
    resume = f"`train(*load_config({config!r}, [], out_dir={str(folder)!r}), resume=True)`"
    for load in (load_checkpoint, load_model, LanguageModelModule.load_from_checkpoint):
        with pytest.raises(CheckpointError) as caught:
            load(folder)
        message = str(caught.value)
        assert resume in message and f"`train(*load_config({config!r}, out_dir='<a new folder>'))`" in message
        assert "innerloop train" not in message and "if it is whole" not in message, message
        assert "after checking it (its checksum, and finite weights)" in message, message


@pytest.mark.slow  # two untrained models scored at two lengths (seconds)
def test_compare_warns_of_the_split_fallback_once_for_all_lengths(tmp_path, caplog):
    """``compare`` at several lengths of a folder whose split by file hash held out its last file logged
    the same fallback warning once per length: one cause, said as often as there were lengths."""
    from lm_testing import untrained_run

    from innerloop.data.text import split_by_file, split_keys
    from innerloop.train.compare import compare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("b.txt", "c.txt"):
        (corpus / name).write_text("the quick brown fox jumps over the lazy dog. " * 10)
    keys = split_keys([str(corpus)])
    assert split_by_file(sorted(keys), 0.1, keys)[1] == []  # the premise: the hash holds out neither
    (tmp_path / "run").mkdir()
    run = untrained_run(tmp_path / "run", corpus, "ttt", 0, 8, 2, 1)
    compare([run, run], seq_lens=[4, 8, 16], batches=1)
    said = [r.getMessage() for r in caplog.records if "is held out instead" in r.getMessage()]
    assert len(said) == 1 and "validation text: the split by file hash" in said[0], said


@pytest.mark.slow  # an untrained run written and its validation text read (seconds)
def test_a_runs_text_too_short_for_a_window_is_not_said_to_be_unreadable(tmp_path):
    """``evaluate(checkpoint, seq_len=500)`` of a run whose validation text holds 181 bytes said the run's
    data "cannot be read" (the wording of a failed read); it now names the length given and needed."""
    from lm_testing import untrained_run

    from innerloop.data.text import TextTooShortError
    from innerloop.train import evaluate

    text = tmp_path / "b.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    (tmp_path / "run").mkdir()
    run = untrained_run(tmp_path / "run", text, "ttt", 0, 16, 2, 1)
    with pytest.raises(TextTooShortError) as caught:
        evaluate(run / "last.safetensors", seq_len=500)
    message = str(caught.value)
    assert "cannot be read" not in message, message
    assert message.startswith("the run's validation text (data.* of ") and (
        caught.value.length,
        caught.value.needed,
    ) == (181, 501)
    assert message.endswith(
        "has 181 bytes (end-of-text separators included), too few for one window of seq_len=500, which "
        "needs 501; give a shorter seq_len, or other text (paths=FILES)"
    ), message


def test_a_users_own_data_module_names_the_arguments_given_not_config_keys(tmp_path):
    """TextDataModule(seq_len=..., val_fraction=..., test_fraction=...) built by a user for their own
    Trainer said 'fewer than data.seq_len + 1' and 'data.val_fraction=0.6 + data.test_fraction=0.5', keys
    of a run config they never wrote; the one innerloop builds from a config keeps the keys."""
    from innerloop.config.load import building_from_a_config
    from innerloop.data.text import DataError, TextTooShortError
    from innerloop.train import TextDataModule

    text = tmp_path / "a.txt"
    text.write_text("x" * 100)
    with pytest.raises(
        DataError, match=r"^val_fraction=0\.6 \+ test_fraction=0\.5 = 1\.1 leaves no training"
    ):
        TextDataModule(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(TextTooShortError) as caught:
        TextDataModule(paths=[str(text)], seq_len=95).setup()
    assert str(caught.value) == (
        "the training text has 90 bytes, fewer than seq_len + 1 = 96; give more text (paths) or a shorter seq_len"
    ) and (caught.value.length, caught.value.needed) == (90, 96)
    with building_from_a_config(), pytest.raises(TextTooShortError, match=r"a shorter data\.seq_len$"):
        TextDataModule(paths=[str(text)], seq_len=95).setup()


def test_a_users_own_module_that_diverges_names_its_arguments_not_config_keys():
    """LanguageModelModule(lr=...) in a user's own Trainer that diverged was told to 'try a lower optim.lr
    ... (optim.grad_clip ...) (optim.warmup_fraction ...)': a config's keys; built by innerloop's run
    (build_module), it keeps them."""
    from innerloop.config.load import building_from_a_config
    from innerloop.train import LanguageModelModule

    own = LanguageModelModule(CONFIG, lr=0.01, warmup_steps=7)
    with building_from_a_config():
        configured = LanguageModelModule(CONFIG, lr=0.01, warmup_steps=7)
    said = []
    for module in (own, configured):
        module._last_finite_loss = (3, torch.tensor(2.0))
        said.append(str(module.diverged("the training loss is nan")))
    assert said[0].endswith(
        "try a lower lr (now 0.01; min_lr may not exceed it), gradient clipping (the Trainer's "
        "gradient_clip_val, now off) or a longer warm-up (warmup_steps, now 7 steps)"
    ), said[0]
    assert said[1].endswith(
        "try a lower optim.lr (now 0.01; optim.min_lr may not exceed it), gradient clipping (optim.grad_clip, "
        "now off) or a longer warm-up (optim.warmup_fraction, now 7 steps)"
    ), said[1]


def test_a_users_own_module_resumed_with_another_schedule_names_its_arguments(caplog):
    """The warning of a learning-rate jump at a resume (a user's Trainer resuming with ckpt_path into a
    module built with another lr) named "this config's optim.schedule=..., optim.lr=... and
    trainer.max_steps=...", a config the user never wrote."""
    from types import SimpleNamespace

    from innerloop.config.load import building_from_a_config
    from innerloop.train import LanguageModelModule

    own = LanguageModelModule(CONFIG, lr=0.01, max_steps=50)
    with building_from_a_config():
        configured = LanguageModelModule(CONFIG, lr=0.01, max_steps=50)
    for module in (own, configured):
        module._trainer = SimpleNamespace(is_global_zero=True)
        module._warn_of_a_learning_rate_jump(5, 0.001, 0.002)
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 2 and "the module's schedule=cosine, lr=0.01 and max_steps=50 define" in said[0], said
    assert "this config's optim.schedule=cosine, optim.lr=0.01 and trainer.max_steps=50 define" in said[1], (
        said
    )


def test_a_pickled_lightning_checkpoint_is_refused_saying_how_to_convert_it(tmp_path):
    """A Lightning ``.ckpt`` pickled by a user's own Trainer (one with ``model._orig_mod.`` weights of a model
    compiled before bdcf72de among them) given to innerloop's readers (``innerloop eval``, ``load_model``)
    was refused as 'not a readable innerloop checkpoint ...: header too large', saying neither what it is
    nor how to read it (load_from_checkpoint does, then save_model_checkpoint)."""
    from innerloop.checkpoints import CheckpointError, load_checkpoint
    from innerloop.train import LanguageModelModule

    module = LanguageModelModule(CONFIG)
    state = {"model._orig_mod." + key: value for key, value in module.model.state_dict().items()}
    import lightning as L

    tree = {
        "state_dict": state,
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": L.__version__,
    }
    torch.save(tree, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path / "old.ckpt")
    message = str(caught.value)
    assert "is not a readable innerloop checkpoint" in message and "it is a pickled file" in message, message
    assert message.endswith(
        "module = LanguageModelModule.load_from_checkpoint(path), then save_model_checkpoint(module.model, "
        "'model.safetensors')"
    ), message
    loaded = LanguageModelModule.load_from_checkpoint(tmp_path / "old.ckpt")  # the way it names
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    (tmp_path / "text.ckpt").write_text("not a checkpoint at all\n" * 4)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path / "text.ckpt")
    assert "it is a pickled file" not in str(caught.value)
