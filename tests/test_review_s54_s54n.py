"""Review s54n: mutation audit of config/trainer_args, config/schema, checkpoints, kernels/dispatch,
registry/settings and registry/verdicts -- tests that kill the mutants the existing tests let survive."""

from __future__ import annotations

import dataclasses
import sys
from types import SimpleNamespace
from typing import Literal

import pytest
import torch

from innerloop import checkpoints
from innerloop.config import trainer_args
from innerloop.core.layer import TTTLayer
from innerloop.kernels import dispatch
from innerloop.kernels.dispatch import capability_refusal, verify_refusal
from innerloop.kernels.spec import KernelInputs
from innerloop.registry.settings import plugin_settings
from innerloop.registry.verdicts import _MAX_ENTRIES, PassedChecks, behaviour_key, not_reusable


class _NamedByAttribute:
    """A plugin object that keeps its name as an instance attribute beside one setting."""

    def __init__(self) -> None:
        self.name = "named_by_attribute"
        self.delta = 2.0


@dataclasses.dataclass
class _NamedDataclass:
    """A dataclass plugin with a ``name`` field beside one setting."""

    name: str = "named_dataclass"
    scale: float = 0.5


def test_plugin_settings_leave_out_the_name_attribute() -> None:
    """The name is the record's key: recorded again as a setting, every checkpoint saved before (whose
    record has no ``name`` setting) would differ from the plugin registered now."""
    assert plugin_settings(_NamedByAttribute()) == {"delta": 2.0}
    assert plugin_settings(_NamedDataclass()) == {"scale": 0.5}


class _Keyed:
    """An object whose behaviour key is its one plain setting."""

    def __init__(self, value: int) -> None:
        self.value = value


def test_passed_checks_keep_the_512_most_recently_used_verdicts() -> None:
    """The cache holds ``_MAX_ENTRIES`` keys, evicting the least recently *used* one: a verdict found
    again is kept over one only stored earlier (a registry rebuilt in a loop keeps its built-ins)."""
    checks, checked = PassedChecks(), []

    def register(value: int) -> None:
        checks.name_or_check("inner_loss", _Keyed(value), False, lambda: checked.append(value) or "keyed")

    for value in range(_MAX_ENTRIES):
        register(value)
    register(0)  # found: now the most recently used
    assert checked == list(range(_MAX_ENTRIES))
    checked.clear()
    register(_MAX_ENTRIES)  # one too many: evicts 1, the least recently used
    register(0)
    register(_MAX_ENTRIES - 1)
    assert checked == [_MAX_ENTRIES]
    register(1)
    assert checked == [_MAX_ENTRIES, 1]


class _DeclaresSettings:
    """A plugin class with a ``settings()`` method (an instance's)."""

    def settings(self) -> dict[str, float]:
        return {"scale": 1.0}


def test_a_plugin_class_registered_itself_has_no_settings() -> None:
    """A class is no instance: its dataclass defaults and its ``settings`` method (unbound) are not
    settings of an object, and calling that method unbound would raise."""
    assert plugin_settings(_NamedDataclass) == {}
    assert plugin_settings(_DeclaresSettings) == {}
    assert plugin_settings(_DeclaresSettings()) == {"scale": 1.0}


class _Slotted:
    __slots__ = ("scale",)


class _SlottedChild(_Slotted):
    """Has a ``__dict__`` (its class declares no slots), but its ``scale`` lives in a slot."""


def test_a_value_held_in_a_slot_leaves_the_object_without_a_behaviour_key() -> None:
    """A slot's value is not in ``vars(obj)``: keyed, two objects of other ``scale`` would share a
    verdict. The slotted base class makes the key refuse."""
    held = _SlottedChild()
    held.scale = 2.0
    assert behaviour_key("inner_loss", held, False) is None


def test_a_check_that_warned_is_not_remembered_nor_is_the_check_around_it() -> None:
    """``not_reusable()`` inside a check (one that warned) makes it run again at the next registration,
    and so does the check that ran it from inside (a registration hook that registers)."""
    checks, calls = PassedChecks(), []

    def warned() -> str:
        calls.append("warned")
        not_reusable()
        return "warned"

    def around() -> str:
        calls.append("around")
        checks.name_or_check("inner_loss", _Keyed(1), False, warned)
        return "around"

    for _ in range(2):
        checks.name_or_check("inner_loss", _Keyed(0), False, around)
    assert calls == ["around", "warned"] * 2
    calls.clear()
    for _ in range(2):
        checks.name_or_check("inner_loss", _Keyed(2), False, lambda: calls.append("clean") or "clean")
    assert calls == ["clean"]


_FACTOR = 2.0


class _ReadsAGlobalInANestedFunction:
    """Reads the module global ``_FACTOR`` only from code nested in its method (a lambda)."""

    def scaled(self, value: float) -> float:
        return (lambda item: item * _FACTOR)(value)


