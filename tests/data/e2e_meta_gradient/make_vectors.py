"""Make the TTT-E2E meta-gradient vectors in this folder with the official code.

Run with Python 3.12 and JAX 0.5.3 (CPU), equinox, optax, hydra-core and safetensors installed, from a
work tree of github.com/test-time-training/e2e at a4fc478 (not part of innerloop):

    python make_vectors.py /path/to/e2e-work-tree /path/to/this/folder

The work tree is patched for CPU and float64 only (``patch_for_float64`` below says what). The script
builds the official ``MetaModel`` of a small config, perturbs its norms, rounds every weight to float32
(so that float32 files hold them exactly) and computes the official training loss of a batch of three
sequences and its gradient w.r.t. every weight, in both official training modes (``meta``: test-time
training on, the gradient through every inner step; ``pretrain``: off), and the ``meta`` loss at an outer
step inside the inner learning rate's warm-up. See the README beside it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

LAYERS, WIDTH, HEADS, MLP, VOCAB, CHUNK, WINDOW, SUFFIX, LENGTH, BATCH = 5, 32, 2, 96, 128, 8, 16, 2, 64, 3
BOS = 1
WARMUP_STEP = 9  # an outer step inside the inner-lr warm-up: inner lr 0.1 + 0.9 * 10 / 480


def use_xla_attention(work_tree: Path) -> None:
    """XLA's attention instead of cuDNN's (the same function; cuDNN needs a GPU)."""
    attention = work_tree / "ttt/model/attention.py"
    text = re.sub(
        r'implementation="cudnn"( if \([^)]*\)| if [\w.]+)? ?(else None)?',
        "implementation=None",
        attention.read_text(),
    )
    attention.write_text(text)


def official_overrides() -> list[str]:
    """The official experiment at this folder's small config (hydra overrides; dtypes left as released)."""
    return [
        "+deploy=interactive",
        "+experiment=125m/pretrain/pretrain-125m-e2e",
        f"model.num_hidden_layers={LAYERS}",
        f"model.hidden_size={WIDTH}",
        f"model.num_attention_heads={HEADS}",
        f"model.intermediate_size={MLP}",
        f"model.vocab_size={VOCAB}",
        f"model.bos_token_id={BOS}",
        "model.eos_token_id=2",
        f"model.mini_batch_size={CHUNK}",
        f"model.sliding_window_size={WINDOW}",
        f"model.suffix_len={SUFFIX}",
        f"training.seq_length={LENGTH}",
        f"training.global_batch_size={BATCH}",
        "training.log_wandb=false",
        "training.dummy_dataset=true",
        "training.model_seed=0",
        "deploy_paths.data.dclm_filter_8k=UNUSED",
        "training.checkpoint_path=UNUSED",
    ]


def patch_for_float64(work_tree: Path) -> None:
    """XLA's attention instead of cuDNN's (the same function; cuDNN needs a GPU), and the loss and RoPE
    in float64 rather than float32 (they are cast to float32 whatever the compute dtype)."""
    use_xla_attention(work_tree)
    attention = work_tree / "ttt/model/attention.py"
    attention.write_text(attention.read_text().replace("jnp.float32", "jnp.float64"))
    loss = work_tree / "ttt/model/loss.py"
    loss.write_text(loss.read_text().replace("jnp.float32", "jnp.float64"))


def main(work_tree: Path, out: Path) -> None:
    patch_for_float64(work_tree)
    sys.path.insert(0, str(work_tree))
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from safetensors.numpy import save_file
    from ttt.config import register_configs
    from ttt.model.data import Batch
    from ttt.model.transformer import MetaModel
    from ttt.utils.jax_utils import vmap_mean

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_x64", True)
    register_configs()
    overrides = official_overrides()
    float64 = ["model.compute_dtype=fp64", "model.param_dtype=fp64", "model.state_dtype=fp64"]

    def dotted(path) -> str:
        return ".".join(str(getattr(key, "name", getattr(key, "key", key))) for key in path)

    def named(tree) -> dict[str, np.ndarray]:
        leaves, _ = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_inexact_array))
        return {dotted(path): np.asarray(leaf) for path, leaf in leaves}

    ids = np.random.default_rng(1234).integers(3, VOCAB, size=(BATCH, LENGTH + 1))
    ids[:, 0] = BOS
    ids[0, 21] = BOS  # a document boundary inside sequence 0: its target is masked
    ids[2, 40:44] = BOS  # four in sequence 2: chunks with 1 and 3 of 8 targets masked
    batch = Batch(
        input_ids=jnp.asarray(ids[:, :-1], jnp.int32),
        target_tokens=jnp.asarray(ids[:, 1:], jnp.int32),
        loss_masks=jnp.asarray(ids[:, 1:] != BOS),  # the official pipeline's mask
    )
    vectors = {
        "input_ids": np.ascontiguousarray(ids[:, :-1], np.int64),
        "target_tokens": np.ascontiguousarray(ids[:, 1:], np.int64),
    }
    for mode in ("meta", "pretrain"):
        with initialize_config_dir(config_dir=str(work_tree / "configs"), version_base=None):
            cfg = compose(
                config_name="config", overrides=overrides + float64 + [f"training.train_mode={mode}"]
            )
        cfg.model.seq_len = cfg.training.seq_length
        model, state = eqx.nn.make_with_state(MetaModel)(cfg, key=jax.random.PRNGKey(0))
        rng = np.random.default_rng(7)

        def perturbed(path, leaf, rng=rng):
            """Norms scaled by 1 + 0.25 N(0, 1) (a mixed-up norm shows); every weight float32-exact."""
            if not eqx.is_inexact_array(leaf):
                return leaf
            if "norm" in dotted(path):
                leaf = leaf * (1 + 0.25 * rng.standard_normal(leaf.shape))
            return jnp.asarray(np.asarray(leaf).astype(np.float32).astype(np.float64))

        model = jax.tree_util.tree_map_with_path(perturbed, model)
        state = state.set(model.step_index, jnp.array(jnp.iinfo(jnp.int32).max - 100, dtype=jnp.int32))

        def batch_loss(
            meta_model, b, state=state
        ):  # the official train_on_sequence's loss, one accumulation step
            return vmap_mean(
                lambda seq: MetaModel.loss_for_sequence(meta_model, seq, state), b, axis_name="batch"
            )

        with jax.make_mesh(axis_shapes=(1, 1), axis_names=("data", "state")):
            (loss, _), grads = eqx.filter_value_and_grad(batch_loss, has_aux=True)(model, batch)
        if mode == "meta":
            # the loss at outer step WARMUP_STEP, inside the inner lr's warm-up (ilr_warmup_steps 480)
            early = state.set(model.step_index, jnp.array(WARMUP_STEP, dtype=jnp.int32))
            with jax.make_mesh(axis_shapes=(1, 1), axis_names=("data", "state")):
                early_loss, _ = batch_loss(model, batch, state=early)
            vectors[f"loss_meta_step{WARMUP_STEP}"] = np.asarray(early_loss, np.float64).reshape(1)
            vectors.update({f"weights/{k}": v.astype(np.float32) for k, v in named(model.weights()).items()})
            resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
            config = {"model": resolved["model"], "training": resolved["training"]}
            for key in ("compute_dtype", "param_dtype", "state_dtype"):  # as the released configs name them
                config["model"][key] = "fp32"
            (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
        vectors.update({f"grad_{mode}/{k}": v.astype(np.float32) for k, v in named(grads).items()})
        vectors[f"loss_{mode}"] = np.asarray(loss, np.float64).reshape(1)
        print(mode, float(loss))
    save_file(vectors, str(out / "official.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
