"""Floating-point work of the U-Net, counted analytically from its config (no torch needed).

Counts the multiply-accumulates (MACs) of every convolution and transposed convolution, the layers
that dominate the cost; BatchNorm is folded into the convolutions at export, and ReLU, max-pool,
concat and the in-graph normalization are a few operations per pixel next to hundreds of MACs.
One MAC is two FLOPs (a multiply and an add), the convention GPU datasheets use for their peaks.
"""

from __future__ import annotations

from collections.abc import Mapping


def conv_macs(cin: int, cout: int, kernel: int, height: int, width: int) -> int:
    """MACs of a stride-1 ``kernel`` x ``kernel`` convolution with a (cout, height, width) output."""
    return cin * cout * kernel * kernel * height * width


def unet_macs(config: Mapping, size: tuple[int, int]) -> int:
    """MACs of one forward pass of the U-Net described by ``config`` on one image of ``size`` (H, W).

    ``config`` has the keys of ``unet.model.UNetConfig.to_dict()`` (also stored as JSON in an exported
    model's ``model_config`` metadata): width, depth, in_channels, out_channels, upsample, fold. A fold of
    ``f`` (space-to-depth) runs the U-Net at 1/f of ``size`` on f^2 times the input and output channels.
    """
    width, depth, fold = int(config["width"]), int(config["depth"]), int(config.get("fold", 1))
    cin, cout = int(config.get("in_channels", 3)) * fold**2, int(config.get("out_channels", 1)) * fold**2
    upsample = config.get("upsample", "transpose")
    if size[0] % fold or size[1] % fold:
        raise ValueError(f"input size {size[0]}x{size[1]} is not a multiple of the fold {fold}")
    height, img_width = size[0] // fold, size[1] // fold
    multiple = 2**depth
    if height % multiple or img_width % multiple:
        raise ValueError(f"input size {height}x{img_width} is not a multiple of 2**depth = {multiple}")
    if upsample not in ("transpose", "bilinear"):
        raise ValueError(f"unknown upsample mode {upsample!r}")
    chans = [width * 2**k for k in range(depth + 1)]  # e.g. 64, 128, 256, 512, 1024

    def side(k: int) -> tuple[int, int]:  # spatial size at level k
        return height >> k, img_width >> k

    total = conv_macs(cin, chans[0], 3, *side(0)) + conv_macs(chans[0], chans[0], 3, *side(0))  # stem
    for k in range(1, depth + 1):  # encoder: pool, then DoubleConv(chans[k-1] -> chans[k]) at level k
        total += conv_macs(chans[k - 1], chans[k], 3, *side(k)) + conv_macs(chans[k], chans[k], 3, *side(k))
    for k in reversed(range(depth)):  # decoder: level k+1 -> k
        up_in, up_out = chans[k + 1], chans[k + 1] // 2
        # 2x2 stride-2 transposed conv: each output pixel takes one tap per input channel, exactly like
        # the bilinear mode's 1x1 conv at the upsampled size; the same count either way.
        total += conv_macs(up_in, up_out, 1, *side(k))
        total += conv_macs(up_out + chans[k], chans[k], 3, *side(k)) + conv_macs(chans[k], chans[k], 3, *side(k))
    total += conv_macs(chans[0], cout, 1, *side(0))  # head
    return total


def unet_gflops(config: Mapping, size: tuple[int, int]) -> float:
    """GFLOPs (2 x MACs / 1e9) of one forward pass on one image."""
    return 2 * unet_macs(config, size) / 1e9
