"""The command line as a user meets it (fast checks, no training): paths with ``~`` name one folder everywhere,
``--resume`` is checked against the run's own config (not the preset's), relative tokenizer paths are
recorded absolute, ``trainer.min_steps`` is refused, a user's own config.yaml is never a run, a file that
is no tokenizer is one line for ``export``, and the trainer keys' messages name the right key."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from innerloop.cli import _resume_config, main
from innerloop.config.load import ConfigError, config_differences, load_config, read_out_dir
from innerloop.train import LanguageModelModule, save_checkpoint
from innerloop.train.interrupt import TrainingInterrupted, ended_by_signals
from innerloop.train.run import _with_absolute_data_paths
from innerloop.train.run_dir import RunDirError, refuse_foreign_config


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A HOME of its own, so that ``~`` names a folder of the test."""
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    return folder


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# `~` in out_dir (a YAML config or a quoted override) is one folder, everywhere


def test_out_dir_with_a_tilde_is_expanded_once_for_the_whole_run(home, tmp_path) -> None:
    run, cfg = load_config("tiny", ["out_dir=~/runs/x"])
    assert run.out_dir == cfg.out_dir == str(home / "runs" / "x")  # what config.yaml records, too
    config = tmp_path / "my.yaml"
    config.write_text("out_dir: ~/runs/y\n")
    assert load_config(str(config))[0].out_dir == str(home / "runs" / "y")
    # a RunConfig built in Python, given to train(): expanded there
    raw = OmegaConf.to_object(OmegaConf.structured(run))
    raw.out_dir = "~/runs/z"
    expanded, _ = _with_absolute_data_paths(raw, None)
    assert expanded.out_dir == str(home / "runs" / "z")


def test_every_path_argument_of_the_cli_expands_a_tilde(home, capsys) -> None:
    """A quoted '~/x' (or one a script passes) names the home folder, as the checks do."""
    assert main(["eval", "~/missing.safetensors"]) == 2
    assert f"checkpoint {str(home / 'missing.safetensors')!r} does not exist" in _error(capsys)
    assert main(["export", "~/missing.safetensors", "~/out"]) == 2
    assert str(home / "missing.safetensors") in _error(capsys)
    assert not Path("~").exists()  # no folder named `~` in the current directory


def test_an_export_to_a_tilde_folder_writes_the_home_folder(home) -> None:
    from innerloop.hf.export import ExportError, check_target

    (home / "out").mkdir()
    (home / "out" / "mine.txt").write_text("a user's file")
    with pytest.raises(ExportError, match="is not empty"):  # the folder checked is the real one
        check_target("~/out", overwrite=False)


# 2, 3: --resume reads the run's own config.yaml; the preset's values do not concern it


SAVED = """\
out_dir: {out_dir}
optim:
  lr: 0.01
trainer:
  accelerator: {accelerator}
  max_steps: 4
"""


def _saved_run(folder: Path, accelerator: str = "cpu", out_dir: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(SAVED.format(out_dir=out_dir or folder, accelerator=accelerator))
    return folder


def test_resume_overrides_are_checked_against_the_run_not_the_preset(tmp_path) -> None:
    run_dir = _saved_run(tmp_path / "lr")
    # the tiny preset's lr is 0.003: min_lr=0.005 was refused against it, but the run's lr is 0.01
    run, _ = _resume_config(None, [f"out_dir={run_dir}", "optim.min_lr=0.005", "trainer.max_steps=6"])
    assert (run.optim.lr, run.optim.min_lr, run.trainer.max_steps) == (0.01, 0.005, 6)
    with pytest.raises(ConfigError, match=r"optim.min_lr=0.02 must be <= optim.lr=0.01"):
        _resume_config(None, [f"out_dir={run_dir}", "optim.min_lr=0.02"])


def test_resume_of_a_moved_run_or_on_another_machine_uses_the_resumes_settings(tmp_path) -> None:
    # the config.yaml names the old machine's accelerator and out_dir
    run_dir = _saved_run(tmp_path / "moved", accelerator="cuda", out_dir="/nonexistent/old_machine_run")
    run, cfg = _resume_config(None, [f"out_dir={run_dir}", "trainer.accelerator=cpu"])
    assert run.out_dir == cfg.out_dir == str(run_dir)  # the folder it was found in
    assert run.trainer.accelerator == "cpu"


def test_resume_with_a_config_file_that_differs_from_the_run_warns_naming_the_keys(tmp_path, capsys) -> None:
    run_dir = _saved_run(tmp_path / "run")
    mine = tmp_path / "my.yaml"
    mine.write_text(
        f"out_dir: {run_dir}\noptim:\n  lr: 0.01\ntrainer:\n  max_steps: 8\ndata:\n  seq_len: 16\n"
    )
    run, _ = _resume_config(str(mine), [])
    assert run.trainer.max_steps == 4 and run.data.seq_len == 128  # the run's own config
    err = capsys.readouterr().err
    assert "warning: --resume continues the run" in err and "are not used" in err
    assert "data.seq_len (128 -> 16)" in err and "trainer.max_steps (4 -> 8)" in err
    assert "optim.lr" not in err  # the same as the run's
    # the keys the file sets and the run agrees on: no difference
    mine.write_text(f"out_dir: {run_dir}\noptim:\n  lr: 0.01\n")
    assert config_differences(str(mine), [], load_config(str(run_dir / "config.yaml"))[0]) == []
    assert read_out_dir(str(mine), []) == str(run_dir)


# a relative data.tokenizer is recorded absolute


def test_a_relative_tokenizer_is_recorded_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    run, cfg = load_config("tiny", ["data.tokenizer=bytes"])
    run.data.tokenizer = cfg.data.tokenizer = "tok"
    recorded, saved = _with_absolute_data_paths(run, cfg)
    assert recorded.data.tokenizer == saved.data.tokenizer == str(tmp_path / "tok")
    assert run.data.tokenizer == "tok"  # the caller's config is left as it was


# a signal during the final validation is an interruption with the signal's status


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_final_validation_is_an_interruption_with_its_status(signum) -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="stopped at .* during the test") as stopped:
        with ended_by_signals("during the test"):
            # to this thread: os.kill to the process may reach another thread, whose delivery the main
            # thread can see after the block has ended (s42b saw 'DID NOT RAISE' once, under load)
            signal.raise_signal(signum)
            if signum == signal.SIGTERM:  # what Lightning's evaluation loop then raises
                from lightning.pytorch.utilities.exceptions import SIGTERMException

                raise SIGTERMException
    assert stopped.value.exit_code == 128 + signum
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# trainer.min_steps would keep a run from stopping at Ctrl-C or SIGTERM


