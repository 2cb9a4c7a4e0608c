"""``import innerloop`` registers the Auto classes in either import order, without importing
transformers itself; a folder also loads where innerloop is not imported (trust_remote_code)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest
from hf_testing import tiny_hf_model

#: What the cases' imports of innerloop and transformers load that is neither (torch's dynamo, distributed
#: tensor and symbolic shapes, sympy, scipy, the hub's HTTP stack, ...): ~2/3 of a case's CPU, imported
#: once by the fork server. None of them imports innerloop, transformers, tokenizers or datasets, whose
#: import order the cases are about: the server checks that before its first case.
NEITHER = (
    "torch._dynamo",
    "torch.distributed.tensor",
    "torch.fx.experimental.symbolic_shapes",
    "scipy.optimize",
    "numpy",
    "omegaconf",
    "regex",
    "yaml",
    "jinja2",
    "PIL.Image",
    "safetensors.torch",
    "huggingface_hub",
    "accelerate",
    # what transformers and the hub load on top of those (the hub's kernels package, its HTTP client and
    # async stack, file locks, pluggy, psutil, tqdm): ~0.2 s more of each case's CPU, imported once
    "kernels",
    "httpx2",
    "httpcore2",
    "trio",
    "anyio",
    "h11",
    "filelock",
    "pluggy",
    "psutil",
    "tqdm",
)
UNDER_TEST = ("innerloop", "transformers", "tokenizers", "datasets")

FORK_SERVER = f"""
import importlib, io, json, os, sys, traceback
import torch  # what every case imports first (innerloop and transformers both do): paid once here
for name in {NEITHER!r}:
    try:
        importlib.import_module(name)
    except ImportError:  # not installed here: a case that needs it imports it itself
        pass
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {UNDER_TEST!r})
assert not loaded, f"the fork server imported what the cases test the import order of: {{loaded}}"

for line in sys.stdin:
    code, answer = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the case, in a child whose sys.modules holds torch and no innerloop or transformers
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
        status = 0
        try:
            exec(compile(code, "<fresh>", "exec"), {{"__name__": "__main__"}})
        except BaseException:
            traceback.print_exc()
            status = 1
        with open(answer, "w") as file:
            json.dump([status, sys.stdout.getvalue(), sys.stderr.getvalue()], file)
        os._exit(0)
    os.waitpid(pid, 0)
    print(answer, flush=True)
"""
"""Runs each case sent on its stdin in a fork of itself (one interpreter that has imported torch and
:data:`NEITHER`, and nothing of :data:`UNDER_TEST`): each case pays for its own imports of innerloop and
transformers, not for torch's again."""


