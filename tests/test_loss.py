"""GicnLoss against values computed by hand from the paper's equations (1) and (2)."""
import math

import pytest
import torch

from fastgicn.errors import ConfigError
from fastgicn.models import GicnLoss

K = 5e-4


def test_uniform_logits_give_ln2_plus_half_the_hand_computed_loc_term():
    logits = torch.zeros(1, 2, 1, 2)           # P(tumour) = 0.5 at both pixels
    target = torch.tensor([[[1, 0]]])
    # CE = ln 2 at every pixel; sum yP = 0.5, sum y = 1, sum P = 1.
    expected = math.log(2) + 0.5 * (0.5 - (0.5 + K) / (1 + 1 + 2 * K))
    assert GicnLoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_confident_correct_prediction_has_no_loss_and_empty_mask_is_not_nan():
    # Empty ground truth (the paper's reason for k) with a confident "normal" prediction.
    logits = torch.tensor([20.0, -20.0]).view(1, 2, 1, 1).expand(1, 2, 3, 3).clone().requires_grad_()
    target = torch.zeros(1, 3, 3, dtype=torch.long)
    loss = GicnLoss()(logits, target)
    # sum P = 9 * sigmoid(-40) ~ 3.8e-17, so L_loc = 0.5 - k / (2k + tiny) ~ 0 and CE ~ 0.
    assert loss.item() == pytest.approx(0.0, abs=1e-9)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_loc_term_is_per_image_then_averaged_over_the_batch():
    # Image 1: all tumour, predicted P = sigmoid(2). Image 2: no tumour, same prediction.
    logits = torch.zeros(2, 2, 2, 2)
    logits[:, 1] = 2.0
    target = torch.zeros(2, 2, 2, dtype=torch.long)
    target[0] = 1
    p = 1 / (1 + math.exp(-2.0))
    ce = (4 * -math.log(p) + 4 * -math.log(1 - p)) / 8
    loc1 = 0.5 - (4 * p + K) / (4 + 4 * p + 2 * K)
    loc2 = 0.5 - (0 + K) / (0 + 4 * p + 2 * K)
    loss_fn = GicnLoss()
    assert loss_fn(logits, target).item() == pytest.approx(ce + 0.5 * (loc1 + loc2) / 2, rel=1e-6)
    assert loss_fn.last_terms["loc"] == pytest.approx((loc1 + loc2) / 2, rel=1e-6)


def test_alpha_weights_the_loc_term():
    # Two pixels, P(tumour) = sigmoid(1) at both, one tumour pixel: every term by hand.
    logits = torch.zeros(1, 2, 1, 2)
    logits[:, 1] = 1.0
    target = torch.tensor([[[1, 0]]])
    p = 1 / (1 + math.exp(-1.0))
    ce = (-math.log(p) - math.log(1 - p)) / 2
    loc = 0.5 - (p + K) / (1 + 2 * p + 2 * K)
    assert GicnLoss(alpha=0.0)(logits, target).item() == pytest.approx(ce, rel=1e-6)
    assert GicnLoss(alpha=1.0)(logits, target).item() == pytest.approx(ce + loc, rel=1e-6)


def test_bad_shapes_and_parameters_raise():
    with pytest.raises(ConfigError, match="N x H x W"):
        GicnLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5))
    with pytest.raises(ConfigError, match="k > 0"):
        GicnLoss(k=0)
