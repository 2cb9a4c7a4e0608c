"""Review s55p: leftovers of the s55 reviews (benchmark exit codes and path lines, the non-finite rows
recipe, export / tokenizer-cache / error-text details). Each test was seen failing before its fix."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from benchmark_testing import benchmark_script

import innerloop.kernels.triton.common as triton_common
from innerloop import TTTLayer
from innerloop.core import NonFiniteRowsError
from innerloop.core.family_layers import DeltaNetLayer
from innerloop.models import E2EConfig, ModelConfig, build_model
from innerloop.models.config import TTTConfig

# ---- kernel_speed: a row that raises fails the run --------------------------------------------------


def _kernel_speed_on_a_fake_gpu(monkeypatch, failing: set[int]) -> tuple[object, list[int]]:
    """kernel_speed with CUDA, Triton and the timing stubbed (CPU tensors, no kernel run): its timed
    calls are numbered from 0 and those in ``failing`` raise as a kernel error would."""
    script = benchmark_script("kernel_speed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(triton_common, "triton_missing", lambda: None)
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *shape, device=None, **kw: real_randn(*shape, **kw))
    monkeypatch.setattr(script, "make_inputs", lambda *a: ())
    calls: list[int] = []

    def fake_time_ms(fn, repeats: int) -> float:
        calls.append(len(calls))
        if calls[-1] in failing:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return 2.0

    monkeypatch.setattr(script, "cuda_time_ms", fake_time_ms)
    return script, calls


ARGS = ["--model", "linear", "--skip-naive-above", "0", "--min-len", "64", "--max-len", "128"]


def test_kernel_speed_exits_non_zero_when_a_row_failed_after_printing_the_rest(capsys, monkeypatch):
    # s55p (LOW-MED): every per-row exception printed "failed" and the run still exited 0
    script, calls = _kernel_speed_on_a_fake_gpu(monkeypatch, failing={1})  # triton_linear at T=64
    assert script.main(ARGS) == 1
    captured = capsys.readouterr()
    assert len(calls) == 4  # sdpa and triton_linear at 64 and 128: the rows after the failure still ran
    rows = [line.split()[:3] for line in captured.out.splitlines()[2:]]
    assert rows == [["64", "sdpa", "2.000"], ["64", "triton_linear", "failed"]] + [
        ["128", "sdpa", "2.000"],
        ["128", "triton_linear", "2.000"],
    ]
    assert "1 row(s) failed: triton_linear at T=64" in captured.err


def test_kernel_speed_exits_zero_when_every_row_ran(capsys, monkeypatch):
    script, calls = _kernel_speed_on_a_fake_gpu(monkeypatch, failing=set())
    assert script.main(ARGS) == 0
    assert len(calls) == 4 and capsys.readouterr().err == ""


# ---- generate_speed / compile_speed say which path each TTT column ran --------------------------------


@pytest.fixture
def threads():
    """The scripts' main() sets torch's thread count: restore it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # reason: loads generate_speed.py (imports innerloop.models, ~0.6 s); the models are tiny
