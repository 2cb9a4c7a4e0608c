"""Review s53p: tests that kill mutants of s53d's audit which survived the suite.

Each test names the mutant it kills (seen killing it on a clean copy of the repository).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from innerloop.checkpoints import (
    CheckpointError,
    check_state_dict,
    load_checkpoint,
    save_checkpoint,
    stored_dtypes,
)
from innerloop.data.text import (
    DataError,
    check_test_length,
    check_text_lengths,
    split_by_file,
    split_keys,
    split_text_files,
)
from innerloop.train.metrics import InnerLossDiagnostics, LossByPosition

sys.path.insert(0, str(Path(__file__).parent / "hf"))
from hf_testing import tiny_hf_model  # noqa: E402


def _left_padded_batch() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Two prompts, one of 5 tokens and one of 2 left-padded with 3 zeros: ids, mask, each row alone."""
    rows = [torch.tensor([5, 9, 2, 7, 3]), torch.tensor([8, 4])]
    ids = torch.stack([rows[0], torch.cat([torch.zeros(3, dtype=torch.long), rows[1]])])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    return ids, mask, rows


@pytest.mark.slow  # about 0.5 s: five forwards of a float64 model (the first also loads transformers)
def test_a_left_padded_cache_continued_twice_with_the_whole_mask_gives_each_rows_own_logits() -> None:
    """Mutants ``padding_zeroed`` reading the mask's first columns (the new token of a padded row read as
    0) and ``LeftPaddedCache.seq_length`` counting the last piece alone (the second continuation skipped
    the row's new token as a pad): both passed every test. In float64, each row's logits of two new tokens
    read one at a time with the whole sequence's mask are the row's logits read alone."""
    model = tiny_hf_model("attention").double()
    ids, mask, rows = _left_padded_batch()
    new = torch.tensor([[6, 1], [7, 2]])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache, logits = out.past_key_values, []
        for step in range(new.shape[1]):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            out = model(new[:, step : step + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[:, -1])
        assert cache.seq_length == ids.shape[1] + new.shape[1]
        for row, tokens in enumerate(rows):
            alone = model(torch.cat([tokens, new[row]])[None], use_cache=False).logits[0, -new.shape[1] :]
            torch.testing.assert_close(torch.stack([step[row] for step in logits]), alone)


@pytest.mark.slow  # two generate() calls, about 0.4 s
def test_a_cache_made_by_hand_keeps_no_fingerprint_after_a_continuation() -> None:
    """Mutant ``_cache_after`` keeping the fingerprint of the new tokens alone after a cache without one
    (made by hand from a state): ``generate()`` then compared the whole prompt with the hash of the last
    piece and refused the cache as not continuing its prompt. It passed every test."""
    from innerloop.hf.modeling import InnerloopCache

    model = tiny_hf_model("attention").double()
    ids = torch.tensor([[5, 9, 2, 7, 3, 8]])
    with torch.no_grad():
        state = model(ids[:, :4], use_cache=True).past_key_values.state
        continued = model(ids[:, 4:5], past_key_values=InnerloopCache(state, 4), use_cache=True)
        assert continued.past_key_values.fingerprint is None
        tokens = model.generate(ids, cache=continued.past_key_values, max_new_tokens=2, do_sample=False)
        assert torch.equal(tokens, model.generate(ids, max_new_tokens=2, do_sample=False))


def test_a_non_model_tensor_read_in_another_shape_from_the_same_bytes_is_reported_as_corruption(
    tmp_path,
) -> None:
    """Mutant ``checkpoint_digest`` leaving the shape out: an optimizer state (no model checks its shape)
    written back as ``[6, 4]`` from the bytes of ``[4, 6]``, the checksum left as it was, must be refused
    as corrupt. The digest has hashed each tensor's dtype and shape since checksums came (format version
    2), so no file written with one loses its check."""
    moment = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    path = save_checkpoint(
        {"optimizer_states": [{"state": {0: {"exp_avg": moment}}}], "global_step": 3},
        tmp_path / "c.safetensors",
    )
    assert torch.equal(load_checkpoint(path)["optimizer_states"][0]["state"][0]["exp_avg"], moment)
    with safe_open(str(path), framework="pt") as file:
        metadata, tensors = dict(file.metadata()), {key: file.get_tensor(key) for key in file.keys()}
    (key,) = tensors
    save_file({key: tensors[key].reshape(6, 4)}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="is corrupt: its checksum"):
        load_checkpoint(path)


def test_a_tie_between_stored_dtypes_names_the_weight_not_in_the_models_dtype() -> None:
    """Mutant ``stored_dtypes`` without its tie-break (the first dtype seen wins a tie): with one weight
    stored in bfloat16 and one in float32 for a float32 model, the bfloat16 one is the odd one, whatever
    the order of the keys; the mutant named the float32 weight as the wrong one. It passed every test."""
    built = {"a": torch.zeros(2), "b": torch.zeros(2)}
    stored = {"a": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(2)}
    assert stored_dtypes(built, stored) == {torch.float32: torch.float32}
    with pytest.raises(
        CheckpointError, match=r"'a' is torch.bfloat16, expected torch.float32 like its other"
    ):
        check_state_dict(built, stored, "c.safetensors")


def test_a_file_named_by_two_entries_keeps_the_first_entrys_key(tmp_path) -> None:
    """Mutant ``split_keys`` letting the last entry's key win (the docstring: the first one's): a file
    named by itself and then through a link to it would hash under the link's name and could change
    sides between training and validation when a link is added. It passed every test."""
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "a.txt")
    entries = [str(tmp_path / "a.txt"), str(tmp_path / "link.txt")]
    assert split_keys(entries) == {(tmp_path / "a.txt").resolve(): "a.txt"}
    assert split_keys(entries[::-1]) == {(tmp_path / "a.txt").resolve(): "link.txt"}