def test_min_steps_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"trainer.min_steps cannot be set: .*Ctrl-C and SIGTERM"):
        load_config("tiny", ["trainer.min_steps=40"])


# a config.yaml innerloop did not write is never taken for a run, nor removed by --overwrite


def test_a_users_own_config_yaml_is_refused_even_with_overwrite(tmp_path, capsys) -> None:
    (tmp_path / "config.yaml").write_text("my: important project config\n")
    with pytest.raises(RunDirError, match=r"holds a config.yaml that is not an innerloop run's"):
        refuse_foreign_config(tmp_path)
    assert main(["train", f"out_dir={tmp_path}", "--overwrite", "trainer.max_steps=1"]) == 2
    assert "not an innerloop run's" in _error(capsys)
    assert (tmp_path / "config.yaml").read_text() == "my: important project config\n"
    refuse_foreign_config(_saved_run(tmp_path / "a_run"))  # a run's own is not refused here


@pytest.mark.parametrize(
    ("name", "overwrite"), [("loss_by_position.csv", []), ("loss_by_position.png", ["--overwrite"])]
)
def test_a_users_file_named_as_a_run_output_is_refused_not_replaced(
    tmp_path, capsys, name, overwrite
) -> None:
    (tmp_path / name).write_text("user,data\n")
    assert main(["train", f"out_dir={tmp_path}", *overwrite, "trainer.max_steps=1"]) == 2
    assert f"holds {name} but no run" in _error(capsys)
    assert (tmp_path / name).read_text() == "user,data\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".innerloop.lock", name]


# export --tokenizer of a file that is no tokenizer.json


def test_export_of_a_file_that_is_no_tokenizer_is_one_line_naming_the_option(tmp_path, capsys) -> None:
    module = LanguageModelModule(
        model={"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 32}, seq_len=32
    )
    save_checkpoint(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)},
        tmp_path / "m.safetensors",
    )
    text = tmp_path / "a.txt"
    text.write_text("def f(x):\n    return x\n")
    assert (
        main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "hf"), "--tokenizer", str(text)]) == 2
    )
    err = _error(capsys)
    assert f"--tokenizer {str(text)!r}" in err and "valid: 'bytes'" in err
    assert not (tmp_path / "hf").exists()


# the trainer keys' messages


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_step=10"], r"did you mean 'max_steps', 'max_time'"),  # max_steps once
        (
            ["trainer.lightning.foo=1"],
            r"unknown config key 'trainer.lightning.foo' in override 'trainer.lightning",
        ),
    ],
)
def test_trainer_key_messages_name_the_key_once_and_where(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_two_spellings_of_one_lightning_argument_in_one_file_are_refused(tmp_path) -> None:
    config = tmp_path / "two.yaml"
    config.write_text(
        "trainer:\n  lightning:\n    accumulate_grad_batches: 2\n  accumulate_grad_batches: 3\n"
    )
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches=3 and trainer.lightning"):
        load_config(str(config))


def test_an_empty_data_entry_and_a_dangling_out_dir_link_are_named(tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match=r"data.paths entry '' is empty"):
        load_config("tiny", ["data.paths=['']", f"out_dir={tmp_path / 'run'}"])
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(
        ConfigError, match=r"out_dir=.*dangling' is a symbolic link to .*gone', which does not exist"
    ):
        load_config("tiny", [f"out_dir={tmp_path / 'dangling'}"])


def test_ctrl_c_outside_training_is_one_line_and_the_shells_status(monkeypatch, capsys) -> None:
    import innerloop.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli._HANDLERS, "params", interrupted)
    assert main(["params"]) == 130
    assert "innerloop params: interrupted (Ctrl-C)" in _error(capsys)


def test_a_run_refused_before_it_writes_leaves_no_out_dir_behind(tmp_path, capsys) -> None:
    """A trainer value Lightning refuses is found once the lock is taken: the folder the run made for it
    is removed with its lock (it stayed, holding only .innerloop.lock); a folder that existed stays."""
    out = tmp_path / "new" / "run"
    assert main(["train", f"out_dir={out}", "trainer.lightning.max_time=abc"]) == 2
    assert "trainer.max_time='abc' is not a time limit: give DD:HH:MM:SS" in _error(capsys)  # at load (s52q)
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(["train", f"out_dir={existing}", "trainer.lightning.max_time=abc"]) == 2
    assert existing.is_dir()