def test_a_global_read_only_by_nested_code_is_part_of_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rebinding a global that a lambda (or comprehension, inner function) of a method reads changes
    what the method computes: the key must change with it."""
    before = behaviour_key("inner_loss", _ReadsAGlobalInANestedFunction(), False)
    monkeypatch.setattr(sys.modules[__name__], "_FACTOR", 3.0)
    after = behaviour_key("inner_loss", _ReadsAGlobalInANestedFunction(), False)
    assert before is not None and after is not None
    assert before[0] != after[0]


def _kernel(**capabilities: bool) -> SimpleNamespace:
    """A kernel's capabilities as :func:`capability_refusal` reads them."""
    given = {"supports_decay": False, "fuses_inner_norm": False, **capabilities}
    return SimpleNamespace(name="k", verify=lambda inputs: None, **given)


def _inputs(**flags: bool) -> KernelInputs:
    return KernelInputs(
        device=torch.device("cpu"),
        dtype=torch.float32,
        head_dim=8,
        mini_batch_size=4,
        num_tokens=4,
        requires_grad=False,
        extra=flags,
    )


@pytest.mark.parametrize(
    ("capabilities", "flags", "refused"),
    [
        ({"supports_decay": True}, {"decay": True, "decode": True}, "decode path does not take decay"),
        ({"supports_decay": True}, {"decay": True}, None),
        ({"fuses_inner_norm": True}, {"norm": True, "residual": False}, "inner_residual=False"),
        ({"fuses_inner_norm": True}, {"norm": False, "residual": True}, "inner_norm=False"),
        ({"fuses_inner_norm": True}, {"norm": True, "residual": True}, None),
    ],
)
def test_capability_refusal_of_decay_while_decoding_and_of_a_fused_norm_half_on(
    capabilities: dict[str, bool], flags: dict[str, bool], refused: str | None
) -> None:
    """A decode step takes no decay (run, the token would not forget: a silent wrong number), and a
    kernel fusing the inner LayerNorm and residual needs both on, not one."""
    reason = capability_refusal(_kernel(**capabilities), _inputs(**flags))
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


@pytest.mark.parametrize("reason", ["", "   ", 3])
def test_a_verify_giving_a_blank_or_non_str_reason_is_named_a_broken_plugin(reason: object) -> None:
    kernel = _kernel()
    kernel.verify = lambda inputs: reason
    with pytest.raises(TypeError, match="kernel 'k': verify\\(\\) must return None"):
        verify_refusal(kernel, _inputs())


