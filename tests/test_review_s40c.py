"""Review s40c: the numbers a user reads (metrics, training logs, eval/compare outputs, HF loss)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from innerloop.train.metrics import Float64Perplexity, InnerLossDiagnostics, LossByPosition


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int8, torch.int32])
def test_perplexity_takes_ids_of_every_integer_dtype(dtype: torch.dtype) -> None:
    """uint8 ids (bytes) or int16 ones failed in torch's gather ("Expected dtype int32/int64 for index")."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64)
    ids = torch.randint(0, 7, (2, 5), generator=generator)
    metric = Float64Perplexity(ignore_index=-100)
    metric.update(logits, ids.to(dtype))
    expected = F.cross_entropy(logits.reshape(-1, 7), ids.reshape(-1))
    assert math.isclose(float(metric.mean_loss()), float(expected), rel_tol=1e-12)


@pytest.mark.parametrize(
    ("preds", "target", "shown"),
    [
        (torch.zeros(2, 5, 7), torch.ones(2, 5, dtype=torch.bool), "(2, 5) of torch.bool"),
        (
            torch.zeros(2, 5, 7, dtype=torch.long),
            torch.ones(2, 5, dtype=torch.long),
            "(2, 5, 7) of torch.int64",
        ),
        (torch.zeros(2, 5, 7), [[1] * 5] * 2, "and list"),
    ],
)
def test_perplexity_refuses_bool_targets_and_integer_logits(preds, target, shown) -> None:
    """bool targets were scored as ids 0 and 1, integer preds as logits: a perplexity of nothing."""
    metric = Float64Perplexity(ignore_index=-100)
    with pytest.raises(
        ValueError, match=r"preds must be floating-point logits .*" + "got .*" + re.escape(shown)
    ):
        metric.update(preds, target)


@pytest.mark.parametrize(
    "losses",
    [
        torch.ones(2, 3, dtype=torch.bool),
        torch.ones(2, 3, dtype=torch.long),
        torch.ones(2, 3, dtype=torch.cfloat),
    ],
)
def test_loss_by_position_refuses_losses_that_are_not_real_numbers(losses: torch.Tensor) -> None:
    """bool, integer and complex losses were cast to float64 (complex ones without their imaginary part)."""
    metric = LossByPosition(2)
    with pytest.raises(
        ValueError, match=rf"^token_loss must be a floating-point tensor .*got \(2, 3\) of {losses.dtype}$"
    ):
        metric.update(losses)
    with pytest.raises(
        ValueError, match=r"^token_loss must be a floating-point tensor \[batch, length\], got list$"
    ):
        metric.update([[1.0, 2.0]])  # 'list' object has no attribute 'dim'
    with pytest.raises(ValueError, match=r"^mask must be a bool tensor .*got list$"):
        metric.update(torch.ones(1, 2), [[True, True]])  # 'list' object has no attribute 'dtype'


@pytest.mark.parametrize(
    "before", [torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.cfloat), [1.0, 2.0]]
)
def test_inner_loss_diagnostics_refuse_losses_that_are_not_real_numbers(before) -> None:
    metric = InnerLossDiagnostics(1)
    with pytest.raises(
        ValueError, match=r"^before and after must both be floating-point tensors \[batch\], got "
    ):
        metric.update(0, before, torch.ones(2))


def test_inner_diagnostics_build_their_weights_on_the_inputs_device(monkeypatch) -> None:
    """A loss whose pairs have no ``valid`` (reconstruction, the default) weighted every token with a CPU
    tensor: on a GPU, ``inner_loss_before_after`` (every TTT run's validation, diagnostics_batches=1)
    failed with "Expected all tensors to be on the same device". The meta device stands in for the GPU
    (autocast, which meta has not, is off as it is in the function)."""
    import contextlib

    from innerloop.core.diagnostics import inner_loss_before_after
    from innerloop.core.layer import TTTLayer

    with torch.device("meta"):
        layer = TTTLayer(8, 2, mini_batch_size=4, non_finite="ignore")
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: contextlib.nullcontext())
    before, after = inner_loss_before_after(layer, torch.empty(2, 6, 8, device="meta"))
    assert before.device.type == after.device.type == "meta" and before.shape == (2,)


@pytest.mark.parametrize(("world_size", "device"), [(2, "meta"), (1, "cpu")])
def test_validation_row_counters_are_reduced_on_the_modules_device(world_size: int, device: str) -> None:
    """tokens_seen and wall_time of a validation's row are all-reduced (sync_dist, max) across processes:
    as CPU tensors, NCCL (DDP on GPUs) cannot reduce them ("No backend type associated with device type
    cpu"). The meta device stands in for the GPU; one process reduces nothing and keeps them on the CPU."""
    from types import SimpleNamespace

    from innerloop.train.throughput import TrainingThroughput

    logged: dict[str, torch.Tensor] = {}
    callback = TrainingThroughput(clock=lambda: 1.0, cpu_status=lambda: (1, 2, 0.1), echo=lambda line: None)
    callback.on_train_start(SimpleNamespace(is_global_zero=True), None)
    module = SimpleNamespace(
        device=torch.device("meta"), log=lambda name, value, **kw: logged.update({name: value})
    )
    callback.on_validation_epoch_end(SimpleNamespace(world_size=world_size, is_global_zero=True), module)
    assert set(logged) == {"tokens_seen", "wall_time"}
    assert all(v.device.type == device and v.dtype == torch.float64 for v in logged.values())


