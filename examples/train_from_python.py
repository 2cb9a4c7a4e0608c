"""Train a tiny TTT-Linear language model through the LightningModule, from Python.

The same pieces `innerloop train` assembles from a config, put together by hand: a model config, the
LightningModule (outer loop: AdamW, warm-up + cosine, clipping via the Trainer), a DataModule (here
the built-in corpus, the Python standard library's source) and a plain Lightning Trainer.

    python examples/train_from_python.py            # 200 steps, about a minute on a laptop CPU
    python examples/train_from_python.py --steps 5  # a smoke test
"""

from __future__ import annotations

import argparse

import lightning as L

from innerloop.models import ModelConfig, TTTConfig
from innerloop.train import LanguageModelModule, SafetensorsCheckpointIO, TextDataModule


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/from-python")
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    config = ModelConfig(
        mixer="ttt",
        backbone="transformer",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=172,
        ttt=TTTConfig(inner_model="linear", inner_loss="reconstruction", mini_batch_size=16),
    )
    module = LanguageModelModule(
        config, lr=3e-3, weight_decay=0.1, warmup_steps=args.steps // 10, max_steps=args.steps
    )
    data = TextDataModule(seq_len=64, batch_size=8, val_batches=2)  # no paths: the standard library
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        max_epochs=-1,  # the training stream is endless; max_steps ends the run
        val_check_interval=args.steps,
        check_val_every_n_epoch=None,
        gradient_clip_val=1.0,
        plugins=[SafetensorsCheckpointIO()],  # checkpoints as safetensors, no pickle
        default_root_dir=args.out,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=data)
    print(f"validation perplexity: {float(trainer.callback_metrics['val_ppl']):.2f}")
    trainer.save_checkpoint(f"{args.out}/model.safetensors")
    print(f"checkpoint: {args.out}/model.safetensors (innerloop eval / generate read it)")


if __name__ == "__main__":
    main()
