"""Make ``official_bf16.safetensors`` in this folder with the official code in its own precision.

Run as ``make_vectors.py`` (same Python, JAX and packages), after it, from an unpatched work tree of
github.com/test-time-training/e2e at a4fc478 (not part of innerloop):

    python make_bf16_vectors.py /path/to/e2e-work-tree /path/to/this/folder

The work tree is patched for CPU only (XLA's attention in place of cuDNN's, the same function): the
official default dtypes stay (compute ``bf16``, parameters and state ``fp32``) and JAX runs without
``jax_enable_x64``. On the weights and batch of ``official.safetensors`` (from ``make_vectors.py``) it
computes the official ``meta`` training loss and its gradient w.r.t. every weight, in that precision.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from make_vectors import BOS, official_overrides, use_xla_attention


def main(work_tree: Path, out: Path) -> None:
    use_xla_attention(work_tree)
    sys.path.insert(0, str(work_tree))
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from hydra import compose, initialize_config_dir
    from safetensors.numpy import load_file, save_file
    from ttt.config import register_configs
    from ttt.model.data import Batch
    from ttt.model.transformer import MetaModel
    from ttt.utils.jax_utils import vmap_mean

    jax.config.update("jax_platforms", "cpu")
    register_configs()
    official = load_file(str(out / "official.safetensors"))
    with initialize_config_dir(config_dir=str(work_tree / "configs"), version_base=None):
        cfg = compose(config_name="config", overrides=[*official_overrides(), "training.train_mode=meta"])
    assert (cfg.model.compute_dtype, cfg.model.param_dtype, cfg.model.state_dtype) == ("bf16", "fp32", "fp32")
    cfg.model.seq_len = cfg.training.seq_length
    model, state = eqx.nn.make_with_state(MetaModel)(cfg, key=jax.random.PRNGKey(0))

    def dotted(path) -> str:
        return ".".join(str(getattr(key, "name", getattr(key, "key", key))) for key in path)

    replaced = []

    def stored(path, leaf):
        """The weight ``make_vectors.py`` stored under this name, where it stored one."""
        name = f"weights/{dotted(path)}"
        if not eqx.is_inexact_array(leaf) or name not in official:
            return leaf
        replaced.append(name)
        return jnp.asarray(official[name], dtype=leaf.dtype)

    model = jax.tree_util.tree_map_with_path(stored, model)
    assert sorted(replaced) == sorted(name for name in official if name.startswith("weights/"))
    state = state.set(model.step_index, jnp.array(jnp.iinfo(jnp.int32).max - 100, dtype=jnp.int32))
    targets = official["target_tokens"]
    batch = Batch(
        input_ids=jnp.asarray(official["input_ids"], jnp.int32),
        target_tokens=jnp.asarray(targets, jnp.int32),
        loss_masks=jnp.asarray(targets != BOS),
    )

    def batch_loss(meta_model, b):  # the official train_on_sequence's loss, one accumulation step
        return vmap_mean(
            lambda seq: MetaModel.loss_for_sequence(meta_model, seq, state), b, axis_name="batch"
        )

    with jax.make_mesh(axis_shapes=(1, 1), axis_names=("data", "state")):
        (loss, _), grads = eqx.filter_value_and_grad(batch_loss, has_aux=True)(model, batch)
    leaves, _ = jax.tree_util.tree_flatten_with_path(eqx.filter(grads, eqx.is_inexact_array))
    vectors = {f"grad_meta_bf16/{dotted(path)}": np.asarray(leaf, np.float32) for path, leaf in leaves}
    vectors["loss_meta_bf16"] = np.asarray(loss, np.float64).reshape(1)
    save_file(vectors, str(out / "official_bf16.safetensors"))
    print("meta bf16", float(loss))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
