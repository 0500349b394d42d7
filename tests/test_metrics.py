"""Dice and the Table 4 XS/XL split against hand-computed values."""
import numpy as np
import pytest
import torch

from fastgicn.errors import ConfigError
from fastgicn.models import dice_by_size, dice_score


def test_dice_hand_computed_numpy_and_torch():
    x = np.array([[1, 1, 0, 0]], bool)
    y = np.array([[1, 0, 1, 0]], bool)
    assert dice_score(x, y) == pytest.approx(2 * 1 / (2 + 2))
    assert dice_score(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(0.5)
    assert dice_score(x, x) == 1.0
    assert dice_score(x, ~x) == 0.0


def test_dice_of_two_empty_masks_is_one_and_shapes_must_match():
    assert dice_score(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert dice_score(np.zeros((3, 3)), np.eye(3)) == 0.0
    with pytest.raises(ConfigError, match="differ"):
        dice_score(np.zeros((3, 3)), np.zeros((3, 4)))


def test_size_split_by_50000_pixel_components():
    truth = np.zeros((800, 800), bool)
    truth[10:110, 10:110] = True            # 10,000 px: small (XS)
    truth[300:600, 300:600] = True          # 90,000 px: large (XL)
    pred = np.zeros_like(truth)
    pred[10:60, 10:110] = True              # half of the small region
    pred[300:600, 300:600] = True           # all of the large one
    pred[700:710, 700:710] = True           # a 100 px false positive touching nothing: judged small
    r = dice_by_size(pred, truth)
    assert r["regions_small"] == 1 and r["regions_large"] == 1
    assert r["dice_small"] == pytest.approx(2 * 5_000 / (10_000 + 5_000 + 100))
    assert r["dice_large"] == pytest.approx(1.0)
    assert r["dice"] == pytest.approx(2 * 95_000 / (100_000 + 95_100))


def test_prediction_is_judged_with_the_truth_region_it_overlaps_most():
    truth = np.zeros((600, 600), bool)
    truth[0:250, 0:250] = True              # 62,500 px: large
    pred = np.zeros_like(truth)
    pred[0:100, 0:100] = True               # a small blob inside the large region counts for XL
    r = dice_by_size(pred, truth)
    assert r["regions_small"] == 0
    assert r["dice_small"] == 1.0           # no small truth, no prediction judged small
    assert r["dice_large"] == pytest.approx(2 * 10_000 / (62_500 + 10_000))


def test_diagonal_pixels_are_one_component():
    truth = np.zeros((10, 10), bool)
    truth[2, 2] = truth[3, 3] = True
    assert dice_by_size(truth, truth, small_pixels=2)["regions_large"] == 1
