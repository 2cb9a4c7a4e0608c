"""Safetensors checkpoints: exact round trip, atomic writes, one clear error for bad files, no pickle."""

from __future__ import annotations

import math
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from innerloop.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from innerloop.train.module import load_model


def test_a_lightning_like_tree_round_trips_exactly(tmp_path) -> None:
    shared = torch.randn(3, 4)
    tree = {
        "state_dict": {"model.embed.weight": shared, "model.lm_head.weight": shared},  # tied: shared memory
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2)}},
                              "param_groups": [{"params": [0, 1], "betas": (0.9, 0.95), "fused": None}]}],
        "global_step": 7,
        "kth_value": torch.tensor(float("inf")),
        "score": float("nan"),
        "name": "x",
        "flags": [True, False],
        "__weird": {"__tensor__": 1},  # keys that look like the encoding's markers
    }  # fmt: skip
    path = save_checkpoint(tree, tmp_path / "c.safetensors")
    back = load_checkpoint(path)
    assert torch.equal(back["state_dict"]["model.embed.weight"], shared)
    assert torch.equal(back["state_dict"]["model.lm_head.weight"], shared)
    state = back["optimizer_states"][0]["state"]
    assert list(state) == [0] and torch.equal(state[0]["step"], torch.tensor(3.0))
    assert back["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["global_step"] == 7 and back["name"] == "x" and back["flags"] == [True, False]
    assert math.isnan(back["score"]) and torch.isinf(back["kth_value"])
    assert back["__weird"] == {"__tensor__": 1}


def test_a_checkpoint_gets_the_usual_file_permissions(tmp_path) -> None:
    umask = os.umask(0o022)
    try:
        path = save_checkpoint({"w": torch.ones(1)}, tmp_path / "c.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # not the 0600 of a temporary file


def test_objects_that_would_need_pickle_are_refused_when_saving(tmp_path) -> None:
    with pytest.raises(TypeError, match=r"cannot store object at checkpoint\['hyper_parameters'\]"):
        save_checkpoint({"hyper_parameters": object()}, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()
    assert os.listdir(tmp_path) == []  # the temporary file is gone too


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint({"global_step": 1, "w": torch.ones(2)}, path)
    with pytest.raises(TypeError):
        save_checkpoint({"global_step": 2, "w": torch.ones(2), "bad": object()}, path)
    assert load_checkpoint(path)["global_step"] == 1
    assert os.listdir(tmp_path) == ["last.safetensors"]


def test_a_truncated_checkpoint_gives_one_clear_error(tmp_path) -> None:
    path = save_checkpoint({"w": torch.randn(100)}, tmp_path / "c.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is not a readable innerloop checkpoint"):
        load_checkpoint(path)


def test_a_foreign_safetensors_file_is_named_as_such(tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="safetensors file but not an innerloop checkpoint"):
        load_checkpoint(path)


def test_a_pickle_is_rejected_without_being_unpickled(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "last.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(CheckpointError, match="is not a readable innerloop checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_missing_file_and_a_checkpoint_without_a_model_are_clear_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    path = save_checkpoint({"global_step": 3}, tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match="without a model"):
        load_model(path)


@pytest.mark.parametrize("mixer", ["ttt", "e2e"])
def test_load_model_returns_the_model_class_of_the_checkpoint(tmp_path, mixer) -> None:
    """``load_model`` gives back what ``build_model`` built: an E2ELM for ``mixer: e2e``, else a CausalLM."""
    from innerloop.models import E2ELM, CausalLM, ModelConfig
    from innerloop.train.module import LanguageModelModule

    config = ModelConfig(
        mixer=mixer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, window=4
    )
    module = LanguageModelModule(config)
    path = save_checkpoint(
        {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()},
        tmp_path / "m.safetensors",
    )
    model = load_model(path)
    assert type(model) is (E2ELM if mixer == "e2e" else CausalLM)
    assert not model.training
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_an_e2e_checkpoint_written_before_the_official_options_loads_as_the_model_it_was(tmp_path) -> None:
    """E2E checkpoints from before ``chunk_targets``/``rope_positions`` existed were trained with the
    paper's reading (``within_chunk``, ``absolute``); the official defaults must not silently change
    what such a checkpoint computes."""
    from innerloop.models import ModelConfig
    from innerloop.train.module import LanguageModelModule

    torch.manual_seed(0)
    config = ModelConfig.from_dict(
        {
            "mixer": "e2e",
            "hidden_size": 16,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 32,
            "window": 8,
            "e2e": {"chunk_size": 4, "chunk_targets": "within_chunk", "rope_positions": "absolute"},
        }
    )
    module = LanguageModelModule(config)
    hparams = dict(module.hparams)
    older = {key: value for key, value in hparams["model"]["e2e"].items()}
    for option in ("chunk_targets", "rope_positions", "outer_loss"):
        del older[option]
    hparams["model"] = {**hparams["model"], "e2e": older}
    path = save_checkpoint(
        {"hyper_parameters": hparams, "state_dict": module.state_dict()}, tmp_path / "o.st"
    )
    model = load_model(path)
    assert model.config.e2e.chunk_targets == "within_chunk"
    assert model.config.e2e.rope_positions == "absolute"
    assert model.config.e2e.outer_loss == "token_mean"  # it was trained on the per-token mean
    ids = torch.randint(0, config.vocab_size, (1, 24))
    assert torch.equal(model(ids)[0], module.model.eval()(ids)[0])
    # A checkpoint that names the options keeps them.
    current = save_checkpoint(
        {
            "hyper_parameters": dict(
                LanguageModelModule(
                    ModelConfig(
                        mixer="e2e", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, window=4
                    )
                ).hparams
            ),
            "state_dict": {},
        },
        tmp_path / "n.st",
    )
    assert load_checkpoint(current)["hyper_parameters"]["model"]["e2e"]["chunk_targets"] == "next_token"


def test_map_location_is_a_device_or_a_clear_error(tmp_path) -> None:
    """A device index means what ``torch.device`` says (the accelerator's), not silently the CPU; a
    mapping or a function of devices, which the file gives nothing to map from, is refused by name."""
    from innerloop.checkpoints import checkpoint_device

    path = tmp_path / "c.ckpt"
    save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    assert load_checkpoint(path, None)["state_dict"]["w"].device.type == "cpu"
    assert load_checkpoint(path, torch.device("cpu"))["state_dict"]["w"].device.type == "cpu"
    if torch.cuda.is_available():
        assert checkpoint_device(0) == torch.device("cuda", 0)
    else:  # torch.device(0) is the accelerator's first device: none here
        with pytest.raises(ValueError, match="map_location=0 is not a device .*accelerator"):
            load_checkpoint(path, 0)
    assert checkpoint_device("cuda:1") == torch.device("cuda", 1)
    for given in ({"cuda:0": "cpu"}, lambda storage, location: storage, 1.5, True):
        with pytest.raises(TypeError, match="map_location=.*valid: a torch.device"):
            load_checkpoint(path, given)
    with pytest.raises(ValueError, match="map_location='gpu9' is not a device"):
        load_checkpoint(path, "gpu9")


def test_a_checkpoint_replaced_while_it_is_read_is_read_again_and_a_bad_one_is_one_error(
    tmp_path, monkeypatch
):
    """safetensors reads a header, then maps the data: a running run replacing its checkpoint between
    the two made a raw RuntimeError (seen reading a live ddp run's last.safetensors). The new file is
    read instead; a mismatch with nothing replaced is a CheckpointError naming the file."""
    import innerloop.checkpoints as checkpoints

    path = tmp_path / "last.safetensors"
    save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "global_step": 1}, path)
    real, calls = checkpoints.safe_open, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the run saves its next step meanwhile
            save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 2}, path)
            raise RuntimeError("file size is smaller than the required mapping size")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "safe_open", racing)
    assert load_checkpoint(path)["global_step"] == 2 and len(calls) == 2

    def broken(*args, **kwargs):
        raise RuntimeError("file size is smaller than the required mapping size")

    monkeypatch.setattr(checkpoints, "safe_open", broken)
    with pytest.raises(CheckpointError, match="last.safetensors' is not a readable innerloop checkpoint"):
        load_checkpoint(path)


