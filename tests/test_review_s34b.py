"""Session 34b review: integer and real arguments read uniformly (numpy and 0-d torch integers are
integers everywhere ``evaluate`` and ``compare`` take them), and out-of-range sizes refused with one line
naming the argument instead of a traceback from inside torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from innerloop.config.load import ConfigError
from innerloop.data.recall import recall_example
from innerloop.hf.modeling import _resized_vocab
from innerloop.models import ModelConfig
from innerloop.models.params import size_to_budget
from innerloop.testing.kernel_checks import _checked_head_dims, _tolerance
from innerloop.train import RecallDataModule, TextDataModule, evaluate, load_model, save_checkpoint
from innerloop.train.bootstrap import bootstrap_difference, expanded_tail
from innerloop.train.compare import compare

DIFFERENCES = torch.linspace(-1, 1, 24).reshape(8, 3)
COUNTS = torch.ones(8, 3)


def _band(**overrides):
    arguments = {"resamples": 20, "confidence": 0.9, "seed": 3} | overrides
    return torch.stack(bootstrap_difference(DIFFERENCES, COUNTS, **arguments))


@pytest.mark.parametrize(
    "overrides",
    [
        {"resamples": np.int64(20)},
        {"resamples": torch.tensor(20)},
        {"seed": np.int32(3)},
        {"seed": torch.tensor(3)},
        {"confidence": np.float64(0.9)},
    ],
    ids=["np-resamples", "tensor-resamples", "np-seed", "tensor-seed", "np64-confidence"],
)
def test_bootstrap_takes_numpy_and_tensor_integers_as_compare_does(overrides):
    # compare() reads its sizes with train.data.checked_window_sizes; the band under it refused np.int64
    assert torch.equal(_band(**overrides), _band())


def test_bootstrap_takes_numpy_float32_confidence():
    assert torch.allclose(_band(confidence=np.float32(0.9)), _band(confidence=float(np.float32(0.9))))
    assert expanded_tail(np.int64(8), 0.9) == expanded_tail(8, 0.9)


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"resamples": 10**30}, "resamples=1000000000000000000000000000000"),
        ({"resamples": 2.0}, "resamples=2.0"),
        ({"seed": 2**64}, "seed=18446744073709551616"),
        ({"seed": 3.0}, "seed=3.0"),
        ({"confidence": "0.9"}, "confidence='0.9'"),
    ],
)
def test_bootstrap_refuses_with_one_line_naming_the_argument(overrides, named):
    # a huge resamples or seed failed inside torch.randint / manual_seed ("Overflow when unpacking long")
    with pytest.raises(ValueError, match="^" + named.replace("(", r"\(").replace(".", r"\.")):
        _band(**overrides)


@pytest.mark.parametrize(
    "num_pairs, gap, named",
    [
        (-1, 2, "num_pairs=-1"),
        (65, 2, "num_pairs=65"),
        (2.0, 2, r"num_pairs=2\.0"),
        (2, -3, "gap=-3"),
        (2, 1.5, r"gap=1\.5"),
        (2, None, "gap=None"),
    ],
)
def test_recall_example_refuses_bad_sizes_naming_them(num_pairs, gap, named):
    # negative sizes failed in torch ("negative dimension"), 65 pairs in torch.stack, floats in slicing
    with pytest.raises(ValueError, match=named):
        recall_example(num_pairs, gap, torch.Generator().manual_seed(0))


def test_recall_sizes_take_tensor_and_numpy_integers():
    reference = recall_example(3, 2, torch.Generator().manual_seed(0))
    for pairs, gap in ((np.int64(3), np.int16(2)), (torch.tensor(3), torch.tensor(2))):
        example = recall_example(pairs, gap, torch.Generator().manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(example, reference, strict=True))
    module = RecallDataModule(num_pairs=torch.tensor(3), gap=2, val_batches=torch.tensor(2), seed=np.uint8(1))
    assert (module.num_pairs, module.val_batches, module.seed) == (3, 2, 1)
    assert all(type(v) is int for v in (module.num_pairs, module.val_batches, module.seed))


@pytest.mark.parametrize(
    "make",
    [
        lambda: TextDataModule(paths=(), batch_size=2**24 + 1),
        lambda: RecallDataModule(batch_size=10**30),
    ],
    ids=["text", "recall"],
)
def test_data_modules_bound_batch_size_as_the_config_does(make):
    # accepted, then torch.randint failed at the first batch ("Overflow when unpacking long long")
    with pytest.raises(ValueError, match=r"^batch_size=\d+ must be in \[1, 16777216\]"):
        make()


def test_text_data_module_bounds_seq_len_as_the_config_does():
    with pytest.raises(ValueError, match=r"^seq_len=1099511627776 must be in \[1, 1073741824\]"):
        TextDataModule(paths=(), seq_len=2**40)


def test_size_to_budget_takes_a_numpy_budget():
    config = ModelConfig(vocab_size=256, hidden_size=32, num_layers=1, num_heads=2, mixer="attention")
    assert size_to_budget(config, np.int64(30000)) == size_to_budget(config, 30000)
    with pytest.raises(ValueError, match=r"^budget=30000\.0 must be a positive integer"):
        size_to_budget(config, 30000.0)


def test_resize_token_embeddings_sizes_take_numpy_integers():
    assert _resized_vocab(np.int64(300), np.int32(64), 256) == _resized_vocab(300, 64, 256) == 320
    assert type(_resized_vocab(torch.tensor(300), None, 256)) is int
    with pytest.raises(ValueError, match="new_num_tokens must be an integer >= 1 or None, got 300.0"):
        _resized_vocab(300.0, None, 256)


def test_check_kernel_head_dims_and_tolerance_take_numpy_numbers():
    assert _checked_head_dims(tuple(np.arange(8, 17, 8))) == (8, 16)
    assert all(type(d) is int for d in _checked_head_dims((np.int64(8),)))
    assert _tolerance(torch.float64, np.float32(0.5)) == 0.5
    for bad in (float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="tolerance must be a positive number"):
            _tolerance(torch.float64, bad)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"seed": 2**64}, r"^seed=18446744073709551616 must be an integer in \[-2\*\*63, 2\*\*64\)"),
        (
            {"resamples": np.int64(2**40)},
            r"^resamples=1099511627776 must be an integer in \[1, 10000000\]",
        ),
    ],
)
def test_compare_refuses_out_of_range_bootstrap_arguments_before_loading(tmp_path, arguments, message):
    # taken, every model evaluated, then torch's manual_seed / randint failed ("Overflow when unpacking")
    missing = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    with pytest.raises(ConfigError, match=message):
        compare(missing, **arguments)


def test_sampling_top_k_takes_a_0d_integer_tensor():
    # numpy's integers were taken and torch.tensor(3) refused, where evaluate takes both
    from innerloop.models import sample_next

    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    picked = sample_next(logits, 1.0, torch.tensor(3), torch.Generator().manual_seed(1))
    assert torch.equal(picked, sample_next(logits, 1.0, 3, torch.Generator().manual_seed(1)))
    with pytest.raises(TypeError, match=r"top_k=tensor\(3\.\) \(Tensor\) must be an int >= 1"):
        sample_next(logits, 1.0, torch.tensor(3.0), None)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"checkpoint": None}, TypeError, r"^checkpoint=None \(NoneType\) must be a path"),
        ({"checkpoint": 3}, TypeError, r"^checkpoint=3 \(int\) must be a path"),
        ({"out_dir": 3}, ConfigError, r"^out_dir=3 \(int\) must be a path"),
        ({"progress_bar": "no"}, TypeError, r"^progress_bar='no' \(str\) must be True or False"),
    ],
)
def test_evaluate_refuses_a_non_path_or_non_flag_by_name(tmp_path, arguments, error, message):
    # Path(None) / Path(3) failed inside pathlib ("expected str, bytes or os.PathLike object"), naming
    # no argument; progress_bar='no' was taken as true
    arguments = {"checkpoint": str(tmp_path / "missing.safetensors")} | arguments
    with pytest.raises(error, match=message):
        evaluate(**arguments)


def test_load_model_refuses_a_non_path_by_name():
    with pytest.raises(TypeError, match=r"^checkpoint=None \(NoneType\) must be a path"):
        load_model(None)


@pytest.mark.parametrize(
    "checkpoint, path, message",
    [
        ({}, None, r"^path=None \(NoneType\) must be a path"),
        ({}, 3, r"^path=3 \(int\) must be a path"),
        ([], "x.safetensors", r"^checkpoint must be a dict"),
    ],
)
def test_save_checkpoint_refuses_a_non_path_or_non_dict_by_name(tmp_path, checkpoint, path, message):
    # Path(None) failed inside pathlib; a list failed with "'list' object has no attribute 'get'"
    with pytest.raises(TypeError, match=message):
        save_checkpoint(checkpoint, path if path != "x.safetensors" else tmp_path / path)
    assert not list(tmp_path.iterdir())


def test_export_checkpoint_refuses_a_non_path_by_name(tmp_path):
    # Path(None) failed inside pathlib ("expected str, bytes or os.PathLike object, not NoneType")
    from innerloop.hf.export import export_checkpoint

    with pytest.raises(TypeError, match=r"^checkpoint=None \(NoneType\) must be a path"):
        export_checkpoint(None, tmp_path / "out")
    with pytest.raises(TypeError, match=r"^out_dir=None \(NoneType\) must be a path"):  # from Python (s51a)
        export_checkpoint(str(tmp_path / "missing.safetensors"), None)
