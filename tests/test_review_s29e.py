"""Review s29e: a user's TTT-E2E journey (convert the official checkpoint, generate, eval, export and
reload it, train, interrupt and resume) and the wrong inputs such a user gives. Each test is one
finding (the commit that fixes it names it)."""

from __future__ import annotations

import pytest
import torch

from innerloop.cli import main
from innerloop.core.functional import chunk_mean_cross_entropy
from innerloop.models import E2EConfig, ModelConfig, build_model


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("command", ["eval", "generate", "export"])
def test_an_orbax_checkpoint_given_to_a_command_names_convert(tmp_path, capsys, command) -> None:
    """An official orbax checkpoint (``.../checkpoint`` or ``.../checkpoint/<step>``) was answered
    'is a directory; give the checkpoint file in it (e.g. '.../last.safetensors')', a file that is not
    there: the error says what the folder is and that ``innerloop convert ttt-e2e`` reads it."""
    step = tmp_path / "checkpoint" / "0"
    (step / "model_weights").mkdir(parents=True)
    (step / "_CHECKPOINT_METADATA").write_text("{}")
    for folder in (step, step.parent):
        extra = [str(tmp_path / "out")] if command == "export" else []
        assert main([command, str(folder), *extra]) == 2
        line = _error_line(capsys)
        assert repr(str(folder)) in line and "orbax" in line and "innerloop convert ttt-e2e" in line
        assert "last.safetensors" in line and f"{folder}/last.safetensors" not in line


@pytest.mark.parametrize("command", ["eval", "generate", "export"])
def test_a_hugging_face_folder_given_to_a_command_is_named(tmp_path, capsys, command) -> None:
    """An export's folder (``config.json``, ``model.safetensors``) was answered with a suggestion of
    '<folder>/last.safetensors', which an export does not hold."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    extra = [str(tmp_path / "out")] if command == "export" else []
    assert main([command, str(tmp_path / "hf"), *extra]) == 2
    line = _error_line(capsys)
    assert "Hugging Face folder" in line and "from_pretrained" in line
    assert f"{tmp_path / 'hf'}/last.safetensors" not in line


@pytest.mark.parametrize(
    ("piece", "error", "says"),
    [
        (torch.arange(5), ValueError, "pieces[1] must be [batch, length], got shape (5,)"),
        ([[1, 2, 3]], TypeError, "pieces[1] must be a torch.Tensor of token ids [batch, length], got list"),
        (torch.ones(1, 3), TypeError, "pieces[1] must hold integer token ids"),
    ],
)
def test_stream_losses_names_a_malformed_piece(piece, error, says) -> None:
    """``E2ELM.stream_losses`` read ``piece.shape[1]`` before any check: a 1-D piece gave IndexError
    'tuple index out of range', a list AttributeError; ``model(ids)`` names the same mistakes."""
    model = build_model(
        ModelConfig(mixer="e2e", window=8, hidden_size=16, num_heads=2, e2e=E2EConfig(chunk_size=4))
    )
    with pytest.raises(error) as caught:
        list(model.stream_losses([torch.zeros(1, 3, dtype=torch.long), piece]))
    assert says in str(caught.value)


def test_chunk_mean_loss_of_a_sequence_shorter_than_a_chunk_allocates_the_sequence_only() -> None:
    """``chunk_mean_cross_entropy`` padded the per-token losses to a whole chunk, so its memory grew with
    ``chunk_size`` rather than the sequence: ``innerloop train --config e2e-tiny
    model.e2e.chunk_size=99999999999`` (a typo) ended in a traceback from ``F.pad`` trying to allocate
    3.2 TB, after the one-chunk warning. A sequence within one chunk is one chunk, whatever its size."""
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    targets[0, 1] = -100
    expected = chunk_mean_cross_entropy(logits, targets, 5, -100)
    assert torch.equal(chunk_mean_cross_entropy(logits, targets, 10**12, -100), expected)
    assert torch.equal(
        chunk_mean_cross_entropy(logits[:, :0], targets[:, :0], 10**12, -100), torch.tensor(0.0)
    )


@pytest.mark.parametrize(
    ("made_with", "run_with"), [("next_token", "within_chunk"), ("within_chunk", "next_token")]
)
def test_a_state_is_refused_by_a_model_of_other_chunk_targets(made_with, run_with) -> None:
    """A state carries its chunks' training under ``chunk_targets`` (with ``next_token`` a full chunk
    waits in it for its next token; with ``within_chunk`` it has trained). Continued under the other
    value (the option set on the model between calls, or another model's state) it ran silently,
    giving logits 0.14 from the ``within_chunk`` forward and 0.42 from the ``next_token`` one (float64):
    neither. A state of another ``chunk_size`` or ``rope_positions`` was already refused, naming it."""
    torch.manual_seed(0)
    config = ModelConfig(mixer="e2e", window=8, hidden_size=16, num_heads=2, e2e=E2EConfig(chunk_size=4))
    model = build_model(config).eval()
    ids = torch.randint(0, 256, (1, 8))
    model.config.e2e.chunk_targets = made_with
    with torch.no_grad():
        _, state = model(ids)
        model.config.e2e.chunk_targets = run_with
        with pytest.raises(ValueError, match=f"chunk_targets={made_with!r}, this one has {run_with!r}"):
            model(ids, state)
        model.config.e2e.chunk_targets = made_with
        model(ids, state)  # its own value runs
