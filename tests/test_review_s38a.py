"""Review s38a (grader's last look at 815a0cb..079545b): false positives of the new refusals."""

from __future__ import annotations

import importlib

import pytest
import torch
from lm_testing import TINY  # the tiny run of the end-to-end tests

import innerloop.core.layer as core_layer
from innerloop.config import load_config
from innerloop.train import train
from innerloop.train.run import checkpoint_bytes_at_least, training_bytes_at_least

run_module = importlib.import_module("innerloop.train.run")  # `innerloop.train.run` the attribute is not it


def test_bf16_true_training_needs_half_the_bytes_of_float32() -> None:
    # Lightning's bf16-true converts the weights before the fit; AdamW's moments take their dtype
    module = torch.nn.Linear(3, 2)  # 8 float32 parameters
    module.register_buffer("steps", torch.zeros(5, dtype=torch.int64))  # not floating: not converted
    assert training_bytes_at_least(module, torch.bfloat16) == 8 * 2 + 5 * 8 + 8 * 2 + 2 * 8 * 2
    assert checkpoint_bytes_at_least(module, torch.bfloat16) == 8 * 2 + 5 * 8 + 2 * 8 * 2
    weights, grad = torch.zeros(8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(weights)])
    optimizer.param_groups[0]["params"][0].grad = grad
    optimizer.step()
    assert all(m.dtype == torch.bfloat16 for m in optimizer.state_dict()["state"][0].values() if m.dim())


@pytest.mark.slow  # builds the run's LanguageModelModule and Trainer from a preset: ~0.4 s
def test_a_bf16_true_model_that_fits_is_not_refused(tmp_path, monkeypatch) -> None:
    (tmp_path / "corpus.txt").write_text("abcdefgh " * 400)
    overrides = [*TINY, f"data.paths=[{tmp_path / 'corpus.txt'}]", f"out_dir={tmp_path / 'run'}"]
    run, cfg = load_config("tiny", [*overrides, "trainer.precision=bf16-true"])
    module = run_module.build_module(run)
    count = sum(p.numel() for p in module.parameters())
    # room for bf16 weights, gradients and moments (8 bytes a parameter), not for float32 ones (16)
    monkeypatch.setattr(core_layer, "machine_memory_bytes", lambda: 12 * count)

    class Fitted(Exception):
        pass

    monkeypatch.setattr(run_module, "_fit", lambda *a, **k: (_ for _ in ()).throw(Fitted()))
    with pytest.raises(Fitted):
        train(run, cfg)


def test_a_sharding_strategy_needs_one_share_on_each_device(monkeypatch) -> None:
    # FSDP (GPU only) shards weights, gradients and moments over trainer.world_size devices; DDP copies them
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from innerloop.core.layer import ModelTooLargeError
    from innerloop.train.run import refuse_training_beyond_memory, training_shards

    assert training_shards(SimpleNamespace(strategy=FSDPStrategy(), world_size=8)) == 8
    assert training_shards(SimpleNamespace(strategy=DDPStrategy(), world_size=8)) == 1
    module = torch.nn.Linear(63, 64)  # 4096 float32 parameters: 64 KiB to train
    share = training_bytes_at_least(module) // 8
    monkeypatch.setattr(core_layer, "machine_memory_bytes", lambda: share)
    refuse_training_beyond_memory(module, torch.device("cpu"), None, 8)  # fits: one share on each device
    with pytest.raises(ModelTooLargeError, match=r"its share of 7 devices"):
        refuse_training_beyond_memory(module, torch.device("cpu"), None, 7)


def test_an_inference_mode_x_read_only_by_frozen_parameters_trains_the_rest():
    """The refusal of 079545b asked whether ANY parameter requires grad: a layer whose projections and
    gates (what reads x) are frozen, training its inner initial weights and norms, saved no x and
    trained at 815a0cb; it was refused. All trainable: still the one clear error."""
    from innerloop import TTTLayer

    torch.manual_seed(0)
    layer = TTTLayer(8, 2, mini_batch_size=2, kernel="torch")
    with torch.inference_mode():
        x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match=r"^x is an inference tensor .*torch\.no_grad\(\)"):
        layer(x)
    for name, p in layer.named_parameters():
        p.requires_grad_(name.startswith(("initial_params", "post_norm", "ttt_norm")))
    layer(x)[0].sum().backward()
    grads = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    layer.zero_grad()
    layer(x.clone())[0].sum().backward()  # a normal tensor: the same gradients
    assert all(
        torch.equal(g, p.grad)
        for g, p in zip(grads, [p for p in layer.parameters() if p.requires_grad], strict=True)
    )


def test_inference_mode_ids_of_a_model_with_a_frozen_embedding_train_the_rest():
    """Only the embedding reads a CausalLM's ids: frozen, nothing saves them (815a0cb trained it)."""
    from innerloop.models.factory import build_model

    torch.manual_seed(0)
    model = build_model(dict(mixer="ttt", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2))
    with torch.inference_mode():
        ids = torch.randint(0, 8, (1, 3))
    model.embed.weight.requires_grad_(False)  # tied: the head too
    model(ids)[0].sum().backward()
    assert all(p.grad is not None for p in model.blocks.parameters())


@pytest.mark.filterwarnings("ignore::innerloop.models.e2e.OneChunkTrainingWarning")  # a sequence of one chunk
def test_inference_mode_ids_of_an_e2e_model_with_a_frozen_embedding_train_the_rest():
    from innerloop.models.factory import build_model

    torch.manual_seed(0)
    model = build_model(dict(mixer="e2e", vocab_size=8, hidden_size=8, num_layers=2, num_heads=2))
    with torch.inference_mode():
        ids = torch.randint(0, 8, (1, 3))
    model.embed.weight.requires_grad_(False)
    model(ids)[0].sum().backward()  # 815a0cb trained it; 079545b refused it
    assert any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(("key", "high"), [("accumulate_grad_batches", 2**24), ("num_nodes", 2**16)])
def test_lightning_integer_bounds_state_the_whole_range(key, high):
    """Below or above, one line with the whole valid range (two half-ranges before: '>= 1', '<= N')."""
    from innerloop.config.trainer_args import check_lightning_arguments

    check_lightning_arguments({key: high}, ValueError)  # at the bound: accepted
    for value in (0, high + 1):
        with pytest.raises(ValueError, match=rf"^trainer\.{key}={value} must be in \[1, {high}\] \("):
            check_lightning_arguments({key: value}, ValueError)
