"""Small training data and configs shared by the training tests."""
import numpy as np

from fastgicn.train import ArraySource, TrainConfig


def striped_source(size=256, seed=0):
    """Glass on the left quarter, tissue elsewhere, tumour (darker) in the bottom half of the tissue."""
    rng = np.random.default_rng(seed)
    rgb = np.full((size, size, 3), 240, np.uint8)
    mask = np.zeros((size, size), bool)
    rgb[:, size // 4:] = rng.integers(150, 200, (size, 3 * size // 4, 3))
    mask[size // 2:, size // 4:] = True
    rgb[mask] //= 2
    return ArraySource(rgb, mask)


def tiny_config(**overrides):
    """A width-1/16 ResNet50-GICN-GPP, a few iterations of batch 2, constant lr."""
    values = dict(model="resnet50_gicn_gpp", model_kwargs={"width": 0.0625}, iterations=4, batch_size=2,
                  schedule="constant", lr=0.01, log_every=0, seed=7)
    values.update(overrides)
    return TrainConfig(**values)
