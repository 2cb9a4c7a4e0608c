"""Review s19 (L4, L5): an unknown config key suggests the key meant wherever it is in the schema
(a close spelling in its section, or its name in another section), in an override as in a YAML file;
eval says how many windows it scores in words ("2 windows of 16 tokens"); and the CPU-oversubscribed
warning is attributed to innerloop's throughput callback, not to the Lightning file that calls it."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

import innerloop.train.throughput as throughput
from innerloop.config.load import ConfigError, load_config, save_config
from innerloop.models.config import ModelConfig
from innerloop.train.checkpoint import save_checkpoint
from innerloop.train.module import LanguageModelModule
from innerloop.train.run import evaluate


@pytest.mark.parametrize(
    ("override", "key", "suggested"),
    [
        (
            "model.ttt.innerloss=cosine",
            "model.ttt.innerloss",
            "'model.ttt.inner_loss', 'model.ttt.inner_norm', 'model.ttt.inner_model'",
        ),  # a typo in its section: the closest first
        ("model.inner_loss=cosine", "model.inner_loss", "'model.ttt.inner_loss', 'model.e2e.inner_loss'"),
        ("model.innerloss=cosine", "model.innerloss", "'model.ttt.inner_loss', 'model.e2e.inner_loss'"),
        ("data.lr=0.1", "data.lr", "'optim.lr'"),  # any section, any key
        ("model.max_steps=2", "model.max_steps", "'trainer.max_steps'"),
        ("optim.lrr=0.1", "optim.lrr", "'optim.lr'"),
        ("hidden_size=32", "hidden_size", "'model.hidden_size'"),  # a section left out
        ("modle.hidden_size=32", "modle", "'model'"),
    ],
)
def test_an_unknown_override_key_suggests_the_key_meant(override: str, key: str, suggested: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("tiny", [override])
    message = str(caught.value)
    assert message.startswith(f"unknown config key '{key}' in override '{override}'; valid keys here: [")
    assert message.endswith(f"; did you mean {suggested}?")


def test_an_unknown_key_far_from_any_gets_no_suggestion() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("tiny", ["model.ttt.zzz=1"])
    assert "did you mean" not in str(caught.value) and "valid keys here: ['base_lr'" in str(caught.value)


def test_a_yaml_file_gets_the_same_suggestions(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  inner_loss: cosine\n  ttt:\n    mini_batch_size: 4\n")
    with pytest.raises(
        ConfigError, match=r"'model.inner_loss' in file .*did you mean 'model.ttt.inner_loss'"
    ):
        load_config(str(config))
    config.write_text("model:\n  ttt:\n    innerloss: cosine\n")
    with pytest.raises(
        ConfigError, match=r"'model.ttt.innerloss' in file .*did you mean 'model.ttt.inner_loss'"
    ):
        load_config(str(config))


def test_the_model_config_suggests_within_the_model_section() -> None:
    with pytest.raises(
        ValueError, match=r"'model.inner_loss' in the model config.*did you mean 'model.ttt.inner_loss'"
    ):
        ModelConfig.from_dict({"inner_loss": "cosine"})


def _checkpoint(out: Path) -> Path:
    """An untrained tiny run's checkpoint, its config.yaml beside it (as `innerloop train` leaves it)."""
    run, cfg = load_config(
        "tiny",
        ["model.hidden_size=16", "model.num_heads=2", "model.num_layers=1", "model.intermediate_size=32",
         "model.ttt.mini_batch_size=4", "data.seq_len=16", "trainer.num_position_buckets=4", f"out_dir={out}"],
    )  # fmt: skip
    module = LanguageModelModule(model=asdict(run.model), seq_len=16, num_position_buckets=4)
    tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}
    save_config(cfg, out / "config.yaml")
    return save_checkpoint(tree, out / "last.safetensors")


@pytest.mark.slow  # reason: ~1 s: two evaluations of a tiny model through Lightning
def test_eval_says_how_many_windows_in_words(tmp_path, capsys) -> None:
    data = tmp_path / "text.txt"
    data.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(60)))
    checkpoint = _checkpoint(tmp_path)
    for batch_size, words in ((2, "2 windows"), (1, "1 window")):
        capsys.readouterr()
        evaluate(checkpoint, paths=[str(data)], batch_size=batch_size, batches=1, progress_bar=False)
        (line,) = [line for line in capsys.readouterr().out.splitlines() if "tokens from" in line]
        assert line.startswith(f"evaluating {words} of 16 tokens from "), line


def test_the_oversubscribed_warning_points_at_innerloop_not_at_its_caller() -> None:
    """Lightning calls the hook from lightning/pytorch/trainer/call.py; this test calls it from here.
    Either way the warning names innerloop's callback, where the check is."""
    callback = throughput.TrainingThroughput(cpu_status=lambda: (4, 2, 0.0), echo=lambda line: None)
    with pytest.warns(throughput.CPUOversubscribedWarning, match="the CPU looks oversubscribed") as caught:
        callback.on_train_start(SimpleNamespace(is_global_zero=True), None)
    assert len(caught) == 1
    assert Path(caught[0].filename) == Path(throughput.__file__), caught[0].filename


def test_pyprojects_filter_still_matches_the_oversubscribed_warning() -> None:
    """pyproject.toml hides it in the tests by its message (and category): both still match."""
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    (entry,) = re.findall(r'"ignore:([^"]*oversubscribed[^"]*)"', text)
    pattern, category = entry.split(":")
    callback = throughput.TrainingThroughput(cpu_status=lambda: (4, 2, 0.0), echo=lambda line: None)
    with pytest.warns(throughput.CPUOversubscribedWarning) as caught:
        callback.on_train_start(SimpleNamespace(is_global_zero=True), None)
    assert re.match(pattern, str(caught[0].message), re.IGNORECASE)
    assert category == "UserWarning" and issubclass(caught[0].category, UserWarning)


@pytest.mark.parametrize(
    ("override", "suggested"),
    [
        ("trainer.lr=0.1", "'optim.lr'"),
        ("trainer.inner_loss=x", "'model.ttt.inner_loss', 'model.e2e.inner_loss'"),
    ],
)
def test_a_key_of_another_section_under_trainer_is_suggested(override, suggested) -> None:
    with pytest.raises(ConfigError, match=f"did you mean {re.escape(suggested)}\\?"):
        load_config("tiny", [override])


def test_a_trainer_key_that_is_not_a_string_is_an_unknown_key(tmp_path) -> None:
    """YAML `trainer: {1: 2}` crashed with a TypeError while naming the key."""
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  1: 2\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.1'"):
        load_config(str(path))


def test_an_unknown_key_is_not_pointed_at_its_own_section() -> None:
    # 'model.d_model' was answered "did you mean 'model'?": the section the key is in, not a key to set
    with pytest.raises(ConfigError) as caught:
        load_config("tiny", ["model.d_model=64"])
    assert "did you mean 'model'" not in str(caught.value)
    assert "valid keys here: ['backbone'" in str(caught.value)
