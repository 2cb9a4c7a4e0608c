"""``import innerloop`` registers the Auto classes in either import order, without importing
transformers itself; a folder also loads where innerloop is not imported (trust_remote_code)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from hf_testing import tiny_hf_model


def run_fresh(code: str) -> str:
    """Run ``code`` in a fresh interpreter (the import state of this one does not leak); its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("saved")
    tiny_hf_model("swa").save_pretrained(path)
    return str(path)


@pytest.mark.slow  # a fresh interpreter importing torch: ~5 s
def test_import_innerloop_does_not_import_transformers() -> None:
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


@pytest.mark.slow  # two fresh interpreters importing torch and transformers: ~10 s
@pytest.mark.parametrize(
    "imports",
    [
        "import innerloop\nfrom transformers import AutoConfig, AutoModel, AutoModelForCausalLM",
        "from transformers import AutoConfig, AutoModel, AutoModelForCausalLM\nimport innerloop",
        "import transformers\nimport innerloop\nfrom transformers import AutoConfig, AutoModel, AutoModelForCausalLM",
    ],
    ids=["innerloop_first", "transformers_first", "transformers_then_auto_classes"],
)
def test_either_import_order_registers_the_auto_classes(imports: str, folder: str) -> None:
    out = run_fresh(imports + textwrap.dedent(LOAD).format(folder=folder))
    assert out.split() == ["innerloop.hf.modeling", "InnerloopConfig", "InnerloopModel"]


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: ~6 s
def test_a_library_loading_the_auto_classes_does_not_import_the_model_until_a_config_is_built() -> None:
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


@pytest.mark.slow  # a fresh interpreter: ~5 s
def test_a_tool_that_never_imports_innerloop_loads_with_trust_remote_code(folder: str) -> None:
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


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: ~6 s
def test_a_config_built_before_the_model_is_imported_still_registers_the_model() -> None:
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
