"""The U-Net (Ronneberger et al., 2015), written from scratch.

Encoder: ``depth`` stages of (2x2 max-pool, two 3x3 conv-BN-ReLU), channel count doubling each time.
Decoder: ``depth`` stages of (2x upsample halving channels, concat with the skip, two 3x3 conv-BN-ReLU).
Head: a 1x1 conv to one channel, a logit per pixel. With ``width=64, depth=4`` this is the classic
31M-parameter network.

Fold (``fold=f > 1``): the input's f x f pixel blocks are folded into channels first (space-to-depth,
3 -> 3 f^2 channels at 1/f the size) and the head's f^2 channels per logit are unfolded back
(depth-to-space), so the network sees and predicts at the input's full size while its convolutions run
on a grid f times coarser. ``refold`` turns an unfolded network's weights into a folded one's that
computes (almost) the same function, a starting point for fine-tuning.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from unet.config import UNetConfig, Upsample


def check_input_size(height: int, width: int, multiple: int) -> None:
    """Raise a ValueError naming the nearest valid sizes when a side is not a multiple of ``multiple``."""
    if height % multiple == 0 and width % multiple == 0 and height > 0 and width > 0:
        return
    suggestions = sorted({f"{h}x{w}" for h in nearest_multiples(height, multiple) for w in nearest_multiples(width, multiple)})
    raise ValueError(
        f"input size {height}x{width} does not work: height and width must be positive multiples of "
        f"{multiple} (2**depth). Consider resizing or padding to one of {', '.join(suggestions)}."
    )


def nearest_multiples(n: int, multiple: int) -> list[int]:
    below = max(multiple, n // multiple * multiple)
    above = max(multiple, -(-n // multiple) * multiple)
    return sorted({below, above})


class DoubleConv(nn.Sequential):
    """(3x3 conv, BatchNorm, ReLU) twice; keeps the spatial size."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """Halve the spatial size, then DoubleConv."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(cin, cout))


class Up(nn.Module):
    """Double the spatial size (halving channels), concat the skip, then DoubleConv."""

    def __init__(self, cin: int, cout: int, mode: Upsample):
        super().__init__()
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(cin, cin // 2, kernel_size=1),
            )
        self.conv = DoubleConv(cin // 2 + cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (B, cin/2, 2h, 2w)
        return self.conv(torch.cat([skip, x], dim=1))  # (B, cout, 2h, 2w)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config = config or UNetConfig()
        chans = [config.width * 2**k for k in range(config.depth + 1)]  # e.g. 64, 128, 256, 512, 1024
        blocks = config.fold**2  # pixels per folded block
        self.stem = DoubleConv(config.in_channels * blocks, chans[0])
        self.downs = nn.ModuleList(Down(chans[k], chans[k + 1]) for k in range(config.depth))
        self.ups = nn.ModuleList(Up(chans[k + 1], chans[k], config.upsample) for k in reversed(range(config.depth)))
        self.head = nn.Conv2d(chans[0], config.out_channels * blocks, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_channels, H, W) normalized float, H and W multiples of 2**depth
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            check_input_size(x.shape[-2], x.shape[-1], self.config.multiple)
        f = self.config.fold
        if f > 1:
            x = F.pixel_unshuffle(x, f)  # (B, in_channels * f^2, H/f, W/f); channel c * f^2 + i * f + j
        x = self.stem(x)  # (B, w, H/f, W/f)
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(x)  # (B, 2c, h/2, w/2)
        for up in self.ups:
            x = up(x, skips.pop())
        x = self.head(x)  # (B, out_channels * f^2, H/f, W/f)
        return F.pixel_shuffle(x, f) if f > 1 else x  # (B, out_channels, H, W) logits


def refold(state: dict[str, torch.Tensor], source: UNetConfig, target: UNetConfig) -> dict[str, torch.Tensor]:
    """Weights of an unfolded U-Net (``source.fold == 1``) made into those of a folded one (``target``).

    The stem sees the average of each f x f block (its weights spread over the block's channels, divided
    by f^2) and each block's f^2 logits start as copies of the one logit: the folded network begins as the
    unfolded one run on a box-filtered 1/f-size photo with its logits repeated over each block.

    Example:
        >>> folded = UNet(replace(cfg, fold=2)); folded.load_state_dict(refold(unet.state_dict(), cfg, folded.config))
    """
    if source.fold != 1 or target.fold < 2:
        raise ValueError(f"refold goes from fold 1 to fold >= 2, not from {source.fold} to {target.fold}")
    if replace(source, fold=target.fold) != target:
        raise ValueError(f"refold changes only the fold: {source} cannot become {target}")
    blocks = target.fold**2
    stem, head = "stem.0.weight", "head"
    out = dict(state)
    out[stem] = state[stem].repeat_interleave(blocks, dim=1) / blocks  # (w, C, 3, 3) -> (w, C f^2, 3, 3)
    out[f"{head}.weight"] = state[f"{head}.weight"].repeat_interleave(blocks, dim=0)  # (1, w, 1, 1) -> (f^2, w, 1, 1)
    out[f"{head}.bias"] = state[f"{head}.bias"].repeat_interleave(blocks, dim=0)
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
