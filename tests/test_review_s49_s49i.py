"""Review s49i: mutation testing outside the core math. Each test here guards a defect that a planted
mutation showed no fast test caught (the mutation named in each docstring passed the module's tests)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "hf"))
from hf_testing import tiny_hf_model  # noqa: E402
from tokenizer_testing import bos_tokenizer_json  # noqa: E402

from innerloop.models import CausalLM, ModelConfig  # noqa: E402


def tiny_lm() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(mixer="attention", hidden_size=32, num_layers=1, num_heads=2)).eval()


def test_a_left_padded_rows_loss_is_the_loss_of_the_row_alone() -> None:
    """Mutation ``unscored_pads``: ``columns <= pads`` -> ``columns < pads`` (the first token after the
    pads scored from the pads' zero logits, log(vocab) added to the loss) passed every test."""
    model = tiny_hf_model("attention")
    ids = torch.tensor([[5, 9, 2, 7, 3, 8]])
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(ids, labels=ids, use_cache=False).loss
        left = model(padded, attention_mask=mask, labels=padded, use_cache=False).loss
    torch.testing.assert_close(left, alone)


def test_num_items_in_batch_divides_the_summed_loss() -> None:
    """Mutation ``next_token_loss``: ``total / num_items_in_batch`` -> the mean over the scored tokens
    (gradient accumulation weighing micro-batches, not tokens, alike) passed every test."""
    model = tiny_hf_model("attention")
    ids = torch.tensor([[5, 9, 2, 7, 3, 8], [1, 4, 6, 2, 9, 9]])
    scored = ids.shape[0] * (ids.shape[1] - 1)
    with torch.no_grad():
        mean = model(ids, labels=ids, use_cache=False).loss
        over_three_times = model(ids, labels=ids, use_cache=False, num_items_in_batch=3 * scored).loss
    torch.testing.assert_close(over_three_times, mean / 3)


def _spied_generate(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int | None, int, float | None]]:
    """Replace ``innerloop.models.generate`` by one that records ``(top_k, the generator's seed, top_p)``."""
    import innerloop.models

    asked: list[tuple[int | None, int, float | None]] = []

    def spy(model, prompt_ids, steps, temperature, top_k, generator, eos_token_id=None, top_p=None):
        asked.append((top_k, generator.initial_seed(), top_p))
        yield from ((torch.tensor([token]), None) for token in (3, 4))

    monkeypatch.setattr(innerloop.models, "generate", spy)
    return asked


@pytest.mark.parametrize("path", ["bytes", "tokens"])
def test_the_cli_generate_samples_with_the_seed_and_top_k_given(monkeypatch, capsys, path) -> None:
    """Mutations of ``innerloop generate``: ``manual_seed(args.seed)`` -> ``manual_seed(0)`` (either
    path) and ``args.top_k`` -> None (the byte path) passed every test: ``--seed`` and ``--top-k`` were
    read by nothing a test looked at. ``--top-p`` is held the same way."""
    from innerloop import cli

    class Letters:  # a tokenizer of 26 letters without an end of text
        eos_id = None
        vocab_size = 26

        def encode(self, text: str) -> list[int]:
            return [23, 1, 2]

        def decode(self, ids: list[int]) -> str:
            return "".join(chr(ord("a") + i) for i in ids)

    asked = _spied_generate(monkeypatch)
    args = argparse.Namespace(
        prompt="x", tokens=2, temperature=1.0, top_k=3, top_p=0.75, seed=1234, ignore_eos=False
    )
    if path == "bytes":
        assert cli._generate_bytes(args, tiny_lm()) == 0
    else:
        assert cli._generate_tokens(args, tiny_lm(), Letters()) == 0
    capsys.readouterr()
    assert asked == [(3, 1234, 0.75)]