def test_perplexity_refuses_a_bool_ignore_index() -> None:
    """torchmetrics takes True as the int 1: token 1 went unscored, silently."""
    with pytest.raises(
        ValueError, match=r"^ignore_index=True must be None or an integer token id, not a bool$"
    ):
        Float64Perplexity(ignore_index=True)
    assert Float64Perplexity(ignore_index=-100).ignore_index == -100
    assert Float64Perplexity().ignore_index is None


@pytest.mark.parametrize(
    ("differences", "counts", "shown"),
    [
        ([[1.0]] * 6, [[1.0]] * 6, "got list and list"),  # 'list' object has no attribute 'shape'
        (
            torch.ones(6, 2, dtype=torch.bool),
            torch.ones(6, 2),
            "got (6, 2) of torch.bool and (6, 2) of torch.float32",
        ),
        (torch.ones(6, 2, dtype=torch.cfloat), torch.ones(6, 2), "got (6, 2) of torch.complex64"),
        (torch.ones(6, 2), torch.ones(6, 2, dtype=torch.bool), "and (6, 2) of torch.bool"),
    ],
)
def test_bootstrap_refuses_differences_and_counts_that_are_not_real_numbers(
    differences, counts, shown
) -> None:
    """bool and complex tensors were taken as numbers by .double() (complex without its imaginary part)."""
    from innerloop.train.bootstrap import bootstrap_difference

    with pytest.raises(
        ValueError, match=r"^differences must be a floating-point tensor .*" + re.escape(shown)
    ):
        bootstrap_difference(differences, counts)
    mean, _, _ = bootstrap_difference(torch.ones(6, 2), torch.full((6, 2), 2, dtype=torch.long), resamples=10)
    assert mean.tolist() == [0.5, 0.5]  # integer token counts stay valid


@pytest.mark.parametrize(("length", "seq_len", "count"), [(100, 9, 4), (100, 9, 50), (10, 9, 3), (37, 4, 9)])
def test_eval_windows_are_as_docs_training_md_says(length: int, seq_len: int, count: int) -> None:
    """docs/training.md (eval): spread evenly, the first at the text's start and the last at its end, no
    token scored twice, whole windows, as many as the text holds when it holds fewer than asked."""
    from innerloop.train.data import spread_windows

    inputs, targets = spread_windows(torch.arange(length), seq_len, count)
    holds = (length - 1) // seq_len
    assert inputs.shape == targets.shape == (min(count, holds), seq_len)
    assert int(inputs[0, 0]) == 0 and int(targets[-1, -1]) == length - 1
    assert targets.unique().numel() == targets.numel() and torch.equal(targets, inputs + 1)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the meta-device test stands in here)"
)
def test_inner_diagnostics_on_a_gpu_equal_the_cpus() -> None:
    from innerloop.core.diagnostics import inner_loss_before_after
    from innerloop.core.layer import TTTLayer

    torch.manual_seed(0)
    layer = TTTLayer(8, 2, mini_batch_size=4, kernel="torch")
    x = torch.randn(2, 6, 8)
    expected = inner_loss_before_after(layer, x)
    got = inner_loss_before_after(layer.cuda(), x.cuda())
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have.cpu(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # the datasets library reads the JSONL (~1 s, most of it its import)
def test_an_hf_runs_held_out_data_too_short_for_eval_seq_len_names_seq_len(tmp_path) -> None:
    """eval/compare --seq-len beyond an hf run's held-out documents said 'a shorter data.seq_len' (the
    run's, 16 here, which the user did not give), where a text run's message names --seq-len."""
    import json

    from innerloop.config.load import load_config
    from innerloop.train.data import DataError
    from innerloop.train.run import validation_examples

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} " + "abc " * 5}) + "\n" for i in range(20)))
    overrides = [f"data.paths=[{data}]", "data.name=hf", "data.text_field=text", "data.seq_len=16"]
    run, _ = load_config("tiny", [*overrides, f"out_dir={tmp_path / 'run'}"])
    assert validation_examples(run, seq_len=20)[0].shape[1] == 20
    with pytest.raises(DataError, match=r"fewer than seq_len \+ 1 = 5001 tokens; .* or a shorter seq_len$"):
        validation_examples(run, seq_len=5000)
    with pytest.raises(DataError, match=r"fewer than data.seq_len \+ 1 = 5001 tokens"):  # the run's own
        validation_examples(load_config("tiny", [*overrides[:3], "data.seq_len=5000"])[0])


@pytest.mark.slow  # the datasets library reads the JSONL (~1 s, most of it its import)
def test_eval_data_read_as_records_names_data_not_the_runs_data_paths(tmp_path) -> None:
    """eval --data x.jsonl --split test said '--split 'test' is not a split of data.paths=[...]': the
    files are eval's --data, not the run's data.paths."""
    import json

    from innerloop.train.data import DataError, dataset_tokens

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3)))
    with pytest.raises(DataError) as caught:
        dataset_tokens([str(data)], "text", split="test")
    assert f"split='test' is not a split of paths=['{data}']" in str(caught.value)  # Python's names (s50m)
    assert "data.paths" not in str(caught.value) and "data.split" not in str(caught.value)
