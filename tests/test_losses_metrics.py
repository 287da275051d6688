import math

import numpy as np
import pytest
import torch

from batch.core.masks import dice, iou
from unet.config import LOSS_NAMES
from unet.losses import LOSSES, bce_dice_loss, bce_lovasz_loss, boundary_weights, lovasz_hinge_loss, soft_dice_loss
from unet.metrics import full_resolution_dice


def test_soft_dice_loss_by_hand():
    logits = torch.zeros(1, 1, 2, 2)  # probability 0.5 everywhere
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # intersection 0.5 * 2 = 1, total 2 + 2 = 4, Dice (2 * 1 + 1) / (4 + 1) = 0.6
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.4)
    assert bce_dice_loss(logits, target).item() == pytest.approx(math.log(2) + 0.4)


def test_losses_near_zero_for_confident_right_answer():
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    logits = (target * 2 - 1) * 20
    assert bce_dice_loss(logits, target).item() < 1e-3


def test_lovasz_hinge_equals_one_minus_iou_at_binary_errors():
    """The Lovász extension agrees with the Jaccard loss wherever the hinge errors are 0 or 1."""
    rng = np.random.default_rng(0)
    truth = rng.random((3, 1, 16, 16)) > 0.6
    truth[2] = False  # an image without a car
    wrong = rng.random(truth.shape) < 0.15  # pixels the prediction gets wrong
    sign = torch.from_numpy(truth).float() * 2 - 1
    logits = torch.where(torch.from_numpy(wrong), 0.0, 1.0) * sign  # margin 1 (error 0) or 0 (error 1)
    prediction = truth ^ wrong
    expected = np.mean([1 - iou(prediction[b, 0], truth[b, 0]) if (prediction[b] | truth[b]).any() else 0.0 for b in range(3)])
    assert lovasz_hinge_loss(logits, torch.from_numpy(truth).float()).item() == pytest.approx(expected, abs=1e-6)


def test_lovasz_hinge_by_hand_and_its_gradient():
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert lovasz_hinge_loss((target * 2 - 1) * 5, target).item() == 0.0  # confident and right
    logits = torch.zeros_like(target, requires_grad=True)  # undecided: every pixel wrong by 1
    loss = lovasz_hinge_loss(logits, target * 0.8 + 0.1)  # soft targets count as car above 0.5
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert torch.all(logits.grad[target > 0] < 0) and torch.all(logits.grad[target == 0] > 0)  # pushes the right way
    assert bce_lovasz_loss(torch.zeros_like(target), target).item() == pytest.approx(math.log(2) + 1.0)


def test_every_configurable_loss_exists():
    assert set(LOSSES) == set(LOSS_NAMES)


def test_dice_and_iou_by_hand():
    pred = np.array([[1, 1, 0, 0]], bool)
    truth = np.array([[1, 0, 1, 0]], bool)
    assert dice(pred, truth) == pytest.approx(0.5)
    assert iou(pred, truth) == pytest.approx(1 / 3)
    empty = np.zeros((2, 2), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(empty, np.ones((2, 2), bool)) == 0.0


def test_dice_refuses_masks_of_different_sizes():
    with pytest.raises(ValueError, match="differ in size"):
        dice(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


def test_full_resolution_dice_upsamples_logits_before_threshold():
    logits = torch.tensor([[[1.0, -3.0]]])  # (1, h=1, w=2)
    # bilinear (align_corners=False) to width 4 samples x = -0.25, 0.25, 0.75, 1.25 -> 1, 0, -2, -3
    assert full_resolution_dice(logits, np.array([[1, 0, 0, 0]], bool)) == pytest.approx(1.0)
    # upsampling the thresholded mask instead would have marked two pixels
    assert full_resolution_dice(logits, np.array([[1, 1, 0, 0]], bool)) == pytest.approx(2 / 3)


def test_boundary_weights_mark_the_band_around_the_outline():
    target = torch.zeros(1, 1, 12, 12)
    target[..., 4:8, 4:8] = 1  # a 4x4 car
    weights = boundary_weights(target, weight=2.0, radius=1)
    band = weights[0, 0] > 1
    assert weights.min() == 1 and weights.max() == 3
    ring = torch.zeros(12, 12, dtype=torch.bool)
    ring[3:9, 3:9] = True
    ring[5:7, 5:7] = False  # the car's inside, 2 px from its outline
    assert torch.equal(band, ring)  # within 1 px of the outline, on both sides, and nowhere else
    assert boundary_weights(torch.zeros(1, 1, 8, 8), weight=2.0).eq(1).all()  # no car, no outline


def test_boundary_weighting_raises_the_loss_of_errors_on_the_outline():
    target = torch.zeros(1, 1, 12, 12)
    target[..., 4:8, 4:8] = 1
    logits = torch.where(target > 0, 4.0, -4.0)
    logits[..., 4, 4] = -4.0  # one wrong pixel on the outline
    weights = boundary_weights(target, weight=4.0)
    for loss in (bce_dice_loss, bce_lovasz_loss):
        assert loss(logits, target, weights) > loss(logits, target)
