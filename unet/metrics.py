"""The Kaggle Carvana metric: mean per-image Dice at each image's full original resolution."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from batch.core.contract import probability_to_logit
from batch.core.masks import dice


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, 1, h, w) logits to (B, 1, H, W), as the batch runner does."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def full_resolution_dice(logits: torch.Tensor, truth: np.ndarray, threshold: float = 0.5) -> float:
    """Dice of one image's (1, h, w) logits, upsampled to the (H, W) bool ``truth`` before the threshold."""
    full = upsample_logits(logits[None], truth.shape)[0, 0]  # (H, W)
    return dice((full > probability_to_logit(threshold)).cpu().numpy(), truth)


def mean_dice(scores: Iterable[float]) -> float:
    scores = list(scores)
    return float(np.mean(scores)) if scores else float("nan")
