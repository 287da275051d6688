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


def boundary_weights(target: torch.Tensor, weight: float, radius: int = 2) -> torch.Tensor:
    """Per-pixel BCE weights: 1 + ``weight`` within ``radius`` pixels of the target's outline, 1 elsewhere.

    The outline is where a (2 radius + 1)-square window holds both car and background (the target's
    dilation differs from its erosion). Most wrong pixels of a good model lie there (the 2017 3rd-place
    Carvana solution weighted its BCE the same way). target: (B, 1, H, W) in [0, 1] -> (B, 1, H, W).
    """
    window = 2 * radius + 1
    dilated = F.max_pool2d(target.float(), window, stride=1, padding=radius)
    eroded = -F.max_pool2d(-target.float(), window, stride=1, padding=radius)
    return 1.0 + weight * (dilated > eroded).float()


def bce_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, dice_weight: float = 1.0
) -> torch.Tensor:
    """Binary cross-entropy on logits (per-pixel ``weight``, e.g. ``boundary_weights``) plus the soft Dice loss."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), weight=weight)
    return bce + dice_weight * soft_dice_loss(logits, target)


def lovasz_hinge_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Lovász hinge (Berman et al., CVPR 2018): the tight convex surrogate of 1 - IoU, per image, averaged
    over the batch. logits, target: (B, 1, H, W); soft targets count as car above 0.5.

    At a vector of hinge errors in {0, 1} it equals 1 - IoU of the prediction those errors describe;
    it optimises the image's overlap, not each pixel's, as the Dice/IoU metric does.
    """
    logits = logits.float().flatten(1)  # (B, N)
    labels = (target.float().flatten(1) > 0.5).float()
    errors = 1.0 - logits * (2.0 * labels - 1.0)  # hinge errors, (B, N)
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    return (F.relu(errors_sorted) * lovasz_grad(torch.gather(labels, 1, order))).sum(1).mean()


def lovasz_grad(labels_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss at labels sorted by decreasing error: (B, N) -> (B, N)."""
    positives = labels_sorted.sum(1, keepdim=True)  # (B, 1)
    intersection = positives - labels_sorted.cumsum(1)
    union = positives + (1.0 - labels_sorted).cumsum(1)
    jaccard = 1.0 - intersection / union  # (B, N), union >= 1 from the first background pixel on
    return torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)


def bce_lovasz_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy on logits (per-pixel ``weight``) plus the Lovász hinge: fine-tuning towards the overlap metric."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), weight=weight)
    return bce + lovasz_hinge_loss(logits, target)


LOSSES = {"bce-dice": bce_dice_loss, "bce-lovasz": bce_lovasz_loss}  # unet-train --loss