def test_two_files_both_hashed_into_validation_still_leave_one_for_training() -> None:
    """Mutant ``split_text_files`` falling back to holding out the last file only when validation is
    empty (not when training is): two files both hashed into validation left no training text. It passed
    every test (narrowed to the data tests)."""
    names = (Path(f"f{number}.txt") for number in range(1000))
    in_validation = [path for path in names if split_by_file([path], 0.5)[1]][:2]
    train, val = split_text_files(in_validation, 0.5)
    assert (train, val) == ([in_validation[0]], [in_validation[1]])


def test_test_text_of_exactly_one_window_is_enough() -> None:
    """Mutant ``check_test_length`` with ``>`` for ``>=``: a test text of exactly ``seq_len + 1`` tokens
    (one window) was refused. It passed every test (narrowed to the data tests)."""
    check_test_length(9, num_files=1, seq_len=8, test_fraction=0.1)
    with pytest.raises(DataError, match="test_fraction"):
        check_test_length(8, num_files=1, seq_len=8, test_fraction=0.1)


def test_training_text_of_exactly_one_window_is_enough() -> None:
    """Mutant ``check_text_lengths`` with ``<=`` for ``<``: a training text of exactly ``seq_len + 1``
    tokens (one window) was refused. It passed every test (narrowed to the data tests)."""
    check_text_lengths(9, 9, num_files=1, seq_len=8, val_fraction=0.1)
    with pytest.raises(DataError, match="the training text has 8 bytes"):
        check_text_lengths(8, 9, num_files=1, seq_len=8, val_fraction=0.1)


def test_inner_loss_diagnostics_means_keep_before_and_after_apart() -> None:
    """Mutant ``InnerLossDiagnostics.means`` returning the mean before the update as "after" (what a
    float64 model's validation logs): it passed every test."""
    metric = InnerLossDiagnostics(num_layers=1)
    metric.update(0, torch.tensor([1.0, 3.0]), torch.tensor([0.5, 1.5]))
    means = metric.means()
    assert (float(means["before"]), float(means["after"])) == (2.0, 1.0)


def test_loss_by_position_sums_processes_of_other_lengths_when_synced() -> None:
    """Mutant ``LossByPosition._sync_dist`` without growing to the longest length: a process that saw
    shorter sequences than another could not stack its sums with the other's. A fake gather gives
    another process's state of 5 positions (each loss 1, counted once)."""
    metric = LossByPosition(num_buckets=1, varying_lengths=True)
    metric.update(torch.full((1, 3), 2.0))

    def gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        other = torch.tensor([5]) if tensor.dtype == torch.int64 and tensor.numel() == 1 else torch.ones(5)
        return [tensor, other.to(tensor.dtype)]

    metric._sync_dist(gather)
    assert metric.loss_by_position.tolist() == [3.0, 3.0, 3.0, 1.0, 1.0]
    assert metric.count_by_position.tolist() == [2.0, 2.0, 2.0, 1.0, 1.0]
