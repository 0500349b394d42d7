"""Train the shipped demo weights on synthetic slides and record the training curve.

    python bench/train_demo_weights.py [--iterations 800] [--out fastgicn/weights/demo_synthetic.pt]

Writes the checkpoint (fp16 weights, labelled as trained on synthetic data) and
bench/results/train_synthetic_curve.json (validation Dice on held-out synthetic slides over iterations,
with the machine, versions and the command).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fastgicn.config import TileConfig
from fastgicn.synth import SyntheticSlide
from fastgicn.train import PatchDataset, SyntheticSource, Trainer, TrainConfig

NOTES = ("DEMO WEIGHTS TRAINED ON SYNTHETIC DATA ONLY (fastgicn.synth slides). They segment fastgicn's "
         "synthetic slides and know nothing about real tissue: train on real slides before any real use.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=800)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--downsample", type=int, default=2)
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--slide-side", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--out", type=Path, default=Path("fastgicn/weights/demo_synthetic.pt"))
    parser.add_argument("--curve", type=Path, default=Path("bench/results/train_synthetic_curve.json"))
    args = parser.parse_args()

    def patches(seeds):
        sources = [SyntheticSource(SyntheticSlide(args.slide_side, args.slide_side, seed=s)) for s in seeds]
        return PatchDataset(sources, size=args.patch_size, downsample=args.downsample, cache=True)

    started = time.time()
    train_set = patches(range(1, args.slides + 1))
    val_set = patches([1000, 1001])
    print(f"{len(train_set)} training patches ({len(train_set.positive)} with tumour), {len(val_set)} held out, "
          f"{time.time() - started:.0f}s", flush=True)
    config = TrainConfig(model="resnet50_gicn_gpp", model_kwargs={"width": args.width}, iterations=args.iterations,
                         batch_size=8, schedule="constant", lr=args.lr, eval_every=100, log_every=50, seed=0)
    mpp = 0.25 * args.downsample  # synthetic slides are 0.25 um/px at level 0
    tile_config = TileConfig(tile_size=args.patch_size, overlap=32, target_mpp=mpp)
    trainer = Trainer(config, train_set, val_set, tile_config, log=lambda s: print(s, flush=True))
    trainer.fit()
    trainer.save(args.out, notes=NOTES, half=True)
    record = {
        "what": "training curve of the shipped demo weights on synthetic slides (CPU)",
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "model": config.model, "model_kwargs": config.model_kwargs, "patch_size": args.patch_size,
        "target_mpp": mpp, "train_patches": len(train_set), "held_out_patches": len(val_set),
        "seconds": time.time() - started, "curve": trainer.metrics, "checkpoint": str(args.out),
        "checkpoint_bytes": args.out.stat().st_size,
    }
    args.curve.parent.mkdir(parents=True, exist_ok=True)
    args.curve.write_text(json.dumps(record, indent=2) + "\n")
    print(f"final held-out Dice {trainer.metrics[-1]['dice']:.4f}; wrote {args.out} and {args.curve}")


if __name__ == "__main__":
    main()
