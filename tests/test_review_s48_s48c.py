"""Review s48c: the Hugging Face integration (issue 11)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from innerloop.hf import InnerloopConfig, InnerloopForCausalLM
from innerloop.hf import modeling as hf_modeling

TINY = {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 32}


def _tiny(seed: int, **model: object) -> InnerloopForCausalLM:
    torch.manual_seed(seed)
    return InnerloopForCausalLM(InnerloopConfig(model={**TINY, **model})).eval()


@pytest.mark.slow  # two saves and a from_pretrained: about 1.7 s
def test_a_save_into_a_folder_another_save_is_moving_files_into_fails_and_mixes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # two saves into one folder moved their files in one by one, interleaved: the folder ended with the
    # first save's config.json (moved last) and the second's weights, a model neither saved
    first, second = _tiny(0), _tiny(1, vocab_size=300)
    move = hf_modeling._move_saved_files
    refused: list[Exception] = []

    def move_with_a_second_save_between(staging: Path, folder: Path) -> None:
        monkeypatch.setattr(hf_modeling, "_move_saved_files", move)  # the second save moves as usual
        try:
            second.save_pretrained(folder)
        except RuntimeError as err:
            refused.append(err)
        move(staging, folder)

    monkeypatch.setattr(hf_modeling, "_move_saved_files", move_with_a_second_save_between)
    first.save_pretrained(tmp_path)
    assert refused and str(tmp_path) in str(refused[0]) and "another save" in str(refused[0])
    loaded = InnerloopForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, first(ids).logits)


def test_a_mask_inferred_from_pad_token_id_is_refused_saying_how_left_padded_prompts_are_given() -> None:
    # the refusal said "generate() supports prompts without padding only", wrong since left-padded prompts
    # are read row by row: with their attention_mask each row equals its prompt alone
    model = _tiny(0)
    ids = torch.tensor([[7, 7, 5, 6], [1, 2, 3, 4]])
    with pytest.raises(ValueError, match="pad_token_id=7") as refused:
        model.generate(ids, pad_token_id=7, max_new_tokens=2, do_sample=False)
    message = str(refused.value)
    assert "without padding only" not in message
    assert "left padding" in message and "attention_mask" in message and "padding_side='left'" in message
    mask = (ids != 7).long()
    with torch.no_grad():
        padded = model.generate(ids, attention_mask=mask, pad_token_id=7, max_new_tokens=2, do_sample=False)
        alone = model.generate(ids[:1, 2:], max_new_tokens=2, do_sample=False)
    assert torch.equal(padded[0, 2:], alone[0])


@pytest.mark.slow  # imports transformers' Trainer utilities: about 1.3 s
def test_the_label_smoother_on_a_left_padded_batch_scores_what_forward_scores_once_its_first_tokens_are_unlabelled() -> (
    None
):
    # docs/huggingface.md: the Trainer's LabelSmoother sees the collator's labels, not forward's; a
    # left-padded row's first token, labelled, is scored against the zero logits at the last pad
    from transformers.trainer_pt_utils import LabelSmoother

    model = _tiny(0).double()
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
    smoothed = LabelSmoother(epsilon=0.0)(out, labels, shift_labels=True)
    vocab = out.logits.shape[-1]
    scored = 2 + 4  # forward's: row 0's 6 and 7 (its first token follows pads alone), row 1's four
    expected = (out.loss * scored + torch.log(torch.tensor(vocab, dtype=torch.float64))) / (scored + 1)
    assert abs(float(smoothed) - float(expected)) <= 1e-12
    unlabelled = labels.clone()
    unlabelled[0, 2] = -100
    assert (
        abs(float(LabelSmoother(epsilon=0.0)(out, unlabelled, shift_labels=True)) - float(out.loss)) <= 1e-13
    )


@pytest.mark.slow  # imports Lightning and the converters first: about 2.7 s
@pytest.mark.parametrize(
    "command",
    [["export", "CHECKPOINT", "OUT"], ["convert", "ttt-lm-pytorch", "SRC", "OUT", "--format", "hf"]],
)
def test_a_command_that_needs_transformers_without_it_is_one_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    # transformers is the hf extra: without it `innerloop export` ended in a ModuleNotFoundError traceback
    import sys

    import innerloop.interop.ttt_lm_pytorch  # noqa: F401 (Lightning's and torchmetrics' imports, which
    import innerloop.train.module  # noqa: F401 look for transformers, done while it is importable)
    from innerloop.cli import main

    for name in ("innerloop.hf.export", "innerloop.hf.tokenizer"):  # imported again: they import transformers
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers: ModuleNotFoundError
    argv = [str(tmp_path / part) if part.isupper() else part for part in command]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"innerloop {command[0]}: error:") and len(error.splitlines()) == 1
    assert "'transformers'" in error and 'pip install "innerloop[hf]"' in error


def test_a_save_over_an_earlier_one_keeps_each_replaced_files_permissions(tmp_path: Path) -> None:
    # save_pretrained's files were renamed into place as written: a config.json made private (0600) by
    # its user came back 0644, and the weights 0600 whatever they had been given
    import stat

    model = _tiny(0)
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").chmod(0o600)
    (tmp_path / "model.safetensors").chmod(0o640)
    model.save_pretrained(tmp_path)
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o640
