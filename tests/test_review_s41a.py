"""Session 41a: an adversarial last look at sessions 40-41 (lr and grad_norm in the training rows, the
tokenizer memory refusal, interop's integer reading, TTT-E2E under torch.func): token ids computed inside a
torch.func grad or jvp (``batch[:, :-1]``, the usual language-model loss) are read as ids, not refused as
vmap-batched; the official TTT-E2E config's float fields read a numpy float as its model fields do;
every message of eval's and compare's --data read as records names --data; a reference config's list of
eos ids reaches a conversion's export; vmap over the Hugging Face model's ids is innerloop's one error."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, jvp, vmap

from innerloop.interop import ttt_e2e
from innerloop.models import build_model
from innerloop.train.data import DataError, dataset_tokens

OFFICIAL = json.loads((Path(__file__).resolve().parent / "data" / "e2e" / "config.json").read_text())

SECTIONS = {
    "ttt": {"vocab_size": 11, "hidden_size": 8, "num_layers": 2, "num_heads": 2},
    "e2e": {"mixer": "e2e", "vocab_size": 11, "hidden_size": 8, "num_layers": 4, "num_heads": 2}
    | {"intermediate_size": 16, "window": 4, "e2e": {"chunk_size": 16}},
}


@pytest.mark.parametrize("mixer", ["ttt", "e2e"])
@pytest.mark.filterwarnings("ignore::innerloop.models.e2e.OneChunkTrainingWarning")  # a sequence of one chunk
def test_ids_sliced_inside_a_func_grad_or_jvp_are_ids_not_a_vmap_batch(mixer):
    # grad and jvp wrap every tensor made inside them, ids too: check_token_ids read any wrapper as vmap's
    # batching and refused the usual loss, functional_call(model, params, (batch[:, :-1],)), with a
    # message naming vmap, which the caller never used
    torch.manual_seed(0)
    model = build_model(SECTIONS[mixer]).double()
    batch = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(1))
    inputs = batch[:, :-1]
    weight = model.embed.weight.detach()

    def loss(w, sliced_inside):
        ids = batch[:, :-1] if sliced_inside else inputs
        return functional_call(model, {"embed.weight": w}, (ids,))[0].square().mean()

    assert torch.equal(grad(loss)(weight, True), grad(loss)(weight, False))
    tangent = torch.ones_like(weight)
    assert torch.equal(jvp(lambda w: loss(w, True), (weight,), (tangent,))[1],
                       jvp(lambda w: loss(w, False), (weight,), (tangent,))[1])  # fmt: skip
    with pytest.raises(TypeError, match=r"input_ids is batched by a torch.func transform \(vmap\)"):
        vmap(grad(lambda w, row: functional_call(model, {"embed.weight": w}, (row[None],))[0].sum()),
             in_dims=(None, 0))(weight, inputs)  # fmt: skip


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("training", "ilr_init", 0.5), ("optimizer_inner", "lr", 0.5), ("optimizer_inner", "clip_gradient", 2.0)]
    + [("model", "resid_pdrop", 0.0)],
)
def test_official_float_fields_read_a_numpy_float_as_the_model_fields_do(section, key, value):
    # a893d14 read every integer field one way; the float fields still took two: model.rope_theta (checked_number)
    # took np.float32(5e5), while training.ilr_init, optimizer_inner.lr and clip_gradient and the fixed
    # *_pdrop refused np.float32 values equal to the float (an isinstance(int, float) check)
    config = copy.deepcopy(OFFICIAL)
    config["training"]["ilr_warmup_steps"], config["training"]["total_steps"] = 2, 8
    fields = config["training"]["optimizer_inner"] if section == "optimizer_inner" else config[section]
    fields[key] = value
    plain = ttt_e2e.model_config(config)
    fields[key] = np.float32(value)
    assert ttt_e2e.model_config(config) == plain
    fields[key] = np.float32("nan")
    with pytest.raises(ttt_e2e.OfficialConfigError, match=rf"{key}=np.float32\(nan\)"):
        ttt_e2e.model_config(config)


@pytest.mark.parametrize(
    ("files", "said"),
    [
        (["a.foo"], "paths has 'a.foo', whose suffix '.foo' is not a data format"),
        (["b.jsonl", "c.txt"], "paths mixes formats ['json', 'text']"),
        (["e.jsonl", "b.jsonl"], "which data.name='hf' cannot read as json: remove it from paths"),
        (["nothing*.jsonl"], "paths entry '{dir}/nothing*.jsonl' matches no file"),
    ],
)
def test_eval_data_read_as_records_names_data_in_every_message(tmp_path, files, said) -> None:
    # 938266d renamed 'data.paths=' in dataset_tokens' messages (eval's and compare's --data), not the
    # messages that say 'data.paths has', 'data.paths mixes', 'data.paths entry', 'remove it from data.paths';
    # called from Python they name the parameter, paths (the CLI's --data: s50m)
    (tmp_path / "a.foo").write_text("hello")
    (tmp_path / "b.jsonl").write_text('{"text": "hi there"}\n')
    (tmp_path / "c.txt").write_text("x\n")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError) as caught:
        dataset_tokens([str(tmp_path / f) for f in files], "text")
    assert said.format(dir=tmp_path) in str(caught.value)
    assert "data.paths" not in str(caught.value)


def test_a_reference_list_of_eos_ids_reaches_the_export(tmp_path) -> None:
    # check_config takes a list of eos ids (as transformers does), but special_token_ids dropped it without
    # a word: the export's generate never stopped at EOS, what a893d14 fixed for the official TTT-E2E config
    import shutil

    from innerloop.cli import main
    from innerloop.interop.ttt_lm_pytorch import special_token_ids

    assert special_token_ids({"eos_token_id": [2, np.int64(5)], "pad_token_id": 3}) == {
        "eos_token_id": [2, 5],
        "pad_token_id": 3,
    }
    assert special_token_ids({"eos_token_id": [-1, 2]}) == {"eos_token_id": [2]}  # a negative id is none
    assert special_token_ids({"eos_token_id": [-1]}) == {}
    source = tmp_path / "reference"
    shutil.copytree(Path(__file__).parent / "data" / "models" / "ttt_mlp_mamba", source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "eos_token_id": [2, 5]}))
    assert main(["convert", "ttt-lm-pytorch", str(source), str(tmp_path / "hf"), "--format", "hf"]) == 0
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "hf" / name).read_text())["eos_token_id"] == [2, 5]
    # a --tokenizer is checked against each of them: innerloop's BPE has its one special token at 0
    from innerloop.data.tokenizer import train_bpe

    train_bpe(["some text to merge some pairs of"], 270).save_pretrained(tmp_path / "bpe")
    with pytest.warns(UserWarning, match=r"\(its config\) is the ordinary token") as caught:
        code = main(
            [
                "convert",
                "ttt-lm-pytorch",
                str(source),
                str(tmp_path / "t"),
                "--tokenizer",
                str(tmp_path / "bpe"),
            ]
        )
    assert code == 0
    assert [str(w.message).split(" (its config)")[0] for w in caught][-2:] == [
        "the converted model's eos_token_id=2",
        "the converted model's eos_token_id=5",
    ]


def test_vmap_over_the_hugging_face_models_input_ids_is_the_one_error_naming_them() -> None:
    # bcec574 named vmap-batched ids for CausalLM and E2ELM (models/lm.py check_token_ids); the Hugging Face
    # model reads them first in its own check_token_ids, which met torch's bare "calling .item() on a Tensor"
    from innerloop.hf.configuration import InnerloopConfig
    from innerloop.hf.modeling import InnerloopForCausalLM

    model = InnerloopForCausalLM(InnerloopConfig(model=SECTIONS["ttt"])).eval()
    ids = torch.randint(0, 11, (2, 6))
    with pytest.raises(TypeError, match=r"input_ids is batched by a torch.func transform \(vmap\)"):
        vmap(lambda row: model(row[None]).logits[0])(ids)
    assert model(ids).logits.shape == (2, 6, 11)