def test_each_norm_of_a_block_feeds_its_own_sublayer() -> None:
    """Mutation ``Block.forward``: ``self.mlp(self.mlp_norm(h))`` -> ``self.mlp(self.mixer_norm(h))``
    passed every test (the norms' weights start equal, at ones, so every comparison at initialisation
    read the same numbers). With the norms' weights made different, the block is ``h + mixer(mixer_norm(h))``
    then ``+ mlp(mlp_norm(.))``."""
    block = tiny_lm().blocks[0]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for norm in (block.mixer_norm, block.mlp_norm):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
        h = torch.randn(2, 5, 32, generator=generator)
        mixed, _ = block.mixer(block.mixer_norm(h))
        after_mixer = h + mixed
        expected = after_mixer + block.mlp(block.mlp_norm(after_mixer))
        out, _ = block(h)
    torch.testing.assert_close(out, expected)


def test_decode_keeps_the_end_of_text_token() -> None:
    """Mutation ``HFTokenizer.decode``: ``skip_special_tokens=False`` -> True (an end-of-text token the
    model sampled, printed by ``innerloop generate --ignore-eos``, silently dropped) passed every test."""
    from innerloop.data.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(bos_tokenizer_json(), eos_token="</s>")
    ids = tokenizer.encode("hello world")
    assert tokenizer.decode([*ids, tokenizer.eos_id, *ids]) == "hello world</s>hello world"


def test_encode_many_encodes_as_encode_does_without_the_templates_start_token() -> None:
    """Mutation ``HFTokenizer.encode_many``: ``add_special_tokens=False`` -> True (the template's start
    token ``<s>`` put before every document the training data reads, never in a prompt) passed every test."""
    from innerloop.data.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(bos_tokenizer_json(), eos_token="</s>")
    texts = ["hello world", "def f(x): return x + 1\n", ""]
    many = tokenizer.encode_many(texts)
    assert many == [tokenizer.encode(text) for text in texts]
    assert all(0 not in ids for ids in many)  # <s> is id 0


class _UniformLogits(nn.Module):
    """A stand-in for a compared module: logits of zeros, a loss of log(vocab) on every target."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*inputs.shape, self.vocab)


def test_compare_counts_only_the_scored_targets(monkeypatch) -> None:
    """Mutation ``compare._evaluate_length``: the token counts of every target, ignored ones too (the
    recall task scores only its answers), passed every test: a recall run's compared perplexity would be
    exp(loss sum / every target), far below the true one. A uniform model's perplexity is its vocabulary."""
    from innerloop.train import compare
    from innerloop.train.data import IGNORE_INDEX

    monkeypatch.setattr(compare, "check_vocabulary", lambda *args, **kwargs: None)
    vocab = 7
    model = compare.ComparedModel("uniform", Path("x"), _UniformLogits(vocab), 0, None, None)
    inputs = torch.zeros(6, 8, dtype=torch.long)
    targets = torch.full((6, 8), IGNORE_INDEX)
    targets[:, 5:] = 3  # three scored targets per window, at the end (as the recall task's answers)
    result = compare._evaluate_length([model], inputs, targets, batch_size=4, num_buckets=2, tokenizer=None)
    assert float(result.counts.sum()) == 18
    assert result.perplexity(0) == pytest.approx(vocab, rel=1e-12)
    assert math.isnan(float(result.curve(0)[0]))  # the first bucket holds no scored target


def test_the_logged_train_loss_is_the_mean_of_this_optimizer_steps_micro_batches_only() -> None:
    """Mutation ``LanguageModelModule._optimizer_step_loss``: the reset at a new optimizer step dropped
    (``train_loss`` logged as the mean of every micro-batch since the start) passed every test."""
    from innerloop.train.module import LanguageModelModule

    module = LanguageModelModule(
        model={"mixer": "attention", "hidden_size": 32, "num_layers": 1, "num_heads": 2}
    )
    module._step_losses = (module.global_step + 1, [torch.tensor(10.0)])  # an earlier step's micro-batch
    assert float(module._optimizer_step_loss(torch.tensor(2.0))) == 2.0
    assert float(module._optimizer_step_loss(torch.tensor(4.0))) == 3.0  # this step's two micro-batches


