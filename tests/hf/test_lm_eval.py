"""lm-eval-harness on an exported folder, offline: ``lm_eval run --model hf`` (a subprocess that never
imports innerloop, so the folder's trust_remote_code modules load it) on a local task with one
loglikelihood and one generate_until task; the scores equal a direct computation with innerloop.

The command is lm-eval's own command line (its ``cli_evaluate``, as the ``lm_eval`` script runs it) with
one change: its task index reads only ``--include_path``, not lm-eval's ~14,000 built-in task YAMLs
(two thirds of the run's time, none of it innerloop's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_testing import TINY

from innerloop.cli import main
from innerloop.models import CausalLM, ModelConfig, generate
from innerloop.train.module import save_model_checkpoint

GENERATED = 6  # max_gen_toks of the generate_until task

TASKS = """\
task: innerloop_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{completion}}}}"
target_delimiter: ""
{extra}metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
GENERATION = f"""generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {GENERATED}
  do_sample: false
"""

LM_EVAL = """\
import sys
from lm_eval.tasks import TaskManager

index_all = TaskManager.__init__


def index_include_path_only(self, *args, **kwargs):
    index_all(self, *args, **{**kwargs, "include_defaults": False})


TaskManager.__init__ = index_include_path_only
from lm_eval.__main__ import cli_evaluate

sys.argv[0] = "lm_eval"
sys.exit(cli_evaluate())
"""
"""``lm_eval`` (its console script's code) whose task index leaves out lm-eval's built-in tasks."""


def ascii_model() -> CausalLM:
    """A tiny untied model whose most likely byte is always printable ASCII (the rows of every other
    byte in its LM head are zero), so its greedy text is valid UTF-8 that lm-eval can compare."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_dict({**TINY, "tie_embeddings": False})).eval()
    with torch.no_grad():
        printable = torch.zeros(256, dtype=torch.bool)
        printable[32:127] = True
        model.lm_head.weight[~printable] = 0
        model.lm_head.weight[printable] *= 50
    return model


def greedy_text(model: CausalLM, context: str, tokens: int) -> str:
    prompt = torch.tensor([list(context.encode())])
    return bytes(int(t) for t, _ in generate(model, prompt, tokens, temperature=0)).decode()


def direct_loglikelihood(model: CausalLM, context: str, completion: str) -> tuple[float, bool]:
    """Sum of the completion's log-probabilities after the context, and whether each of its bytes is
    the most likely one."""
    ids = torch.tensor([list((context + completion).encode())])
    start = len(context.encode())
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
    logprobs = torch.log_softmax(logits[0, start - 1 :].double(), dim=-1)  # [len(completion), V]
    targets = ids[0, start:]
    total = logprobs.gather(1, targets[:, None]).sum().item()
    return total, bool((logprobs.argmax(-1) == targets).all())


@pytest.mark.slow  # lm_eval in a subprocess imports torch, transformers, datasets and lm-eval: ~10-30 s
def test_lm_eval_scores_equal_a_direct_computation(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is the hf extra (pip install -e '.[hf]')")
    pytest.importorskip(
        "accelerate", reason="lm_eval's hf model needs accelerate (pip install 'lm-eval[hf]')"
    )
    model = ascii_model()
    checkpoint = save_model_checkpoint(model, tmp_path / "run" / "last.safetensors")
    assert main(["export", str(checkpoint), str(tmp_path / "exported")]) == 0

    # no context ends in whitespace: lm-eval moves trailing whitespace into the continuation
    contexts = ["def f(x):", "import os", "class A:", "for i in"]
    completions = [greedy_text(model, c, GENERATED) for c in contexts[:2]] + [" pass", " range"]
    data = tmp_path / "docs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"context": c, "completion": t}) + "\n"
            for c, t in zip(contexts, completions, strict=True)
        )
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, output_type, metric, extra in [
        ("ll", "loglikelihood", "acc", ""),
        ("gen", "generate_until", "exact_match", GENERATION),
    ]:
        text = TASKS.format(name=name, data=data, output_type=output_type, metric=metric, extra=extra)
        (tasks / f"{name}.yaml").write_text(text)

    results = tmp_path / "results"
    command = [
        sys.executable,
        "-c", LM_EVAL,
        "run",
        "--model", "hf",
        "--model_args", f"pretrained={tmp_path / 'exported'},trust_remote_code=True",
        "--tasks", "innerloop_ll", "innerloop_gen",
        "--include_path", str(tasks),
        "--device", "cpu",
        "--batch_size", "1",
        "--output_path", str(results),
        "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    [summary] = results.rglob("results_*.json")
    scores = json.loads(summary.read_text())["results"]
    direct = [direct_loglikelihood(model, c, t) for c, t in zip(contexts, completions, strict=True)]
    assert scores["innerloop_ll"]["acc,none"] == pytest.approx(sum(g for _, g in direct) / 4)
    assert scores["innerloop_ll"]["acc,none"] == 0.5  # the two greedy completions, and only they
    [ll_samples] = results.rglob("samples_innerloop_ll_*.jsonl")
    for line in ll_samples.read_text().splitlines():
        sample = json.loads(line)
        logprob, is_greedy = sample["resps"][0][0]
        expected, expected_greedy = direct[sample["doc_id"]]
        assert float(logprob) == pytest.approx(expected, abs=1e-4)
        assert (is_greedy == "True") == expected_greedy

    generated = [greedy_text(model, c, GENERATED) for c in contexts]
    expected_matches = [g == t for g, t in zip(generated, completions, strict=True)]
    assert scores["innerloop_gen"]["exact_match,none"] == pytest.approx(sum(expected_matches) / 4) == 0.5
    [gen_samples] = results.rglob("samples_innerloop_gen_*.jsonl")
    for line in gen_samples.read_text().splitlines():
        sample = json.loads(line)
        assert sample["resps"][0][0] == generated[sample["doc_id"]]