def test_a_kernel_refused_on_every_device_is_told_with_the_first_devices_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``refused_named_kernels`` gives the reason on the first device (its docstring), not the last."""
    monkeypatch.setattr(dispatch, "named_kernel_refusal", lambda *args, device, **kwargs: f"not on {device}")
    model = torch.nn.Sequential(TTTLayer(32, 2, mini_batch_size=4, kernel="cpu_ttt_linear"))
    devices = [torch.device("cpu"), torch.device("meta")]
    assert dispatch.refused_named_kernels(model, devices, requires_grad=True) == {
        "cpu_ttt_linear": "not on cpu"
    }


class _GatedByItsLog(TTTLayer):
    """A layer whose own code gives its forgetting gate only as log a (``decay_log``), none declared."""

    def declared_gates(self) -> None:
        return None

    def scan_gates(self, hidden: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        return None, None, torch.zeros(hidden.shape[0], self.num_heads, hidden.shape[1])


def test_a_gate_given_only_as_its_log_counts_as_decay() -> None:
    """A block whose gate comes as ``decay_log`` forgets: a kernel without decay must be refused for it."""
    assert dispatch.layer_gates(_GatedByItsLog(32, 2, mini_batch_size=4)) == (True, False)


def test_candidates_leave_out_training_only_kernels_for_a_block_without_a_graph() -> None:
    """A ``training_only`` kernel speeds up blocks that record a graph, no other; a decoded token goes
    only to kernels with a decode step."""
    trains = SimpleNamespace(name="trains", training_only=True, decode=object())
    infers = SimpleNamespace(name="infers", training_only=False, decode=None)
    assert dispatch._candidates([trains, infers], _inputs()) == [infers]
    graph = dataclasses.replace(_inputs(), requires_grad=True)
    assert dispatch._candidates([trains, infers], graph) == [trains, infers]
    decoded = dataclasses.replace(_inputs(decode=True), requires_grad=True)
    assert dispatch._candidates([trains, infers], decoded) == [trains]


@pytest.mark.parametrize(
    "entry", [{"__tensor__": "t0", "shape": [2]}, {"__tensor__": ["t0"]}, {"__tensor__": 0}]
)
def test_a_malformed_tensor_reference_in_a_checkpoint_tree_is_refused(entry: dict) -> None:
    """Only ``{"__tensor__": <key of a stored tensor>}`` is a tensor: anything else was not written by
    innerloop (an unhashable key crashed with a bare TypeError)."""
    with pytest.raises(checkpoints._TreeError, match="refers to a tensor"):
        checkpoints._decode(entry, {"t0": torch.zeros(2)})


@pytest.mark.parametrize("pairs", [[["a"]], [["a", 1, 2]], [[]]])
def test_a_dict_entry_that_is_no_pair_in_a_checkpoint_tree_is_refused(pairs: list) -> None:
    """A stored dict of non-str keys is a list of ``[key, value]`` pairs; another length crashed with
    a bare unpacking ValueError."""
    with pytest.raises(checkpoints._TreeError, match="malformed dict"):
        checkpoints._decode({"__dict__": pairs}, {})


def test_a_bool_is_no_int_for_a_lightning_argument() -> None:
    """``num_sanity_val_steps: true`` is a mistake, not 1 sanity step: refused naming the key."""
    assert not trainer_args.value_matches(True, int)
    assert trainer_args.value_matches(3, int) and trainer_args.value_matches(3, float)


@pytest.mark.slow  # reads Lightning's Trainer signature (its first use imports Lightning: ~3 s under load)
def test_a_bool_for_an_int_lightning_argument_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="num_sanity_val_steps"):
        trainer_args.check_lightning_arguments({"num_sanity_val_steps": True}, ValueError)


def test_a_literal_matches_only_a_value_of_its_own_type() -> None:
    """``Literal[64, 32, 16]`` takes 64, not 64.0 nor True for 1 (Lightning compares by ``in``)."""
    assert trainer_args.value_matches(64, Literal[64, 32])
    assert not trainer_args.value_matches(64.0, Literal[64, 32])
    assert not trainer_args.value_matches(True, Literal[1])


@pytest.mark.slow  # reads Lightning's Trainer signature, as above
def test_one_value_given_under_trainer_and_trainer_lightning_alike_is_kept() -> None:
    """A Lightning setting given both as ``trainer.<name>`` and ``trainer.lightning.<name>`` is refused
    only where the two differ (the same value twice is one setting)."""
    same = {"trainer": {"accumulate_grad_batches": 2, "lightning": {"accumulate_grad_batches": 2}}}
    routed = trainer_args.route_trainer_keys(same, "run.yaml", ValueError)
    assert routed["trainer"]["lightning"] == {"accumulate_grad_batches": 2}
    other = {"trainer": {"accumulate_grad_batches": 2, "lightning": {"accumulate_grad_batches": 3}}}
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer_args.route_trainer_keys(other, "run.yaml", ValueError)


def test_a_file_is_written_in_the_widest_of_a_models_dtypes() -> None:
    """A bfloat16 model with float32 norms is written in float32, losing no weight to rounding."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2).to(torch.bfloat16), torch.nn.LayerNorm(2))
    assert checkpoints.widest_parameter_dtype(model) == torch.float32
    assert checkpoints.widest_parameter_dtype(model.double()) == torch.float64


def test_empty_weights_are_no_tied_weights_and_differing_ties_are_refused() -> None:
    """Empty tensors share no memory (their data pointers may be equal); two tied weights stored
    different are refused: loaded, one would silently replace the other."""
    assert checkpoints.tied_weights({"a": torch.zeros(0), "b": torch.zeros(0)}) == []
    shared = torch.zeros(2)
    expected = {"embed": shared, "head": shared}
    with pytest.raises(checkpoints.CheckpointError, match="'embed' and 'head' differ"):
        checkpoints.check_state_dict(expected, {"embed": torch.zeros(2), "head": torch.ones(2)}, "x")


def test_keeping_a_bfloat16_dtype_keeps_a_layers_derived_tables_in_float32() -> None:
    """``keep_dtype`` casts the weights to the stored bfloat16, but a TTT layer's token-index and RoPE
    tables stay at least float32 (as Lightning's cast does): in bfloat16 the token index rounds."""
    model = torch.nn.Sequential(TTTLayer(32, 2, mini_batch_size=4))
    stored = {key: value.to(torch.bfloat16) for key, value in model.state_dict().items()}
    checkpoints.cast_to_stored_dtypes(model, stored, keep_dtype=True)
    layer = model[0]
    tables = set(layer.derived_buffers())
    assert tables and next(layer.parameters()).dtype == torch.bfloat16
    assert {name: buffer.dtype for name, buffer in layer.named_buffers() if name in tables} == dict.fromkeys(
        tables, torch.float32
    )


def test_each_run_config_section_takes_a_numpy_number_as_the_plain_number() -> None:
    """A section built alone (``OptimConfig(lr=np.float64(...))``) holds plain Python numbers, which
    config.yaml can hold (OmegaConf refused a numpy one when the run saved it)."""
    import numpy as np

    from innerloop.config.schema import DataConfig, OptimConfig, TrainerConfig

    assert type(OptimConfig(lr=np.float64(0.1)).lr) is float
    assert type(TrainerConfig(max_steps=np.int64(5)).max_steps) is int
    assert type(DataConfig(batch_size=np.int64(4)).batch_size) is int