def test_generate_speed_says_which_path_each_ttt_model_ran(capsys, monkeypatch, threads):
    """s55p (LOW): train_speed and step_profile print the path each TTT column took (``kernel="auto"``
    runs the next path where a kernel is missing or refused, timed under the same label); generate_speed
    did not. The stand-in for such a fallback: the TTT-Linear model on fused_torch_linear."""
    from innerloop.models.config import TTTConfig

    script = benchmark_script("generate_speed")
    fallback = ("TTT-Linear", {"mixer": "ttt", "ttt": TTTConfig(kernel="fused_torch_linear")})
    monkeypatch.setitem(script.MIXERS, "ttt", fallback)
    argv = ["--mixers", "ttt", "attention", "--contexts", "16", "40", "--tokens", "2", "--repeats", "1"]
    argv += ["--hidden", "8", "--heads", "2", "--layers", "1", "--window", "8", "--prefill-chunk", "32"]
    script.main([*argv, "--threads", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# ")]
    assert lines == [  # 40 = 32 + 8: the last chunk's remainder of 8 tokens runs on torch
        "# TTT-Linear ran fused_torch_linear: prefill @16",
        "# TTT-Linear ran torch: prefill @40, decoding",
    ]


@pytest.mark.slow  # reason: loads compile_speed.py (imports innerloop.models, ~0.6 s); tiny models, no compile
def test_compile_speed_says_which_path_each_ttt_model_ran(capsys, monkeypatch, threads):
    """s55p (LOW): as generate_speed, compile_speed did not say which path its TTT columns took. Here
    ``torch.compile`` stands aside (the copy runs eagerly) and the TTT-Linear model is on
    fused_torch_linear, the stand-in for ``kernel="auto"``'s fallback; attention has no TTT layer: no line."""
    from dataclasses import replace

    from innerloop.models import build_model
    from innerloop.models.config import TTTConfig

    script = benchmark_script("compile_speed")
    monkeypatch.setattr(torch, "compile", lambda model, backend: model)

    def fallback_models(args):
        base = script.common_config(args)
        torch.manual_seed(0)
        ttt = build_model(replace(base, mixer="ttt", ttt=TTTConfig(kernel="fused_torch_linear")))
        return {"TTT-Linear": ttt, "attention": build_model(replace(base, mixer="attention"))}

    monkeypatch.setattr(script, "build_models", fallback_models)
    script.main(["--quick", "--threads", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# ")]
    steps = "training step eager, training step compiled, scoring eager, scoring compiled"
    assert lines == [  # --quick: sequences of 32 tokens (2 mini-batches of 16), tokens decoded one by one
        f"# TTT-Linear ran fused_torch_linear: {steps}",
        "# TTT-Linear ran torch: decoding eager, decoding compiled",
    ]


# ---- NonFiniteRowsError: the recipe the message prints runs -------------------------------------------

RECIPE = re.compile(r"from (state=None|state\.index_select\(torch\.tensor\(error\.finite_rows\)[^)]*\))")


def _recipe(error: Exception) -> str:
    """The state expression the error's message tells a caller to rerun ``error.finite_rows`` from."""
    found = RECIPE.search(str(error))
    assert found, str(error)
    return found.group(1).removeprefix("state=")


def _layer_and_overflowing_call(kind: str):
    """A layer, its state after 6 tokens of ``x [3, 12, 16]`` and the rest of ``x`` with row 1's input
    overflowing (finite, 3e38): row 1 goes non-finite, rows 0 and 2 stay finite."""
    torch.manual_seed(0)
    if kind == "delta":
        layer = DeltaNetLayer(16, 2)
    else:
        layer = TTTLayer(16, 2, mini_batch_size=4, inner_loss=kind)
    x = torch.randn(3, 12, 16)
    _, state = layer(x[:, :6])
    broken = x[:, 6:].clone()
    broken[1, 2] = 3e38
    return layer, x, state, broken


@pytest.mark.slow  # reason: two calls and the output check's diagnosis; the first use of a kernel (~1-8 s loaded)
@pytest.mark.parametrize("kind", ["next_token", "reconstruction", "delta"])
def test_the_printed_recipe_reruns_a_layer_s_finite_rows(kind) -> None:
    """s55p (LOW): the message said ``state.index_select(torch.tensor(error.finite_rows))``, which raises
    for a TTTState whose ``loss_carry`` holds values (inner loss next_token): 'pass inner_loss='."""
    layer, x, state, broken = _layer_and_overflowing_call(kind)
    with pytest.raises(NonFiniteRowsError) as caught:
        layer(broken, state)
    error = caught.value
    assert error.finite_rows == [0, 2], str(error)
    selected = eval(_recipe(error), {"torch": torch, "state": state, "error": error, "layer": layer})
    rows = torch.tensor(error.finite_rows)
    resumed, _ = layer(x[rows, 6:], selected)
    torch.testing.assert_close(resumed, layer(x[:, 6:], state)[0][rows])  # float32 default tolerance


@pytest.mark.slow  # reason: a call and the output check's diagnosis (~0.5 s; more on a loaded machine)
def test_the_printed_recipe_of_a_call_from_no_state_says_none() -> None:
    """s55p (LOW): from ``state=None`` the message said ``state.index_select(...)``: None has none."""
    layer, x, _, _ = _layer_and_overflowing_call("reconstruction")
    broken = x.clone()
    broken[1, 2] = 3e38
    with pytest.raises(NonFiniteRowsError) as caught:
        layer(broken)
    assert _recipe(caught.value) == "None", str(caught.value)
    assert "state.index_select" not in str(caught.value)


@pytest.mark.slow  # reason: a language model's calls and the layer's diagnosis (~1 s; more on a loaded machine)
def test_a_language_model_s_state_selects_as_the_printed_alternative() -> None:
    """Inside a language model the layer raises with its own TTTState's recipe (inner_loss=); the
    message names the model state's form too, which runs."""
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=16, num_heads=2, num_layers=1, vocab_size=32, mixer="ttt")
    model = build_model(replace(config, ttt=TTTConfig(inner_loss="next_token", mini_batch_size=4))).eval()
    ids = torch.randint(0, 32, (3, 12))
    with torch.no_grad():
        _, state = model(ids[:, :6])
        expected, _ = model(ids[:, 6:], state)
        inner = state.blocks[0].mixer.params
        inner["W1"] = inner["W1"].clone()  # a broadcast view of one row: its own rows
        inner["W1"][1] = float("nan")  # row 1 of the state given goes on NaN
        with pytest.raises(NonFiniteRowsError) as caught:
            model(ids[:, 6:], state)
        said = str(caught.value)
        assert "inner_loss=layer.inner_loss" in said and "state.index_select(rows)" in said, said
        rows = torch.tensor(caught.value.finite_rows)
        resumed, _ = model(ids[rows, 6:], state.index_select(rows))
    torch.testing.assert_close(resumed, expected[rows])  # float32 default tolerance


@pytest.mark.slow  # reason: a tiny TTT-E2E model's calls with the inner-loop check (~1 s; more on a loaded machine)
@pytest.mark.parametrize("from_a_state", [False, True])
def test_the_printed_recipe_reruns_e2e_s_finite_rows(from_a_state) -> None:
    """TTT-E2E's NonFiniteInnerStepError prints the same recipe: E2EState.index_select, or from None."""
    torch.manual_seed(0)
    config = ModelConfig(mixer="e2e", window=8, hidden_size=16, num_heads=2, num_layers=2, vocab_size=32)
    model = build_model(replace(config, e2e=E2EConfig(chunk_size=4))).eval()
    ids = torch.randint(0, 7, (3, 12))  # ids below 7: finite rows
    with torch.no_grad():
        model.embed.register_forward_hook(
            lambda module, inputs, out: out.masked_fill((inputs[0] == 7)[..., None], float("nan"))
        )
        state = model(ids[:, :4])[1] if from_a_state else None
        expected, _ = model(ids[:, 4:], state)
        broken = ids[:, 4:].clone()
        broken[1, 1] = 7  # row 1's hidden state NaN
        with pytest.raises(NonFiniteRowsError) as caught:
            model(broken, state)
        error = caught.value
        selected = eval(_recipe(error), {"torch": torch, "state": state, "error": error})
        rows = torch.tensor(error.finite_rows)
        resumed, _ = model(ids[rows, 4:], selected)
    torch.testing.assert_close(resumed, expected[rows])  # float32 default tolerance


# ---- item 3: export, tokenizer-cache and message details ------------------------------------------------


def test_a_type_names_its_article_by_sound() -> None:
    from innerloop.core.wording import a_type

    class UnknownTokenizer: ...

    class Union: ...

    said = [a_type(v) for v in (3, [], object(), {}.items(), UnknownTokenizer(), Union(), None)]
    assert said == [
        "an int",
        "a list",
        "an object",
        "a dict_items",
        "an UnknownTokenizer",
        "a Union",
        "a NoneType",
    ]


def test_a_registration_hook_returning_an_int_is_said_in_english() -> None:
    # s55p (LOW): "its hook register_inner_losses returned a int"
    from types import SimpleNamespace

    from innerloop.registry.manager import _returned_error

    said = str(_returned_error("my_plugin", SimpleNamespace(hook="register_inner_losses"), 3))
    assert "returned an int, which would be silently dropped" in said, said


def test_a_lightning_key_given_twice_is_named_as_the_user_wrote_it() -> None:
    # s55p (LOW): the warning named the internal key 'trainer.lightning.max_time'
    from innerloop.config.load import _warn_keys_given_twice

    with pytest.warns(UserWarning) as caught:
        _warn_keys_given_twice(["trainer.max_time=00:01:00:00", "trainer.max_time=00:02:00:00"])
    said = str(caught[0].message)
    assert said.startswith("config key 'trainer.max_time' is given twice"), said
    assert "lightning" not in said


def test_the_tokenizer_cache_stamp_tells_a_file_of_another_file_system(tmp_path, monkeypatch) -> None:
    """s55p (LOW): a tokenizer file replaced by one of another file system with the same inode number,
    times and size had the same stamp, so the cached tokenizer of the old file was used."""
    import os
    from types import SimpleNamespace

    from innerloop.data import tokenizer

    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    real_stat = os.stat
    device = [1]

    def on_device(target, *args, **kwargs):  # noqa: ANN001, ANN202
        stat = real_stat(target, *args, **kwargs)
        if os.fspath(target) != os.fspath(path):
            return stat
        fields = ("st_mode", "st_ino", "st_mtime_ns", "st_size", "st_ctime_ns", "st_mtime", "st_nlink")
        return SimpleNamespace(**{name: getattr(stat, name) for name in fields}, st_dev=device[0])

    monkeypatch.setattr(os, "stat", on_device)
    before = tokenizer._stamp(path)
    device[0] = 2  # the same inode, times and size on another file system
    assert tokenizer._stamp(path) != before


@pytest.mark.slow  # reason: imports transformers (innerloop.hf), ~2 s on a cold process
def test_a_python_built_config_s_token_index_refusal_names_the_config_not_config_json() -> None:
    # s55p (LOW): 'config.json's innerloop_token_index_dtype=[...]' for a config that has no config.json
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    model = {"hidden_size": 8, "num_heads": 2, "num_layers": 1, "intermediate_size": 16, "vocab_size": 20}
    config = InnerloopConfig(model=model, innerloop_token_index_dtype=["float64", "float64"])
    with pytest.raises(
        ValueError, match=r"^InnerloopConfig\.innerloop_token_index_dtype=\[.*\] has 2 entries"
    ) as caught:
        InnerloopForCausalLM(config)
    assert "the model has 1 TTT layer (one entry each)" in str(caught.value)  # was "1 TTT layers"
