"""Review s55r: check_update_rule's large-rates case (s55m) against a rule that is right but defined only
for rates below 1 (its documented domain).

The default check now runs such a rule at rates up to LARGE_RATES_BOUND first, and it failed there with
the rule's own error (or a relative error), nothing saying that this was the large-rates case nor how a
rule with a smaller domain opts out (``max_lr=``, passed on to every make_problem).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from innerloop.interop.ttt_e2e import read_orbax_weights
from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.testing import check_update_rule


class _DefinedBelowOne(DualForm):
    """The dual form, refusing rates of 1 or more (a rule whose documented domain is rates < 1)."""

    def forward(self, state, task, views, lr, tau, decay=None, decay_log=None):  # noqa: ANN001, ANN201, D102
        if bool((lr >= 1).any()):
            raise ValueError(f"inner learning rates must be < 1, got {lr.max().item():.3g}")
        return super().forward(state, task, views, lr, tau, decay, decay_log)


class _DivergesAboveOne(DualForm):
    """The dual form with rates above 1 replaced by 1 (a form valid, and documented, for rates <= 1 only)."""

    def forward(self, state, task, views, lr, tau, decay=None, decay_log=None):  # noqa: ANN001, ANN201, D102
        return super().forward(state, task, views, lr.clamp(max=1.0), tau, decay, decay_log)


# reason: the first case runs the rule's check until it fails (0.05-0.7 s of CPU, above the fast loop's 0.3 s)
@pytest.mark.slow
@pytest.mark.parametrize(
    ("rule", "error"), [(_DefinedBelowOne, ValueError), (_DivergesAboveOne, AssertionError)]
)
def test_a_rule_failing_only_at_large_rates_is_told_how_to_opt_out(rule, error) -> None:
    torch.manual_seed(0)
    with pytest.raises(error) as raised:
        check_update_rule(rule(), gradients=False, without_grad=False)
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "LARGE_RATES_BOUND" in notes and "max_lr=" in notes, (str(raised.value), notes)


_EDGE_ARRAYS = {  # name: (shape, chunk shape): edge chunks, a 0-d array, one chunk, no chunk, all zeros
    "a.edge": ((5, 7), [2, 3]),
    "a.scalar": ((), []),
    "a.one": ((3,), [8]),
    "a.empty": ((0, 4), [1, 4]),
    "a.zeros": ((4, 4), [2, 2]),
}


# reason: the first case imports tensorstore (about 1 s of CPU on a loaded machine; the others 0.06-0.13 s)
@pytest.mark.slow
@pytest.mark.parametrize(
    ("zarr3", "key_encoding", "ocdbt"),
    [(False, None, False), (False, None, True), (True, "default", False), (True, "v2", True)],
)
def test_a_complete_checkpoint_of_any_chunking_is_not_refused_as_missing_a_chunk(
    tmp_path, zarr3, key_encoding, ocdbt
) -> None:
    """s55o refuses a missing chunk where orbax's metadata says every chunk was stored: a whole save whose
    arrays end in partial edge chunks, are 0-d, empty, one chunk or all zeros (zarr2's "0.0" or zarr3's
    "c/0/0" and "0.0" chunk keys, plain files or OCDBT) reads as written."""
    tensorstore = pytest.importorskip("tensorstore", reason="the e2e extra (tensorstore) reads orbax")
    folder = tmp_path / "0" / "model_weights"
    folder.mkdir(parents=True)
    generator, tree, written = np.random.default_rng(0), {}, {}
    for name, (shape, chunks) in _EDGE_ARRAYS.items():
        keys = name.split(".")
        tree[str(tuple(keys))] = {"key_metadata": [{"key": key, "key_type": 2} for key in keys]}
        path = {"driver": "ocdbt", "base": folder.as_uri(), "path": name}
        kvstore = path if ocdbt else {"driver": "file", "path": str(folder / name)}
        if zarr3:
            grid = {"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}}}
            metadata = {**grid, "chunk_key_encoding": {"name": key_encoding}}
        else:
            metadata = {"chunks": chunks}
        spec = {"driver": "zarr3" if zarr3 else "zarr", "kvstore": kvstore, "metadata": metadata}
        store = tensorstore.open(
            {**spec, "store_data_equal_to_fill_value": True}, create=True, dtype="float32", shape=list(shape)
        ).result()
        value = generator.standard_normal(shape).astype("float32")
        value = np.zeros_like(value) if name == "a.zeros" else value  # +0.0, the fill value, bitwise
        store.write(value).result()
        written[name] = value
    flags = {"use_zarr3": zarr3, "store_array_data_equal_to_fill_value": True}
    (folder / "_METADATA").write_text(json.dumps({"tree_metadata": tree, **flags}), encoding="utf-8")
    read = read_orbax_weights(tmp_path)
    for name, value in written.items():
        assert read[name].shape == value.shape and np.array_equal(read[name], value), name
