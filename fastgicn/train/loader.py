"""Training batches, built in worker processes or in this one, always the same.

Batch i is a pure function of (seed, i): the patch draw comes from `batch_generator(seed, i)` and image j of
the global batch is augmented with `image_generator(seed, i, j)`, so a rank that trains on positions a..b of
the batch builds exactly those images of the one-process batch, and a run resumed with any number of workers
or ranks continues the same stream. Batches are built with one intra-op thread everywhere (DataLoader workers
run that way): torch splits a large reduction (the contrast jitter's mean) by the thread count, which would
change the last bit of a patch built in the main process.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..errors import FastGicnError
from .dataset import PatchDataset, augment

__all__ = ["batch_generator", "image_generator", "build_batch", "IterationBatches", "make_loader",
           "batches_of"]


def batch_generator(seed: int, iteration: int) -> torch.Generator:
    """Draws the patches of the global batch of `iteration`."""
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


def image_generator(seed: int, iteration: int, position: int) -> torch.Generator:
    """Draws the augmentation of image `position` of the global batch of `iteration`."""
    state = np.random.SeedSequence([seed, iteration, position]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@contextmanager
def one_intraop_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_batch(dataset: PatchDataset, seed: int, iteration: int, batch_size: int, share: range | None = None,
                augment_images: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions `share` (default: all) of the global batch of `iteration`: float N x 3 x H x W images in 0..1
    and uint8 N x H x W labels (0 normal, 1 tumour; an eighth of int64's bytes to send from a worker).

    In a worker process the batch is written straight into shared memory, the one copy it then needs."""
    share = range(batch_size) if share is None else share
    indices = dataset.sample_indices(batch_size, batch_generator(seed, iteration))[share.start:share.stop]
    images, labels = dataset.batch(indices)
    x = images.permute(0, 3, 1, 2).float() / 255.0
    if augment_images:
        with one_intraop_thread():
            pairs = [augment(x[j:j + 1], labels[j:j + 1], image_generator(seed, iteration, position))
                     for j, position in enumerate(share)]
        x, labels = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        x, labels = list(x.split(1)), list(labels.split(1))
    return _stack(x, torch.float32), _stack(labels, torch.uint8)


def _stack(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=dtype)
    if get_worker_info() is not None:
        out.share_memory_()
    start = 0
    for part in parts:
        out[start:start + len(part)] = part
        start += len(part)
    return out


class IterationBatches(Dataset):
    """`batches[i]` is this rank's share of the global batch of iteration i (a map-style dataset whose index
    is the iteration, so a DataLoader over range(start, stop) resumes anywhere)."""

    def __init__(self, dataset: PatchDataset, seed: int, batch_size: int, share: range, augment_images: bool):
        self.dataset, self.seed, self.batch_size = dataset, seed, batch_size
        self.share, self.augment_images = share, augment_images
        self.worker_error: FastGicnError | None = None

    def __getitem__(self, iteration: int):
        if get_worker_info() is None:
            return self._build(iteration)
        try:
            if self.worker_error is not None:
                raise self.worker_error
            return self._build(iteration)
        except FastGicnError as exc:  # a bad slide: sent back as a value, raised by batches_of as one line
            return _WorkerError(exc)

    def _build(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        return build_batch(self.dataset, self.seed, iteration, self.batch_size, self.share,
                           self.augment_images)


class _WorkerError:
    def __init__(self, error: FastGicnError):
        self.error = error


def batches_of(loader: DataLoader):
    """The loader's batches; an error a worker met (a slide that cannot be read) is raised here as it was."""
    for item in loader:
        if isinstance(item, _WorkerError):
            raise item.error
        yield item


def _reopen_sources(worker_id: int) -> None:
    """In each worker: its own slide handles (a forked copy of the parent's is not safe to read from)."""
    batches = get_worker_info().dataset
    try:
        for source in batches.dataset.sources:
            reopen = getattr(source, "reopen", None)
            if reopen is not None:
                reopen()
    except FastGicnError as exc:
        batches.worker_error = exc


def make_loader(batches: IterationBatches, start: int, stop: int, workers: int = 0, prefetch: int = 2,
                pin_memory: bool = False) -> DataLoader:
    """Batches of iterations start..stop-1 in order; `workers` processes build them ahead, at most `prefetch`
    batches each; pinned (page-locked) when `pin_memory`, for asynchronous copies to a GPU."""
    return DataLoader(batches, batch_size=None, sampler=range(start, stop), num_workers=workers,
                      prefetch_factor=prefetch if workers else None, pin_memory=pin_memory,
                      worker_init_fn=_reopen_sources if workers else None,
                      # its own generator: creating the iterator must not draw from the global torch RNG
                      generator=torch.Generator().manual_seed(0))
