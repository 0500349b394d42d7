"""Benchmark training throughput: patches/s with 0, 1 and 2 loader workers, fp32 against bf16 autocast, and
whether the loader keeps up (the share of each step spent waiting for its batch).

Patches come from a synthetic slide file written here (read through SlideSource: the direct TIFF reader, as
inference reads, then augmented), so loading costs what it costs on real slides; the model is a narrow
ResNet50-GICN-GPP so the run takes a few minutes on two cores.

    python bench/bench_train.py                            # CPU: bench/results/train_cpu.json
    python bench/bench_train.py --threads 1 --rounds 5      # as recorded (see the record's command)
    python bench/bench_train.py --device cuda --width 1 --patch-size 512 --batch-size 16 \
        --out bench/results/train_cuda.json

Each configuration trains `--warmup` + `--iterations` iterations through `Trainer.fit` (a fresh trainer), once
per round, the configurations interleaved in each of `--rounds` rounds (the machine is shared: a neighbour's
job then slows every configuration alike); a run's figures are the medians over its logging windows
(`--window` iterations) after the warm-up, from the run folder's metrics.jsonl, and the recorded figure the
median of the rounds. The loader alone (no model) is timed too: the patches/s it can supply with each
worker count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_tiler import _context, _write  # noqa: E402

from fastgicn.synth import write_synthetic_slide  # noqa: E402
from fastgicn.train import PatchDataset, SlideSource, Trainer, TrainConfig  # noqa: E402
from fastgicn.train.loader import IterationBatches, make_loader  # noqa: E402


def train_rates(dataset, args, precision: str, workers: int, folder: Path) -> dict:
    config = TrainConfig(model_kwargs={"width": args.width}, iterations=args.warmup + args.iterations,
                         batch_size=args.batch_size, schedule="constant", lr=0.01, log_every=args.window,
                         device=args.device, precision=precision, workers=workers)
    started = time.perf_counter()
    Trainer(config, dataset, out_dir=folder, log=lambda s: None).fit()
    seconds = time.perf_counter() - started
    windows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    measured = [w for w in windows if w["kind"] == "train" and w["iteration"] > args.warmup]
    return {"patches_per_s": statistics.median(w["patches_per_s"] for w in measured),
            "data_wait_fraction": statistics.median(w["data_wait"] for w in measured), "run_seconds": seconds}


def median_of_rounds(runs: list[dict]) -> dict:
    row = {name: round(statistics.median(run[name] for run in runs), 4) for name in runs[0]}
    row["patches_per_s_each_round"] = [round(run["patches_per_s"], 2) for run in runs]
    return row


def loader_rate(dataset, args, workers: int) -> float:
    """Patches/s the loader supplies on its own (after its first batch, which includes starting workers)."""
    batches = IterationBatches(dataset, seed=0, batch_size=args.batch_size, share=range(args.batch_size),
                               augment_images=True)
    stream = iter(make_loader(batches, 0, args.iterations + 1, workers=workers,
                              pin_memory=args.device.startswith("cuda")))
    next(stream)
    started = time.perf_counter()
    for _ in stream:
        pass
    return round(args.iterations * args.batch_size / (time.perf_counter() - started), 2)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=float, default=0.125, help="model channel multiplier (1 is the paper's)")
    p.add_argument("--patch-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--slide-size", type=int, default=4096, help="side of the synthetic slide, px")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of the training process (default: torch's choice)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_cpu.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        slide, _ = write_synthetic_slide(Path(tmp) / "train.tif", args.slide_size, args.slide_size, seed=1)
        dataset = PatchDataset([SlideSource(slide)], size=args.patch_size)
        print(f"{len(dataset)} patches of {args.patch_size} px from a {args.slide_size}^2 synthetic slide, "
              f"torch threads {torch.get_num_threads()}")
        loader = {f"workers_{w}": loader_rate(dataset, args, w) for w in args.workers}
        print("loader alone, patches/s:", loader)
        runs: dict[str, list[dict]] = {}
        for round_ in range(args.rounds):
            for precision in args.precisions:
                for workers in args.workers:
                    key = f"{precision}_workers_{workers}"
                    run = train_rates(dataset, args, precision, workers, Path(tmp) / f"{key}_{round_}")
                    runs.setdefault(key, []).append(run)
                    print(f"round {round_}", key, {k: round(v, 3) for k, v in run.items()})
        training = {key: median_of_rounds(value) for key, value in runs.items()}
        fp32_0 = training[f"fp32_workers_{args.workers[0]}"]["patches_per_s"]
        ratios = {key: round(row["patches_per_s"] / fp32_0, 3) for key, row in training.items()}
        print("patches/s against", f"fp32_workers_{args.workers[0]}:", ratios)
    record = {
        "benchmark": "training throughput: patches/s and the share of the step spent waiting for data, "
                     f"medians over {args.window}-iteration windows after {args.warmup} warm-up iterations, "
                     f"median of {args.rounds} interleaved rounds; the loader alone in patches/s",
        **_context(argv, __file__),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": args.device,
        "model": "resnet50_gicn_gpp", "width": args.width, "patch_size": args.patch_size,
        "batch_size": args.batch_size, "patches_in_dataset": len(dataset),
        "data": f"SlideSource over a {args.slide_size}^2 synthetic tiled TIFF (direct reader), augmented",
        "loader_alone_patches_per_s": loader,
        "training": training,
        "patches_per_s_relative_to_first": ratios,
    }
    return _write(record, args.out)


if __name__ == "__main__":
    main()
