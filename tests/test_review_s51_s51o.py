"""Review s51o: the ``overwrite`` set-aside state machine, resumes from Python, metrics.csv's writes."""

from __future__ import annotations

import pytest
from lm_testing import TINY

from innerloop.config import load_config
from innerloop.config.load import save_config
from innerloop.train import run_dir, train


@pytest.mark.slow  # ~0.6 s (loaded machine): two configs built and saved, a resume refused
def test_a_python_resume_after_a_killed_overwrite_does_not_take_the_killed_launchs_config(tmp_path) -> None:
    """An ``overwrite=True`` launch killed before its first checkpoint leaves the previous run set aside
    and its own config.yaml in place. The command line's ``--resume`` settles that before it reads the
    config; the Python continuing call, ``train(*load_config('<out_dir>/config.yaml'), resume=True)``,
    read the killed launch's config, ``train`` then put the previous run back and continued its
    checkpoint with the killed launch's optim.* / trainer.* (which a resume may change), and wrote that
    config over the previous run's: silently another run than either."""
    out = tmp_path / "run"
    old_run, old_cfg = load_config("tiny", [*TINY, "optim.lr=0.001", f"out_dir={out}"])
    out.mkdir()
    save_config(old_cfg, out / "config.yaml")
    (out / "last.safetensors").write_bytes(b"the previous run's weights")
    previous = (out / "config.yaml").read_text()
    run_dir.set_aside_previous_run(out)  # the overwrite launch, killed after writing its config.yaml
    _, killed_cfg = load_config("tiny", [*TINY, "optim.lr=0.5", f"out_dir={out}"])
    save_config(killed_cfg, out / "config.yaml")
    run, cfg = load_config(str(out / "config.yaml"), [], out_dir=str(out))  # the continuing call
    with pytest.raises(run_dir.RunDirError, match=r"killed before its first checkpoint.*load_config\("):
        train(run, cfg, resume=True)
    assert (out / "config.yaml").read_text() == previous  # the previous run, back as it was
    assert (out / "last.safetensors").read_bytes() == b"the previous run's weights"
    assert not list(out.glob(".replaced.*"))


@pytest.mark.parametrize(
    "folder", ["runs/${oops}", "runs/${oc.env:HOME}", "runs/a\\${x}", 'runs/it\'s "q" #2']
)
def test_a_python_built_run_with_a_literal_interpolation_saves_a_config_that_reads_back(
    tmp_path, folder
) -> None:
    """save_config of a RunConfig built in Python (``train(run)`` without ``cfg`` saves it so) took a ``${``
    in its strings for an interpolation: ``runs/${oops}`` raised OmegaConf's bare InterpolationKeyError
    as the run began, and ``runs/${oc.env:HOME}`` was saved as the home folder, another out_dir. The
    continuing call a message gives, ``load_config('<out_dir>/config.yaml', [], out_dir=...)``, now reads
    back the run that was saved."""
    import dataclasses

    from innerloop.train.run import continuing_call

    out = tmp_path / folder
    run, _ = load_config("tiny", [*TINY, "optim.lr=3e-4"])
    run = dataclasses.replace(run, out_dir=str(out))
    out.mkdir(parents=True)
    save_config(run, out / "config.yaml")
    assert "load_config(" in continuing_call(out)
    assert load_config(str(out / "config.yaml"), [], out_dir=str(out))[0] == run
    assert load_config(str(out / "config.yaml"))[0].out_dir == str(out)  # as saved, not another folder


def test_a_command_line_out_dir_with_an_escaped_interpolation_saves_a_config_that_reads_back(
    tmp_path,
) -> None:
    """``out_dir=runs/\\${x}`` on the command line is the folder ``runs/${x}``; its config.yaml said
    ``out_dir: runs/${x}``, which load_config read as an interpolation and refused (``--resume`` of that
    run: 'Interpolation key 'x' not found'), though the resume command a message gives quotes it right."""
    run, cfg = load_config("tiny", [*TINY, f"out_dir={tmp_path}/runs/\\${{x}}"])
    assert run.out_dir == f"{tmp_path}/runs/${{x}}"
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml"))[0] == run


def test_a_metrics_csv_flush_appends_its_rows_instead_of_rewriting_the_file(tmp_path, monkeypatch) -> None:
    """s51h made each flush of metrics.csv (every 100 logged steps) rewrite the whole file atomically:
    the cost grows with the run (measured 0.25 s a flush at 100,000 rows, 35 MB; a million-step run at
    trainer.log_every=1 would rewrite ~1.7 TB in 10,000 flushes). A flush with no new column appends its
    rows to the file in place (as Lightning does), and a write that fails partway (a full disk) cuts the
    file back to the rows before it: no torn row either way."""
    from innerloop.train import loggers

    writer = loggers._AtomicExperimentWriter(log_dir=str(tmp_path))
    writer.log_metrics({"train_loss": 2.0}, step=0)
    writer.save()
    path = tmp_path / "metrics.csv"
    inode, before = path.stat().st_ino, path.read_bytes()
    writer.log_metrics({"train_loss": 1.5}, step=1)
    writer.save()
    assert path.stat().st_ino == inode  # appended in place, not replaced
    assert path.read_bytes() == before + b"1,1.5\r\n"
    whole = path.read_bytes()
    writer.log_metrics({"train_loss": 1.23456789}, step=2)
    real_write = loggers.os.write

    def disk_full_partway(fd, data):
        real_write(fd, data[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loggers.os, "write", disk_full_partway)
    with pytest.raises(OSError, match="No space left"):
        writer.save()
    assert path.read_bytes() == whole


def test_a_torn_last_metrics_row_a_killed_flush_left_is_cut_at_the_next_launch(tmp_path) -> None:
    """A kill during a flush's append leaves part of a row; the next launch cuts the file back to its
    last whole row (a number cut short reads as another number)."""
    logs = tmp_path / "logs" / "version_0"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_bytes(b"train_loss,step\r\n2.0,0\r\n1.2")
    run_dir.remove_stale_temporaries(tmp_path)
    assert (logs / "metrics.csv").read_bytes() == b"train_loss,step\r\n2.0,0\r\n"