def test_a_training_step_counts_itself_done_in_the_e2e_inner_lr_warm_up() -> None:
    """Mutation ``LanguageModelModule.training_step``: ``set_outer_progress((global_step + 1) / max_steps)``
    -> ``global_step / max_steps`` (TTT-E2E's inner lr one step behind the official schedule, 0 on the
    first step) passed every fast test (a slow training run catches it)."""
    from innerloop.train.module import LanguageModelModule

    config = {"mixer": "e2e", "hidden_size": 32, "num_layers": 4, "num_heads": 2, "e2e": {"chunk_size": 4}}
    module = LanguageModelModule(model=config, max_steps=4, warmup_steps=1)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer: nothing is logged
        module.training_step((ids, ids), 0)
    assert float(module.model.outer_progress) == 0.25  # the first step (global_step 0) counted done


def test_the_checkpoint_digest_covers_each_tensors_shape() -> None:
    """Mutation ``checkpoint_digest``: the shape left out of what is hashed (a file whose header was
    edited to read a weight's bytes in another shape would pass the check) passed every test."""
    from innerloop.checkpoints import checkpoint_digest

    weight = torch.arange(24, dtype=torch.float32)
    digests = {checkpoint_digest("{}", {"t0": weight.reshape(shape)}) for shape in [(4, 6), (6, 4), (24,)]}
    assert len(digests) == 3


def test_the_recall_tasks_validation_examples_are_none_of_its_training_examples() -> None:
    """Mutation ``RecallDataModule.make_val_examples``: its stream ``_generator(seed, -1)`` ->
    ``_generator(seed, 0)`` (validation on training batch 0's examples, a loss on trained-on data) passed
    every test."""
    from innerloop.train.data import RecallDataModule

    data = RecallDataModule(num_pairs=4, gap=8, batch_size=4, val_batches=2, seed=3)
    val_inputs, _ = data.make_val_examples()
    validation = {tuple(row.tolist()) for row in val_inputs}
    for index in range(3):
        train_inputs, _ = data.make_train_batch(index)
        assert not validation & {tuple(row.tolist()) for row in train_inputs}


@pytest.mark.parametrize("end", ["on_train_end", "on_exception"])
def test_the_ttt_base_lr_warm_up_leaves_the_model_at_its_peak_base_lr(end: str) -> None:
    """Mutation ``TTTBaseLRWarmup.on_train_end``: the reset to the peak dropped (a run stopped during
    the warm-up left its TTT layers at the warm-up's base lr, in the model evaluated and saved after it)
    passed every test; ``on_exception`` is its sibling."""
    from types import SimpleNamespace

    from innerloop.core.layer import TTTLayer
    from innerloop.train.schedules import TTTBaseLRWarmup

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(mixer="ttt", hidden_size=32, num_layers=2, num_heads=2))
    callback = TTTBaseLRWarmup(init=0.1, peak=1.0, warmup_steps=10)
    trainer = SimpleNamespace(global_step=0)
    callback.on_train_batch_start(trainer, model, None, 0)
    layers = [m for m in model.modules() if isinstance(m, TTTLayer)]
    assert len(layers) == 2 and all(layer.base_lr == pytest.approx(0.1) for layer in layers)
    if end == "on_train_end":
        callback.on_train_end(trainer, model)
    else:
        callback.on_exception(trainer, model, KeyboardInterrupt())
    assert all(layer.base_lr == 1.0 for layer in layers)


