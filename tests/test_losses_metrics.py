import math

import numpy as np
import pytest
import torch

from batch.masks import dice, iou
from unet.losses import bce_dice_loss, soft_dice_loss
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
