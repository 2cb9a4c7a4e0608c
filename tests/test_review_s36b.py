"""Review s36b: the user-facing API against hostile input. Path lists given as a numpy array, a
generator or with an empty entry (which named the current directory and read every file below it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from innerloop import TTTLayer, ops
from innerloop.checkpoints import CheckpointError, checkpoint_identity, checkpoint_tokenizer
from innerloop.cli import _is_user_error
from innerloop.config.load import ConfigError, load_config
from innerloop.core import layer as core_layer
from innerloop.core.family_layers import FAMILY_LAYERS
from innerloop.core.layer import ModelTooLargeError
from innerloop.data.hf import check_hf_source
from innerloop.data.text import DataError, path_entries, resolve_files
from innerloop.data.tokenizer import (
    TokenizerError,
    byte_level_tokenizer_json,
    load_tokenizer,
    tokenizer_from_source,
)
from innerloop.interop import ttt_lm_pytorch
from innerloop.models import CausalSelfAttention, ModelConfig, build_model, validate_model_config
from innerloop.models.params import count_parameters
from innerloop.train import LanguageModelModule, TextDataModule, load_checkpoint, load_module
from innerloop.train.compare import compare


@pytest.fixture
def text_folder(tmp_path, monkeypatch):
    """A current directory holding text files: what an empty path entry would read."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("def f(x):\n    return x + 1\n" * 20)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("paths", ["", [""], ("a.txt", "  ")])
def test_an_empty_path_entry_is_refused_not_read_as_the_current_directory(text_folder, paths) -> None:
    """TextDataModule(paths=['']) read every file of the current directory, and so did evaluate(paths='')
    and compare(paths=['']) (config files refused it; the Python API did not)."""
    with pytest.raises(DataError, match=r"paths entry '\s*' is empty \(it would read the whole current"):
        TextDataModule(paths, seq_len=8, batch_size=1)
    with pytest.raises(DataError, match="is empty"):
        resolve_files(paths)
    with pytest.raises(ConfigError, match="paths entry .* is empty"):
        compare([text_folder / "absent"], paths=paths)


def test_an_empty_path_is_not_the_current_save_to_disk_folder(text_folder) -> None:
    (text_folder / "state.json").write_text("{}")  # the current directory looks like a saved dataset
    with pytest.raises(DataError, match="data.paths entry '' is empty"):
        check_hf_source([""])


def test_a_compared_run_given_as_an_empty_path_is_refused(text_folder) -> None:
    with pytest.raises(ConfigError, match="runs_or_checkpoints entry '' is empty"):
        compare(["", "other"])


@pytest.mark.parametrize(
    "given", [np.array(["a.txt", "b.txt"]), (p for p in ["a.txt", "b.txt"]), ("a.txt", "b.txt")]
)
def test_paths_in_any_ordered_collection_are_read_in_order(text_folder, given) -> None:
    """A numpy array of paths (or a generator) was refused: only a list or tuple was taken."""
    assert path_entries(given) == ["a.txt", "b.txt"]
    assert all(type(p) is str for p in path_entries(np.array(["a.txt"])))  # not numpy's str_
    module = TextDataModule(np.array(["a.txt", "b.txt"]), seq_len=8, batch_size=1)
    assert module.paths == ["a.txt", "b.txt"]


@pytest.mark.parametrize(
    "given", [{"a.txt"}, {"a.txt": 1}, np.array([["a.txt"]]), np.array("a.txt"), b"a.txt"]
)
def test_paths_without_an_order_or_not_paths_are_one_line(given) -> None:
    with pytest.raises(DataError, match=r"paths=.* must be a path or a list of paths"):
        path_entries(given, "paths")


def test_compare_takes_runs_as_a_numpy_array(tmp_path) -> None:
    """compare(np.array([...])) said 'compare needs a list of one or more run folders': the runs are read."""
    with pytest.raises(ConfigError, match="absent' is neither a run folder nor a checkpoint"):
        compare(np.array([str(tmp_path / "absent")]))


@pytest.mark.parametrize("load", [load_tokenizer, tokenizer_from_source])
def test_an_empty_tokenizer_path_is_refused_not_the_current_directorys_tokenizer(tmp_path, monkeypatch, load):
    """load_tokenizer('') read the tokenizer.json of the current directory (config files and the CLI
    refused ''; the Python API did not), and None or 3 failed in pathlib naming nothing."""
    (tmp_path / "tokenizer.json").write_text(byte_level_tokenizer_json(True))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        TokenizerError, match=r"tokenizer='' is empty \(it would name the current directory\)"
    ):
        load("")
    for spec in (None, 3, b"bytes"):
        with pytest.raises(TokenizerError, match=r"tokenizer=.* is not a str or a path; valid: 'bytes'"):
            load(spec)
    assert load(tmp_path / "tokenizer.json").vocab_size == 257  # a Path is a path


