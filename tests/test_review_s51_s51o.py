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
