"""Patch loading in worker processes: the batches, and so the losses, are the same with 0, 1 or 2 workers, a
run resumed with another worker count is bit-exact, slide sources reopen their handles in each worker, and a
rank's share of a global batch is exactly those images of the one-process batch."""
import json
import pickle

import numpy as np
import pytest
import torch

from fastgicn.train import PatchDataset, SlideSource, Trainer
from fastgicn.train.loader import IterationBatches, build_batch, make_loader
from train_helpers import striped_source, tiny_config


@pytest.fixture
def two_threads():
    """torch splits large reductions by thread count: with 2 threads here, a batch built in this process
    differs in the last bit from one built in a (1-thread) worker unless the loader guards against it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def loaded(dataset, workers, start=3, stop=6, batch_size=3):
    batches = IterationBatches(dataset, seed=5, batch_size=batch_size, share=range(batch_size),
                               augment_images=True)
    return list(make_loader(batches, start, stop, workers=workers, prefetch=1))


def test_batches_are_the_same_with_0_and_2_workers(two_threads):
    # 128 px patches: 3 x 128 x 128 values, above the size where torch splits a mean over threads
    dataset = PatchDataset([striped_source(512)], size=128, cache=True)
    in_process, in_workers = loaded(dataset, 0), loaded(dataset, 2)
    assert len(in_process) == len(in_workers) == 3
    for (x0, y0), (x2, y2), iteration in zip(in_process, in_workers, range(3, 6)):
        assert torch.equal(x0, x2) and torch.equal(y0, y2), iteration
        x, y = build_batch(dataset, 5, iteration, 3)          # the batch is a function of (seed, iteration)
        assert torch.equal(x, x0) and torch.equal(y, y0)
    assert not torch.equal(in_process[0][0], in_process[1][0])


def test_rank_shares_are_slices_of_the_one_process_batch():
    dataset = PatchDataset([striped_source()], size=64, cache=True)
    whole_x, whole_y = build_batch(dataset, 1, 9, 4)
    parts = [build_batch(dataset, 1, 9, 4, share) for share in (range(0, 2), range(2, 4))]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole_x)
    assert torch.equal(torch.cat([p[1] for p in parts]), whole_y)


def logged_losses(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["loss"]) for r in rows if r["kind"] == "train"]


def test_resume_with_another_worker_count_is_bit_exact(tmp_path):
    dataset = PatchDataset([striped_source()], size=64, cache=True)
    quiet = dict(log=lambda s: None)
    straight = Trainer(tiny_config(workers=0, log_every=1), dataset, out_dir=tmp_path / "a", **quiet)
    straight.fit(4)
    first = Trainer(tiny_config(workers=2, log_every=1), dataset, out_dir=tmp_path / "b", **quiet)
    first.fit(2)
    resumed = Trainer(tiny_config(workers=1, log_every=1), dataset, out_dir=tmp_path / "b", **quiet)
    resumed.resume(tmp_path / "b" / "last.pt")
    resumed.fit(4)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert logged_losses(tmp_path / "a") == logged_losses(tmp_path / "b")     # the same losses, bit for bit
    assert [i for i, _ in logged_losses(tmp_path / "b")] == [1, 2, 3, 4]


def test_slide_sources_reopen_in_workers_and_pickle_as_paths(tmp_path):
    from fastgicn.synth import write_synthetic_slide

    slide_path, _ = write_synthetic_slide(tmp_path / "s.tif", 1024, 768, seed=4)
    source = SlideSource(slide_path)
    copy = pickle.loads(pickle.dumps(source))
    assert copy.slide is not source.slide
    for a, b in zip(source.read(128, 64, 64, 2), copy.read(128, 64, 64, 2)):
        np.testing.assert_array_equal(a, b)
    dataset = PatchDataset([source], size=64, downsample=2)
    assert len(dataset.positive) and len(dataset.negative)

    class OpenFile(IterationBatches):  # what a worker reads from: its own descriptor, not the parent's
        def __getitem__(self, iteration):
            return torch.tensor(self.dataset.sources[0].slide._fd)

    assert source.slide.reader == "direct"
    in_workers = make_loader(OpenFile(dataset, 0, 1, range(1), False), 0, 4, workers=2, prefetch=1)
    assert source.slide._fd not in {int(fd) for fd in in_workers}
    for (x0, y0), (x2, y2) in zip(loaded(dataset, 0, 0, 4, 4), loaded(dataset, 2, 0, 4, 4)):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_a_slide_a_worker_cannot_open_is_the_one_line_error(tmp_path):
    from fastgicn.errors import SlideError
    from fastgicn.synth import write_synthetic_slide

    slide_path, mask_path = write_synthetic_slide(tmp_path / "gone.tif", 512, 512, seed=4)
    dataset = PatchDataset([SlideSource(slide_path)], size=64, downsample=2)
    slide_path.unlink()                                  # moved away after the patches were listed
    trainer = Trainer(tiny_config(workers=1), dataset, log=lambda s: None)
    with pytest.raises(SlideError) as caught:
        trainer.fit(2)
    assert "gone.tif" in str(caught.value) and "\n" not in str(caught.value)
    assert trainer.iteration == 0