@pytest.mark.parametrize("mixer", ["attention", "e2e"])
def test_a_model_whose_weights_exceed_the_machines_memory_is_one_line(monkeypatch, mixer) -> None:
    """Each size field is bounded (2**24) but their products were not: vocab_size=2**22 with hidden_size=2**12
    is 64 GiB of float32 embedding, and building it allocated until the allocator or the out-of-memory
    killer stopped it. Here the machine is made 1 MB small instead."""
    config = ModelConfig(
        mixer=mixer, hidden_size=32, num_heads=2, num_layers=4, vocab_size=4096, intermediate_size=1024
    )
    monkeypatch.setattr(core_layer, "machine_memory_bytes", lambda: 10**6)
    with pytest.raises(
        ModelTooLargeError, match=r"vocab_size=4096, hidden_size=32, .* at least 524,288 param"
    ):
        build_model(config)
    with torch.device("meta"):  # counting parameters allocates nothing, so it is not refused
        assert count_parameters(build_model(config)).total > 524_288
    assert _is_user_error(ModelTooLargeError("sizes"))  # the command line prints its one line
    monkeypatch.setattr(core_layer, "machine_memory_bytes", lambda: 10**7)
    build_model(config)


@pytest.mark.parametrize("eps", [1e30, 1.0])
def test_a_norm_epsilon_of_one_or_more_is_refused_everywhere_a_norm_takes_one(eps) -> None:
    """norm_eps=1e30 was accepted by the model config and every layer: added to the mean square of the
    input, it scaled each norm's output by 1e-15, silently (the model still trained, on nothing)."""
    with pytest.raises(
        ValueError,
        match=r"model\.norm_eps=.* must be in \[1\.1754943508222875e-38, 1\) \(added to the input's mean",
    ):
        validate_model_config(ModelConfig(norm_eps=eps))
    makers = [
        lambda: TTTLayer(16, 2, norm_eps=eps),
        lambda: CausalSelfAttention(16, 2, None, 10000.0, qk_norm=True, norm_eps=eps),
        lambda: FAMILY_LAYERS["deltanet"](16, 2, norm_eps=eps),
        lambda: ops.scan(*[torch.ones(1, 2, 4, 8)] * 3, torch.ones(1, 2, 4), mini_batch_size=4, norm_eps=eps),
    ]
    for make in makers:
        with pytest.raises(ValueError, match=r"norm_eps=.* must be < 1 \(added to the input's mean square"):
            make()
    TTTLayer(16, 2, norm_eps=0.5)  # below 1 is the user's choice


@pytest.mark.parametrize(
    "setting",
    [
        {"num_beams": 0},  # was ZeroDivisionError inside transformers' beam search
        {"num_beams": -1},  # was 'Trying to create tensor with negative dimension -1'
        {"num_return_sequences": 0},  # returned one sequence
        {"max_new_tokens": 2.5},  # generated 3 tokens
        {"max_length": 0, "max_new_tokens": None},
    ],
)
def test_hf_generate_counts_are_integers_at_least_their_least_value(setting) -> None:
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    torch.manual_seed(0)
    small = {
        "hidden_size": 16,
        "num_heads": 2,
        "num_layers": 1,
        "intermediate_size": 32,
        "mixer": "attention",
    }
    model = InnerloopForCausalLM(InnerloopConfig(model=small)).eval()
    prompt = torch.randint(0, 256, (1, 5))
    name = next(iter(setting))
    with pytest.raises(ValueError, match=rf"generate\({name}=.*\): {name} must be an integer >= [01]"):
        model.generate(prompt, **{"max_new_tokens": 3, **setting})
    assert model.generate(prompt, max_new_tokens=np.int64(2), num_beams=2).shape == (1, 7)


def test_the_modules_seq_len_has_the_data_modules_bounds() -> None:
    """LanguageModelModule(seq_len=10**30) was accepted and stored; evaluating its checkpoint then said
    the text had 'fewer than --seq-len + 1 = 10**30 + 1' bytes, blaming an option never given."""
    small = {
        "hidden_size": 16,
        "num_heads": 2,
        "num_layers": 1,
        "intermediate_size": 32,
        "mixer": "attention",
    }
    with pytest.raises(
        ValueError, match=r"seq_len=1000000000000000000000000000000 must be in \[1, 1073741824\]"
    ):
        LanguageModelModule(small, seq_len=10**30)
    assert LanguageModelModule(small, seq_len=np.int64(2**30)).hparams.seq_len == 2**30