def test_a_header_and_tensors_of_two_saves_are_never_mixed_into_a_corrupt_error(tmp_path, monkeypatch):
    """The header of one save with the tensors of the next (the file replaced between safetensors'
    header read and its data mapping, with the same layout: no error from safetensors) failed the
    checksum, and a live run's whole checkpoint was called corrupt (seen reading a ddp_spawn run's
    last.safetensors). A file replaced during the read is read again."""
    import innerloop.checkpoints as checkpoints

    path = tmp_path / "last.safetensors"
    save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "global_step": 1}, path)
    real, calls = checkpoints.safe_open, []

    class HeaderOfOneTensorsOfTheNext:
        def __init__(self, *args, **kwargs) -> None:
            self.first = real(*args, **kwargs)
            self.args, self.kwargs = args, kwargs

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.first.__exit__(*exc)

        def metadata(self):
            metadata = self.first.__enter__().metadata()
            save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 2}, path)  # the next save
            return metadata

        def keys(self):
            return self.first.keys()

        def get_tensor(self, key):
            with real(*self.args, **self.kwargs) as now:  # the data mapped from the file there now
                return now.get_tensor(key)

    def racing(*args, **kwargs):
        calls.append(1)
        return HeaderOfOneTensorsOfTheNext(*args, **kwargs) if len(calls) == 1 else real(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "safe_open", racing)
    loaded = load_checkpoint(path)
    assert loaded["global_step"] == 2 and len(calls) == 2
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))
