"""data.name=hf: local datasets of every format give the same packed windows, streaming or not;
validation is deterministic and shares no document with training; the stream position in a
checkpoint resumes exactly (a run killed with SIGKILL ends bit-identical to one never interrupted);
what cannot be read is one clear error. Local files only."""

from __future__ import annotations

import csv
import json
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lm_testing import TINY as TINY_RUN
from lm_testing import kill_a_forked_training_run

from innerloop.cli import main
from innerloop.config import load_config
from innerloop.config.load import ConfigError
from innerloop.data.packing import START, is_validation, packed_windows, validation_windows
from innerloop.data.text import DataError
from innerloop.train import load_checkpoint, train
from innerloop.train.data import HFDataModule

DOCUMENTS = [
    f"document {i}: " + " ".join(f"w{(i * 7 + j) % 23}" for j in range(3 + (i * 5) % 17)) for i in range(40)
]
"""One line each (the text format reads a document per line)."""

SEQ_LEN, BATCH = 16, 4

TINY = [*TINY_RUN, f"data.seq_len={SEQ_LEN}", f"data.batch_size={BATCH}"]  # later overrides win


def _write(folder: Path, fmt: str) -> str:
    """``DOCUMENTS`` as a dataset of format ``fmt`` in ``folder``; the data.paths entry."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    records = [{"text": d, "id": i} for i, d in enumerate(DOCUMENTS)]
    if fmt == "jsonl":
        (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(folder / "d.jsonl")
    if fmt == "json":
        (folder / "d.json").write_text(json.dumps(records))
        return str(folder / "d.json")
    if fmt == "text":
        (folder / "d.txt").write_text("".join(d + "\n" for d in DOCUMENTS))
        return str(folder / "d.txt")
    if fmt == "csv":
        with (folder / "d.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, ["text", "id"])
            writer.writeheader()
            writer.writerows(records)
        return str(folder / "d.csv")
    table = datasets.Dataset.from_list(records)
    if fmt == "parquet":
        table.to_parquet(str(folder / "d.parquet"))
        return str(folder / "d.parquet")
    if fmt == "saved":
        table.save_to_disk(str(folder / "saved"))
        return str(folder / "saved")
    assert fmt == "saved-dict"
    other = datasets.Dataset.from_list([{"text": "another split", "id": -1}])
    datasets.DatasetDict({"train": table, "test": other}).save_to_disk(str(folder / "saved-dict"))
    return str(folder / "saved-dict")


FORMATS = ["jsonl", "json", "text", "csv", "parquet", "saved", "saved-dict"]


def _module(path: str, streaming: bool, **kwargs) -> HFDataModule:
    module = HFDataModule(
        [path], streaming=streaming, seq_len=SEQ_LEN, batch_size=BATCH, val_batches=2, **kwargs
    )
    module.setup()
    return module


def _batches(module: HFDataModule, count: int) -> list[torch.Tensor]:
    """The first ``count`` training batches as windows ``[B, T + 1]`` (the inputs and the last target)."""
    loader = iter(module.train_dataloader())
    return [torch.cat([inputs, targets[:, -1:]], dim=1) for inputs, targets in islice(loader, count)]


def _expected_stream(validation: bool) -> list[int]:
    """The byte tokens of the training (or validation) documents, each followed by the NUL separator."""
    held = [d for i, d in enumerate(DOCUMENTS) if is_validation(i, 0.1) == validation]
    return [t for d in held for t in (*d.encode(), 0)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_local_format_streaming_or_not_packs_the_documents_in_order(tmp_path, fmt) -> None:
    path = _write(tmp_path, fmt)
    stream = _expected_stream(validation=False)
    for streaming in (False, True):
        module = _module(path, streaming)
        batches = _batches(module, 3)  # [B, T + 1] each: inputs and the last target
        windows = [row for batch in batches for row in batch.tolist()]
        for k, window in enumerate(windows):  # windows of T + 1 tokens every T tokens
            assert window[:-1] == stream[k * SEQ_LEN : (k + 1) * SEQ_LEN]
            assert window[1:] == stream[k * SEQ_LEN + 1 : (k + 1) * SEQ_LEN + 1]
        inputs, targets = module.val_examples
        val = _expected_stream(validation=True)
        assert (
            inputs[0].tolist() == val[:SEQ_LEN] and targets[1].tolist() == val[SEQ_LEN + 1 : 2 * SEQ_LEN + 1]
        )


def test_validation_holds_out_every_tenth_document_and_training_never_reads_them() -> None:
    assert [i for i in range(40) if is_validation(i, 0.1)] == [9, 19, 29, 39]
    assert [i for i in range(9) if is_validation(i, 0.25)] == [3, 7]

    def reader(validation: bool):
        def read(epoch: int, first: int):
            for number in range(first, 40):
                if is_validation(number, 0.1) == validation:
                    yield number, [1000 + number] * 6  # each token names its document

        return read

    train_tokens = {t for window, _ in islice(packed_windows(reader(False), 7), 60) for t in window}
    val_tokens = {t for w in validation_windows(reader(True), 7, 100) for t in w}
    assert val_tokens == {1009, 1019, 1029, 1039} and not train_tokens & val_tokens
    assert len(train_tokens) == 36  # and training cycles over every other document


@pytest.mark.slow  # resumes from every recorded position: ~0.4 s
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=12),
    seq_len=st.integers(1, 9),
    stop=st.integers(0, 25),
)
def test_packed_windows_resumed_from_any_recorded_position_continue_exactly(lengths, seq_len, stop) -> None:
    if sum(lengths) < seq_len + 1:
        return  # too little data: covered by the error test below
    documents = [[100 * d + t for t in range(n)] for d, n in enumerate(lengths)]

    def read(epoch: int, first: int):
        for number in range(first, len(documents)):
            yield number, [epoch * 10_000 + t for t in documents[number]]

    uninterrupted = [window for window, _ in islice(packed_windows(read, seq_len), stop + 10)]
    stream = [epoch * 10_000 + t for epoch in range(200) for d in documents for t in d]  # epoch after epoch
    for k, window in enumerate(uninterrupted):
        assert window == stream[k * seq_len : k * seq_len + seq_len + 1]
    positions = [START] + [position for _, position in islice(packed_windows(read, seq_len), stop)]
    resumed = [window for window, _ in islice(packed_windows(read, seq_len, positions[stop]), 10)]
    assert resumed == uninterrupted[stop : stop + 10]


def test_data_module_state_resumes_the_stream_at_the_step_reached(tmp_path) -> None:
    path = _write(tmp_path, "jsonl")
    for streaming in (False, True):
        uninterrupted = _batches(_module(path, streaming), 8)
        module = _module(path, streaming)
        loader = iter(module.train_dataloader())
        for _ in range(5):  # the Trainer fetches ahead of the step it checkpoints
            next(loader)
        module.trainer = SimpleNamespace(
            global_step=3, accumulate_grad_batches=1, world_size=1, global_rank=0
        )
        state = module.state_dict()
        assert state["batch"] == 3 and isinstance(state["position"], list)
        for accumulation in (1, 2):  # a resume may change trainer.* (the stream goes on where it was)
            resumed = _module(path, streaming)
            resumed.load_state_dict(json.loads(json.dumps(state)))  # as the checkpoint's JSON tree holds it
            resumed.trainer = SimpleNamespace(
                global_step=3, accumulate_grad_batches=accumulation, world_size=1, global_rank=0
            )
            assert all(
                torch.equal(a, b) for a, b in zip(_batches(resumed, 5), uninterrupted[3:], strict=True)
            )
            resumed.trainer.global_step = 4  # one more optimizer step: `accumulation` batches later
            assert resumed.state_dict()["batch"] == 3 + accumulation


def test_two_ranks_read_alternate_batches_of_the_one_stream(tmp_path) -> None:
    path = _write(tmp_path, "jsonl")
    single = _batches(_module(path, False), 6)
    for rank in (0, 1):
        module = _module(path, False)
        module.trainer = SimpleNamespace(
            global_step=0, accumulate_grad_batches=1, world_size=2, global_rank=rank
        )
        assert all(torch.equal(a, b) for a, b in zip(_batches(module, 3), single[rank::2], strict=True))


# -- errors -----------------------------------------------------------------------------------------------


def test_what_cannot_be_read_is_one_error_naming_the_setting(tmp_path, capsys) -> None:
    jsonl = _write(tmp_path / "a", "jsonl")
    csv_path = _write(tmp_path / "b", "csv")
    odd = tmp_path / "d.xml"
    odd.write_text("<a/>")
    cases = {
        "data.paths=[wikitext]": "is not a local file or folder: data.name='hf' reads local files only",
        f"data.paths=[{odd}]": "suffix '.xml' is not a data format",
        f"data.paths=[{jsonl},{csv_path}]": "mixes formats ['csv', 'json']",
        "data.paths=[]": "data.name='hf' needs data.paths",
        "data.text_field=''": "data.text_field='' must name a column",
        "data.val_fraction=0": "data.val_fraction=0 holds out no validation documents",
    }
    for override, message in cases.items():
        overrides = [override] if override.startswith("data.paths") else [f"data.paths=[{jsonl}]", override]
        with pytest.raises(
            ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")
        ):
            load_config("tiny", ["data.name=hf", *overrides, f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(
        DataError, match=r"^text_field='body' is not a field of the dataset; its fields: \['id', 'text'\]"
    ):  # a DataModule built by hand names its arguments (s58c)
        _module(jsonl, False, text_field="body")
    with pytest.raises(DataError, match=r"^text_field='body'.*\['id', 'text'\]"):  # built by hand (s58c)
        _module(jsonl, True, text_field="body")
    with pytest.raises(
        DataError,
        match=r"^text_field='id' of document 0 .* is an int \(0\); every document's text must be a string",
    ):
        _module(jsonl, True, text_field="id")
    saved = _write(tmp_path / "c", "saved-dict")
    with pytest.raises(DataError, match=r"^split='validation' is not a split of .*\['test', 'train'\]"):
        HFDataModule([saved], split="validation").setup()
    with pytest.raises(DataError, match="(?<![.])split='validation'"):
        HFDataModule([jsonl], split="validation").setup()
    for key in ("data.streaming=true", "data.split=test", "data.text_field=body"):
        with pytest.raises(ConfigError, match=f"{key.split('=')[0]}=.* applies to data.name='hf' only"):
            load_config("tiny", [key, f"out_dir={tmp_path / 'run'}"])
    assert main(["train", "data.name=hf", "data.paths=[wikitext]", f"out_dir={tmp_path / 'run'}"]) == 2
    assert "reads local files only" in capsys.readouterr().err


def test_too_little_data_for_a_window_is_one_error(tmp_path) -> None:
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"d{i}"}) + "\n" for i in range(12)))
    with pytest.raises(
        DataError, match="validation documents hold fewer than seq_len"
    ):  # a DataModule built by hand names its arguments (s58c)
        _module(str(small), True)

    def read(epoch: int, first: int):
        yield from [(0, [1, 2]), (1, [3])][first:]

    with pytest.raises(DataError, match="the training documents hold 3 tokens, fewer than data.seq_len"):
        next(packed_windows(read, 5))


def test_the_split_slices_and_the_tokenizer_apply(tmp_path) -> None:
    from innerloop.data.tokenizer import train_bpe

    path = _write(tmp_path, "jsonl")
    tokenizer = train_bpe(DOCUMENTS, 300)
    module = _module(path, False, tokenizer=tokenizer)
    windows = _batches(module, 1)[0].tolist()
    stream = [
        t for i, d in enumerate(DOCUMENTS) if not is_validation(i, 0.1) for t in (*tokenizer.encode(d), 0)
    ]
    assert windows[0] == stream[: SEQ_LEN + 1]
    half = HFDataModule([path], split="train[:50%]", seq_len=4, batch_size=1, val_batches=1)
    half.setup()
    assert len(half.dataset) == 20


# -- a killed run resumes bit-identically -----------------------------------------------------------------

# killed after step 2 (its checkpoint), then resumed for steps 3 and 4, which read batches the killed run had not
STEPS = 4


def _run(path: str, streaming: bool, out: Path) -> list[str]:
    return ["data.name=hf", f"data.paths=[{path}]", f"data.streaming={streaming}", *TINY,
            f"trainer.max_steps={STEPS}", f"out_dir={out}"]  # fmt: skip


@pytest.mark.slow  # ~35 s each here: three training runs, one of them a process of its own that is killed
@pytest.mark.parametrize("streaming", [False, True], ids=["arrow", "streaming"])
def test_a_killed_hf_run_resumes_bit_identical_to_an_uninterrupted_one(
    tmp_path, streaming, block_server
) -> None:
    path = _write(tmp_path / "data", "jsonl")
    reference, _ = load_config("tiny", _run(path, streaming, tmp_path / "reference"))
    reference_result = train(reference)

    out = tmp_path / "killed"
    checkpoint = out / "last.safetensors"
    # the killed run is forked from the warm block server (a process of its own, SIGKILLed) where it forks
    killed_at = kill_a_forked_training_run(
        block_server, _run(path, streaming, out), checkpoint, tmp_path / "job"
    )
    assert killed_at is not None and killed_at < STEPS, "the run was not killed in the middle"
    assert load_checkpoint(checkpoint)["HFDataModule"]["batch"] == killed_at

    run, cfg = load_config(str(out / "config.yaml"))
    result = train(run, cfg, resume=True)
    assert result.metrics["val_loss"] == reference_result.metrics["val_loss"]
    ours, theirs = load_checkpoint(checkpoint), load_checkpoint(reference_result.checkpoint)
    assert ours["HFDataModule"] == theirs["HFDataModule"]
    for key, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], value), key


@pytest.mark.parametrize("texts", [["", "", ""], [None]])
def test_documents_without_text_are_refused_before_a_run_with_what_is_valid(tmp_path, texts) -> None:
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    message = "is empty in every document" if texts[0] == "" else r"missing or null .* must be a string"
    with pytest.raises((ConfigError, DataError), match=message):
        load_config("tiny", ["data.name=hf", f"data.paths=[{jsonl}]", f"out_dir={tmp_path / 'run'}"])