def test_resizing_the_vocabulary_past_the_machines_memory_is_one_line(monkeypatch) -> None:
    """resize_token_embeddings bounded the new size by model.vocab_size's 2**24 only: at width 4096 that
    is 64 GiB of float32 rows, allocated until the machine gave out (made 1 MB small here)."""
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    small = {
        "hidden_size": 16,
        "num_heads": 2,
        "num_layers": 1,
        "intermediate_size": 32,
        "mixer": "attention",
    }
    model = InnerloopForCausalLM(InnerloopConfig(model=small))
    monkeypatch.setattr(core_layer, "machine_memory_bytes", lambda: 10**6)
    with pytest.raises(
        ModelTooLargeError, match=r"vocab_size=65536, hidden_size=16, .*: 4.0 MiB of float32 weights"
    ):
        model.resize_token_embeddings(65536)
    assert model.config.model["vocab_size"] == 256  # nothing changed


@pytest.mark.parametrize(
    "make",
    [
        lambda: TTTLayer(64, 2),
        lambda: FAMILY_LAYERS["deltanet"](64, 2),
        lambda: CausalSelfAttention(64, 2, None, 10000.0),
    ],
)
def test_a_layer_whose_projections_exceed_the_machines_memory_is_one_line(monkeypatch, make) -> None:
    """TTTLayer(hidden_size=2**16, num_heads=1) passed every check, then allocated its 16 GiB projections
    one after another until the machine gave out (made 40 kB small here: 3 x 64 x 64 float32 is 48 kB)."""
    monkeypatch.setattr(core_layer, "machine_memory_bytes", lambda: 40_000)
    with pytest.raises(
        ModelTooLargeError, match=r"layer of hidden_size=64 has at least (12,288|16,384) parameters"
    ):
        make()
    with torch.device("meta"):
        make()  # nothing is allocated there


def test_the_reference_loader_refuses_an_empty_folder_not_the_current_directory(
    tmp_path, monkeypatch
) -> None:
    """ttt_lm_pytorch.load_model('') read the current directory's config.json and weights."""
    (tmp_path / "config.json").write_text('{"model_type": "ttt"}')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"folder '' is empty: give the folder save_pretrained wrote"):
        ttt_lm_pytorch.load_model("")


def test_a_weight_decay_that_zeroes_the_weights_at_each_step_is_refused() -> None:
    """weight_decay=1000 with lr=1e-3 was accepted: AdamW multiplies every decayed weight by
    1 - lr * weight_decay = 0 at each step, so the weights are only the last step's update, and the loss
    stays finite (no divergence check stops it). The config and the module refuse it."""
    small = {
        "hidden_size": 16,
        "num_heads": 2,
        "num_layers": 1,
        "intermediate_size": 32,
        "mixer": "attention",
    }
    with pytest.raises(ValueError, match=r"weight_decay=1000 with lr=0.001: .* = 0 at every step"):
        LanguageModelModule(small, lr=1e-3, weight_decay=1000.0, min_lr=0.0)
    with pytest.raises(ConfigError, match=r"optim.lr \* optim.weight_decay must be < 1"):
        load_config("tiny", ["optim.weight_decay=1000", "optim.lr=0.001", "optim.min_lr=0"])
    LanguageModelModule(small, lr=1e-3, weight_decay=999.0, min_lr=0.0)  # 0.999: the user's choice


def test_the_memory_bound_is_the_containers_limit_where_that_is_lower(tmp_path, monkeypatch) -> None:
    """A container's cgroup limit (here 1 MB) was not read: a model far past it but within the host's
    MemTotal was built until the container's out-of-memory killer stopped the process."""
    limit, unlimited = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    limit.write_text("1000000\n")
    unlimited.write_text("max\n")
    monkeypatch.setattr(core_layer, "CGROUP_MEMORY_LIMITS", (str(limit), str(unlimited)))
    assert core_layer.machine_memory_bytes() == 1_000_000
    with pytest.raises(ModelTooLargeError, match=r"more than this machine's 976.6 KiB"):
        TTTLayer(512, 4)  # 3 x 512 x 512 float32 is 3 MB
    limit.write_text("max\n")
    assert core_layer.machine_memory_bytes() > 1_000_000


@pytest.mark.parametrize("load", [load_checkpoint, load_module, checkpoint_tokenizer, checkpoint_identity])
def test_an_empty_checkpoint_path_is_named_as_given(load) -> None:
    """load_checkpoint('') said "checkpoint '.' is a directory": a path the user never gave."""
    with pytest.raises(CheckpointError, match=r"checkpoint '' is empty: give a checkpoint file"):
        load("")
