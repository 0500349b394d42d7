"""The training progress line (rates and ETA by hand), the run folder's metrics.csv / metrics.jsonl (the same
rows, losses equal to the per-step ones, validation Dice equal to a NumPy count), appended on resume."""
import csv
import json

import numpy as np
import pytest
import torch

from fastgicn.models.preprocess import to_model_input
from fastgicn.train import PatchDataset, Trainer
from fastgicn.train.progress_line import TrainProgress
from train_helpers import striped_source, tiny_config


def test_progress_line_by_hand():
    now = [100.0]
    progress = TrainProgress(start=10, end=110, patches_per_iteration=8, clock=lambda: now[0])
    for _ in range(4):
        progress.step(waited=0.1)
    now[0] = 102.0                                   # 4 iterations in 2 s, 0.4 s of it waiting for data
    rates = progress.rates()
    assert rates == {"iterations_per_s": 2.0, "patches_per_s": 16.0, "data_wait": 0.4 / 2.0, "eta_s": 48.0}
    assert progress.line(0.5, 1e-3, rates) == ("iter  14/110  loss 0.5000  lr 1.00e-03  2.00 it/s  "
                                               "16.0 patches/s  data 20%  ETA 00:48")
    now[0] = 103.0
    assert progress.rates()["iterations_per_s"] == 0.0      # the figures are since the previous line


def numpy_dice(model, dataset):
    model.eval()
    with torch.no_grad():
        images, labels = dataset.batch(range(len(dataset)))
        pred = model(to_model_input(images, model.mean, model.std)).argmax(1).numpy() == 1
    truth = labels.numpy() == 1
    return 2 * (pred & truth).sum() / (pred.sum() + truth.sum())


def rows(folder):
    with open(folder / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    return table, [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_metrics_log_and_validation_every_k_iterations(tmp_path):
    train_set = PatchDataset([striped_source(seed=0)], size=64, cache=True)
    val_set = PatchDataset([striped_source(128, seed=1)], size=64, cache=True)
    per_step = Trainer(tiny_config(), train_set, log=lambda s: None)
    step_losses = [per_step.train_step()["loss"] for _ in range(4)]

    lines = []
    trainer = Trainer(tiny_config(log_every=2, eval_every=2), train_set, val_set, out_dir=tmp_path,
                      log=lines.append)
    trainer.fit(4)
    table, records = rows(tmp_path)
    assert [(r["kind"], r["iteration"]) for r in records] == [("train", 2), ("val", 2), ("train", 4),
                                                               ("val", 4)]
    assert [(r["kind"], int(r["iteration"])) for r in table] == [(r["kind"], r["iteration"]) for r in records]
    for row, record in zip(table, records):
        for name, value in record.items():
            if name != "kind":
                assert float(row[name]) == value, name
    train = [r for r in records if r["kind"] == "train"]
    assert train[0]["loss"] == np.mean(step_losses[:2]) and train[1]["loss"] == np.mean(step_losses[2:])
    assert all(r["patches_per_s"] == 2 * r["iterations_per_s"] > 0 and 0 <= r["data_wait"] < 1 for r in train)
    assert [m["iteration"] for m in trainer.metrics] == [2, 4]
    assert records[-1]["dice"] == trainer.metrics[-1]["dice"] == numpy_dice(trainer.model, val_set)
    progress = [line for line in lines if line.startswith("iter 2/4 ") or line.startswith("iter 4/4 ")]
    assert len(progress) == 2 and all(w in progress[0] for w in ("it/s", "patches/s", "lr 1.00e-02", "ETA"))

    resumed = Trainer(tiny_config(log_every=2, eval_every=2), train_set, val_set, out_dir=tmp_path,
                      log=lambda s: None)
    resumed.resume(tmp_path / "last.pt")
    resumed.fit(6)
    table, records = rows(tmp_path)
    assert [r["iteration"] for r in records] == [2, 2, 4, 4, 6, 6] and len(table) == 6  # appended, 1 header


def test_tensorboard_scalars_when_tensorboard_is_installed(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    train_set = PatchDataset([striped_source()], size=64, cache=True)
    Trainer(tiny_config(log_every=1), train_set, out_dir=tmp_path, log=lambda s: None).fit(2)
    _, records = rows(tmp_path)
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in losses] == [1, 2]
    np.testing.assert_allclose([v for _, v in losses], [r["loss"] for r in records], rtol=1e-6)  # float32
    assert "train/patches_per_s" in events.Tags()["scalars"]