@pytest.fixture(scope="module")
def run_fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], str]]:
    """Run code in a fresh interpreter (the import state of this one does not leak): its stdout. The
    interpreter is a fork of :data:`FORK_SERVER`'s, whose imports beyond Python's own are torch and
    :data:`NEITHER`."""
    server = subprocess.Popen(
        [sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    answers = tmp_path_factory.mktemp("fresh")

    def run(code: str) -> str:
        answer = answers / f"{len(list(answers.iterdir()))}.json"
        server.stdin.write(json.dumps([textwrap.dedent(code), str(answer)]) + "\n")
        server.stdin.flush()
        assert select.select([server.stdout], [], [], 180)[0], "the case took over 180 s"
        assert server.stdout.readline().strip() == str(answer), "the fork server ended"
        status, out, err = json.loads(answer.read_text())
        assert status == 0, err[-3000:]
        return out

    yield run
    server.stdin.close()
    server.wait(timeout=60)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("saved")
    tiny_hf_model("swa").save_pretrained(path)
    return str(path)


@pytest.mark.slow  # a fresh interpreter importing innerloop (torch: once a module, the fork server's): ~1 s
def test_import_innerloop_does_not_import_transformers(run_fresh) -> None:
    out = run_fresh("""
        import sys, innerloop
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "tokenizers", "datasets")))
    """)
    assert out.strip() == "[]"


LOAD = """
    model = AutoModelForCausalLM.from_pretrained({folder!r})
    config = AutoConfig.from_pretrained({folder!r})
    base = AutoModel.from_pretrained({folder!r})
    print(type(model).__module__, type(config).__name__, type(base).__name__)
"""


@pytest.mark.slow  # a fresh interpreter a case importing innerloop and transformers: ~4 s each
@pytest.mark.parametrize(
    "imports",
    [
        "import innerloop\nfrom transformers import AutoConfig, AutoModel, AutoModelForCausalLM",
        "from transformers import AutoConfig, AutoModel, AutoModelForCausalLM\nimport innerloop",
        "import transformers\nimport innerloop\nfrom transformers import AutoConfig, AutoModel, AutoModelForCausalLM",
    ],
    ids=["innerloop_first", "transformers_first", "transformers_then_auto_classes"],
)
def test_either_import_order_registers_the_auto_classes(imports: str, folder: str, run_fresh) -> None:
    out = run_fresh(imports + textwrap.dedent(LOAD).format(folder=folder))
    assert out.split() == ["innerloop.hf.modeling", "InnerloopConfig", "InnerloopModel"]


@pytest.mark.slow  # a fresh interpreter importing innerloop and transformers: ~4 s
def test_a_library_loading_the_auto_classes_does_not_import_the_model_until_a_config_is_built(
    run_fresh,
) -> None:
    # torchmetrics loads modeling_auto at import (so every Lightning run does): innerloop's model,
    # and transformers' modeling stack with it, must not be imported for that alone.
    out = run_fresh("""
        import sys, innerloop
        from transformers import AutoModelForCausalLM
        print("innerloop.hf.modeling" in sys.modules)
        from innerloop.hf import InnerloopConfig
        config = InnerloopConfig(model={"mixer": "swa", "hidden_size": 32, "num_heads": 2, "num_layers": 1})
        print(type(AutoModelForCausalLM.from_config(config)).__module__)
    """)
    assert out.split() == ["False", "innerloop.hf.modeling"]


@pytest.mark.slow  # a fresh interpreter importing transformers and innerloop: ~4 s
def test_a_tool_that_never_imports_innerloop_loads_with_trust_remote_code(folder: str, run_fresh) -> None:
    out = run_fresh(
        "from transformers import AutoConfig, AutoModel, AutoModelForCausalLM\n"
        + textwrap.dedent(LOAD).format(folder=folder).replace(")\n", ", trust_remote_code=True)\n", 3)
    )
    assert out.split() == ["innerloop.hf.modeling", "InnerloopConfig", "InnerloopModel"]


def test_the_hook_registers_once_and_leaves_other_imports_alone() -> None:
    from innerloop.hf import hook

    watchers = [f for f in sys.meta_path if isinstance(f, hook._AutoClassWatcher)]
    assert len(watchers) <= 1
    hook.install()  # again: nothing more
    assert len([f for f in sys.meta_path if isinstance(f, hook._AutoClassWatcher)]) == len(watchers)
    if watchers:
        assert watchers[0].find_spec("json", None) is None


@pytest.mark.slow  # a fresh interpreter importing innerloop and transformers: ~4 s
def test_a_config_built_before_the_model_is_imported_still_registers_the_model(run_fresh) -> None:
    # (review s53m) innerloop.hf.modeling's own imports load transformers' Auto classes; with a config
    # already built, the hook registered the model at once from the half-imported module, which failed
    # ("could not register ... circular import" warned) and AutoModelForCausalLM never learnt the model
    out = run_fresh("""
        import warnings; warnings.simplefilter("error")
        from innerloop.hf import InnerloopConfig
        config = InnerloopConfig(model={"mixer": "swa", "hidden_size": 32, "num_heads": 2, "num_layers": 1})
        from innerloop.hf import InnerloopForCausalLM
        from transformers import AutoModelForCausalLM
        print(type(AutoModelForCausalLM.from_config(config)).__module__)
    """)
    assert out.split() == ["innerloop.hf.modeling"]