class _FakeClock:
    """Seconds that the test advances."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _throughput(clock: _FakeClock):
    from types import SimpleNamespace

    from innerloop.train.throughput import TrainingThroughput

    callback = TrainingThroughput(clock=clock, cpu_status=lambda: (1, 2, 0.1), echo=lambda line: None)
    callback.on_train_start(SimpleNamespace(is_global_zero=True), None)
    return callback


def _steps(callback, clock: _FakeClock, seconds: list[float], world_size: int = 1) -> None:
    """One training step of 4 x 8 tokens per process for each duration in ``seconds``."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(is_global_zero=True, world_size=world_size, global_step=0)
    module = SimpleNamespace(log=lambda *args, **kwargs: None)
    batch = (torch.zeros(4, 8, dtype=torch.long), None)
    for duration in seconds:
        callback.on_train_batch_start(trainer, module, batch, 0)
        clock.now += duration
        callback.on_train_batch_end(trainer, module, None, batch, 0)


def test_throughput_counts_every_process_resumes_its_wall_time_and_restarts_its_rate() -> None:
    """Mutations of ``TrainingThroughput`` that passed every fast test (its resume test is a slow training
    run): tokens not multiplied by the world size (``tokens_seen`` of one process under DDP); the wall time
    of the launches before a resume dropped; the tokens/s window not cleared at a new launch (a rate
    mixing the launches' steps)."""
    clock = _FakeClock()
    callback = _throughput(clock)
    _steps(callback, clock, [0.5, 0.5], world_size=2)
    assert callback.tokens_seen == 2 * 2 * 32
    state = callback.state_dict()
    assert state["wall_seconds"] == 1.0

    resumed_clock = _FakeClock()
    resumed_clock.now = 100.0  # another process's clock
    resumed = _throughput(resumed_clock)
    resumed.load_state_dict(state)
    _steps(resumed, resumed_clock, [2.0])
    assert resumed.tokens_seen == 2 * 2 * 32 + 32 and resumed.wall_time() == 3.0

    callback.on_train_start(type("Trainer", (), {"is_global_zero": True})(), None)  # a new launch
    _steps(callback, clock, [4.0])
    assert callback.tokens_per_second() == 32 / 4.0


def test_a_resume_supersedes_exactly_the_rows_logged_past_its_checkpoint(tmp_path) -> None:
    """Mutations of ``loggers._logged_past`` that passed every fast test (its tests are slow training
    runs): a validation row at the checkpoint's own step superseded (``val_step >= step``; that validation
    ran before the checkpoint and is not run again, so its row was lost), and a training row at the
    checkpoint's step kept (``step > step``; logged again by the resume, so it appeared twice)."""
    from innerloop.train.loggers import LOGS_DIR, SUPERSEDED_METRICS, supersede_rows_logged_past

    folder = tmp_path / LOGS_DIR / "version_0"
    folder.mkdir(parents=True)
    rows = ["step,val_step,train_loss,val_loss", "3,,1.0,", "4,,0.9,", ",4,,2.0", "5,,0.8,", ",6,,1.8"]
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert supersede_rows_logged_past(tmp_path, 4) == [folder / "metrics.csv"]
    kept = (folder / "metrics.csv").read_text(encoding="utf-8").splitlines()
    moved = (folder / SUPERSEDED_METRICS).read_text(encoding="utf-8").splitlines()
    assert kept == ["step,val_step,train_loss,val_loss", "3,,1.0,", ",4,,2.0"]
    assert moved == ["step,val_step,train_loss,val_loss", "4,,0.9,", "5,,0.8,", ",6,,1.8"]


def test_tied_weights_are_one_tensor_not_two_views_of_one_storage() -> None:
    """Mutation ``checkpoints.tied_weights``: the storage offset and strides left out of what makes two
    entries one tensor (two halves of one buffer, or a weight and its transpose, read as tied, so a
    checkpoint storing them different was refused) passed every test."""
    from innerloop.checkpoints import tied_weights

    buffer = torch.arange(32.0)
    square = torch.arange(16.0).reshape(4, 4)
    state = {"a": buffer[:16].view(4, 4), "b": buffer[16:].view(4, 4), "w": square, "w_t": square.t()}
    state["a_again"] = state["a"]
    assert tied_weights(state) == [["a", "a_again"]]
