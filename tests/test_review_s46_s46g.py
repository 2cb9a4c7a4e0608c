"""Review s46g (the session's dtype checks, TTT-E2E's ``model.e2e.non_finite``):
- an E2E inner step's non-finite check, raised while training, stops the run as a divergence
  (:class:`TrainingDivergedError`, its pending checkpoint dropped), as a TTT layer's plugin NaN does, not as a
  bare ValueError, which the checkpoint callback took for a crash and promoted the pending checkpoint on.
"""

from __future__ import annotations

import warnings

import torch

from innerloop.models import E2EConfig, ModelConfig
from innerloop.train import LanguageModelModule, TrainingDivergedError


def _e2e_module() -> LanguageModelModule:
    torch.manual_seed(0)
    e2e = E2EConfig(chunk_size=4, suffix_fraction=0.5, inner_lr_warmup_fraction=0.0)
    config = ModelConfig(
        mixer="e2e",
        vocab_size=11,
        hidden_size=8,
        num_layers=2,
        num_heads=2,
        intermediate_size=12,
        window=4,
        e2e=e2e,
    )
    return LanguageModelModule(config, lr=1e-3, max_steps=2, warmup_steps=0)


def test_an_e2e_rule_going_non_finite_in_training_is_a_divergence_naming_the_rule(monkeypatch) -> None:
    module = _e2e_module()
    rule = module.model.update_rule
    step = rule.step

    def nan_step(fast, *args, **kwargs):  # a plugin fault that only real data triggers
        return {k: v * float("nan") for k, v in step(fast, *args, **kwargs).items()}

    monkeypatch.setattr(rule, "step", nan_step)  # the registry's one instance: put back after the test
    ids = torch.randint(0, 11, (2, 17), generator=torch.Generator().manual_seed(0))
    try:
        module.training_step((ids[:, :-1], ids[:, 1:]), 0)
    except TrainingDivergedError as error:
        message = str(error)
    else:
        raise AssertionError("no divergence raised")
    assert (
        "step returned non-finite fast weights" in message
        and "model update rule 'score_first_sgd'" in message
    )


def test_an_export_written_before_e2e_non_finite_existed_loads_without_a_warning() -> None:
    # the option changes no number the model computes: a config.json from before it describes the same
    # model, and "lacks model.e2e.non_finite ... may describe another model" was a false alarm
    from innerloop.hf import InnerloopConfig

    model = ModelConfig(mixer="e2e", vocab_size=11, hidden_size=8, num_heads=2, window=4).to_dict()
    del model["e2e"]["non_finite"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = InnerloopConfig.from_dict({"model_type": "innerloop", "model": model})
    assert config.model_config.e2e.non_finite == "raise"


def test_a_head_untied_by_hand_is_saved_not_dropped(tmp_path) -> None:
    # _keys_to_ignore_on_save named the head whenever the config tied it: a head given its own weight after
    # construction was left out of save_pretrained's file, and the reloaded model tied it to the embedding
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM
    from innerloop.models import ModelConfig

    torch.manual_seed(0)
    model = InnerloopForCausalLM(
        InnerloopConfig(model=ModelConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2))
    )
    assert model.config.tie_word_embeddings and model._keys_to_ignore_on_save  # tied: saved once
    head = model.model.lm_head
    head.weight = torch.nn.Parameter(torch.randn_like(head.weight))
    assert not model._keys_to_ignore_on_save
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: both present with different values, so not tied
        loaded = InnerloopForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.lm_head.weight, head.weight)
