"""Segmentation losses as pure functions of logits and (possibly soft) targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per image, averaged over the batch. logits, target: (B, 1, H, W), target in [0, 1]."""
    prob = torch.sigmoid(logits.float()).flatten(1)  # (B, H*W)
    target = target.float().flatten(1)
    intersection = (prob * target).sum(1)
    total = prob.sum(1) + target.sum(1)
    return (1.0 - (2.0 * intersection + eps) / (total + eps)).mean()


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy on logits plus ``dice_weight`` times the soft Dice loss."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return bce + dice_weight * soft_dice_loss(logits, target)
