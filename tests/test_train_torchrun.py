"""Real torchrun (python -m torch.distributed.run) with 2 CPU processes on gloo: DDP trains on each rank's
share of the global batch (checked against a one-process computation of the same two half-batch gradients),
rank 0 alone logs and writes one checkpoint, validation Dice is counted over both ranks, and training resumes
across world sizes (2 -> 1 and 1 -> 2 processes)."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from fastgicn.cli import main
from fastgicn.errors import ConfigError
from fastgicn.models.preprocess import to_model_input
from fastgicn.synth import SyntheticSlide
from fastgicn.train import (PatchDataset, SyntheticSource, Trainer, TrainConfig, evaluate_dice,
                            load_checkpoint, model_from_checkpoint)
from fastgicn.train.distributed import World
from fastgicn.train.loader import build_batch

SEED, BATCH, LR = 3, 4, 0.01
TRAIN = ["train", "--synthetic", "1", "--synthetic-size", "512x512", "--patch-size", "64",
         "--downsample", "2", "--batch-size", str(BATCH), "--width", "0.0625", "--eval-every", "2",
         "--log-every", "1", "--checkpoint-every", "0", "--schedule", "constant", "--lr", str(LR),
         "--seed", str(SEED)]


def torchrun(args) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastgicn", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def cli_patches(seed_offset):
    """The patches `fastgicn train --synthetic 1` builds (validation slides get seed + 10000)."""
    slide = SyntheticSlide(512, 512, seed=SEED + seed_offset)
    return PatchDataset([SyntheticSource(slide)], size=64, downsample=2, cache=True)


def two_rank_reference(train_set, iterations):
    """What DDP over 2 ranks must compute, in one process: each rank's half batch through the same weights
    (batch norm over that half), the mean of the two gradients, one SGD step; rank 0's batch-norm
    statistics."""
    config = TrainConfig(model_kwargs={"width": 0.0625, "k": 7}, batch_size=BATCH, schedule="constant", lr=LR,
                         seed=SEED, log_every=0)
    ref = Trainer(config, train_set, log=lambda s: None)
    model, world = ref.model.train(), 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's ranks run (OMP_NUM_THREADS=1): the same rounding, not only close
    try:
        _reference_steps(ref, train_set, iterations, world)
    finally:
        torch.set_num_threads(threads)
    return model.state_dict()


def _reference_steps(ref, train_set, iterations, world):
    model = ref.model
    for iteration in range(iterations):
        ref.optimizer.zero_grad()
        for rank in (1, 0):  # rank 0 last: its statistics are the ones kept
            buffers = {k: v.clone() for k, v in model.named_buffers()}
            share = World(rank=rank, size=world).share(BATCH)
            x, labels = build_batch(train_set, SEED, iteration, BATCH, share)
            (ref.loss_fn(model(to_model_input(x, model.mean, model.std)), labels) / world).backward()
            if rank:
                for name, value in model.named_buffers():
                    value.copy_(buffers[name])
        ref.optimizer.step()


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_torchrun_two_cpu_processes_train_checkpoint_once_and_resume(tmp_path):
    ddp = tmp_path / "ddp"
    out = torchrun(TRAIN + ["--iterations", "2", "--workers", "1", "-o", str(ddp)])
    assert "2 processes, 2 patches each" in out
    assert out.count("iter 1/2 ") == 1 and out.count("validation Dice") == 1     # rank 0 alone speaks
    logs = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []  # scalars when installed
    assert sorted(p.name for p in ddp.iterdir()) == sorted(["last.pt", "metrics.csv", "metrics.jsonl"] + logs)
    assert [(r["kind"], r["iteration"]) for r in jsonl(ddp / "metrics.jsonl")] == [
        ("train", 1), ("train", 2), ("val", 2)]
    payload = load_checkpoint(ddp / "last.pt")
    assert payload["iteration"] == 2 and payload["train_config"]["batch_size"] == BATCH

    expected = two_rank_reference(cli_patches(0), 2)
    for name, value in payload["state_dict"].items():
        # equal here to the last bit; a wrong split (batch norm over all 4 patches) is 1e-2 away
        assert torch.allclose(value.float(), expected[name].float(), rtol=0, atol=1e-6), name
    # validation Dice counted on both ranks, summed: the Dice of the whole held-out set
    val_set = cli_patches(10_000)
    assert payload["metrics"][-1]["dice"] == evaluate_dice(model_from_checkpoint(payload), val_set)["dice"]
    assert payload["metrics"][-1]["patches"] == len(val_set)

    # a 2-process checkpoint resumes in one process ...
    resume = ["--resume", str(ddp / "last.pt")]
    assert main(TRAIN + ["--iterations", "3", *resume, "-o", str(tmp_path / "one")]) == 0
    assert load_checkpoint(tmp_path / "one" / "last.pt")["iteration"] == 3
    # ... and a 1-process checkpoint in two
    assert main(TRAIN + ["--iterations", "2", "-o", str(tmp_path / "single")]) == 0
    single = load_checkpoint(tmp_path / "single" / "last.pt")
    out = torchrun(TRAIN + ["--iterations", "3", "--resume", str(tmp_path / "single" / "last.pt"),
                            "-o", str(tmp_path / "ddp2")])
    assert "resumed from" in out and "at iteration 2" in out
    resumed = load_checkpoint(tmp_path / "ddp2" / "last.pt")
    assert resumed["iteration"] == 3 and resumed["metrics"][:1] == single["metrics"]
    assert [m["iteration"] for m in resumed["metrics"]] == [2, 3]
    assert [r["iteration"] for r in jsonl(tmp_path / "ddp2" / "metrics.jsonl") if r["kind"] == "train"] == [3]


def test_a_batch_that_does_not_split_and_sync_bn_on_cpu_are_one_line_errors():
    assert [World(rank=r, size=3).share(6) for r in range(3)] == [range(0, 2), range(2, 4), range(4, 6)]
    with pytest.raises(ConfigError, match="--batch-size 4 does not split over 3 processes"):
        World(rank=0, size=3).share(4)
    config = TrainConfig(model_kwargs={"width": 0.0625}, batch_size=2, schedule="constant", lr=LR,
                         sync_bn=True)
    with pytest.raises(ConfigError, match="--sync-bn: .*GPUs only"):
        Trainer(config, cli_patches(0), world=World(rank=0, size=2), log=lambda s: None)
