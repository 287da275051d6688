"""results.png, drawn with Pillow alone: three labelled panels side by side.

1. Inference alone: images/s against batch size, one line per provider and model (log-log axes).
2. Throughput by stage: images/s of each decoder, of inference alone, end to end and of the naive loops.
3. End-to-end stages: milliseconds per photo in each stage of ``unet-batch segment``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from benchmarks.report import best_inference_rows, fmt, machine_name, running_stages

PANEL_W, PANEL_H, TITLE_H = 640, 660, 56
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 70, 24, 56, 170  # the bottom margin holds panel 1's legend
LEGEND_ROWS = 5
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
STAGE_COLORS = {"decode": "#1f77b4", "inference": "#2ca02c", "end to end": "#d62728", "baseline": "#7f7f7f"}
INK, GRID = "#222222", "#dddddd"


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


@dataclass(frozen=True)
class Box:
    """The plotting area of a panel, in image pixels."""

    left: int
    top: int
    right: int
    bottom: int


def panel_box(index: int) -> Box:
    x0 = index * PANEL_W
    return Box(x0 + MARGIN_L, TITLE_H + MARGIN_T, x0 + PANEL_W - MARGIN_R, TITLE_H + PANEL_H - MARGIN_B)


def log_ticks(low: float, high: float) -> list[float]:
    """1-2-5 ticks covering [low, high] (positive)."""
    ticks = []
    for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        ticks += [m * 10.0**exponent for m in (1, 2, 5) if low <= m * 10.0**exponent <= high]
    return ticks or [low, high]


def nice_max(value: float) -> float:
    """The next 1-2-5 step at or above ``value`` (positive)."""
    exponent = 10.0 ** math.floor(math.log10(value))
    return next(m * exponent for m in (1, 2, 5, 10) if m * exponent >= value)


def draw_title(draw: ImageDraw.ImageDraw, index: int, title: str, subtitle: str) -> None:
    x0 = index * PANEL_W
    draw.text((x0 + MARGIN_L, TITLE_H + 10), title, fill=INK, font=font(17))
    draw.text((x0 + MARGIN_L, TITLE_H + 32), subtitle, fill="#666666", font=font(12))


def draw_message(draw: ImageDraw.ImageDraw, box: Box, message: str) -> None:
    draw.rectangle([box.left, box.top, box.right, box.bottom], outline=GRID)
    draw.multiline_text((box.left + 12, box.top + 12), wrap(message, 60), fill="#666666", font=font(13))


def wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def draw_sweep(draw: ImageDraw.ImageDraw, results: dict) -> None:
    """Panel 1: images/s against batch size, log-log."""
    box = panel_box(0)
    draw_title(draw, 0, "Inference alone", "images/s against batch size (log-log)")
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results["inference"]:
        if r["status"] == "ok":
            series.setdefault(f"{r['label']} {r['model']}", []).append((r["batch_size"], r["images_per_second"]["median"]))
    if not series:
        draw_message(draw, box, "No inference measurement succeeded; see results.md for the reasons.")
        return
    batches = sorted({b for points in series.values() for b, _ in points})
    rates = [v for points in series.values() for _, v in points]
    x_lo, x_hi = math.log2(batches[0]), math.log2(batches[-1])
    y_lo, y_hi = math.log10(min(rates) / 1.5), math.log10(max(rates) * 1.5)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1

    def point(batch: int, rate: float) -> tuple[float, float]:
        x = box.left + (math.log2(batch) - x_lo) / (x_hi - x_lo) * (box.right - box.left)
        y = box.bottom - (math.log10(rate) - y_lo) / (y_hi - y_lo) * (box.bottom - box.top)
        return x, y

    small = font(12)
    for tick in log_ticks(10**y_lo, 10**y_hi):
        _, y = point(batches[0], tick)
        draw.line([box.left, y, box.right, y], fill=GRID)
        draw.text((box.left - 8, y), fmt(tick), fill=INK, font=small, anchor="rm")
    for batch in batches:
        x, _ = point(batch, 10**y_lo)
        draw.line([x, box.top, x, box.bottom], fill=GRID)
        draw.text((x, box.bottom + 8), str(batch), fill=INK, font=small, anchor="mt")
    draw.rectangle([box.left, box.top, box.right, box.bottom], outline=INK)
    draw.text(((box.left + box.right) / 2, box.bottom + 30), "batch size", fill=INK, font=font(13), anchor="mt")
    draw.text((box.left - 62, box.top - 18), "images/s", fill=INK, font=font(13))
    for i, (name, points) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        xy = [point(b, v) for b, v in sorted(points)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=3)
        for x, y in xy:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        column, row = divmod(i, LEGEND_ROWS)
        x, y = box.left + column * (box.right - box.left) // 2, box.bottom + 56 + 18 * row
        draw.rectangle([x, y + 1, x + 14, y + 13], fill=color)
        draw.text((x + 20, y), name, fill=INK, font=small)


def stage_bars(results: dict) -> list[tuple[str, float, str]]:
    """(label, images/s, stage) of panel 2."""
    bars = [
        (f"decode: {r['label']}", r["images_per_second"]["median"], "decode") for r in results["decode"] if r["status"] == "ok"
    ]
    reference = results["ratios"].get("inference_reference")
    if reference:
        bars.append((f"inference: {reference['label']} b{reference['batch_size']}", reference["images_per_second"], "inference"))
    else:
        bars += [
            (f"inference: {r['label']} {r['model']}", r["images_per_second"]["median"], "inference")
            for r in best_inference_rows(results)[:1]
        ]
    e2e = results["end_to_end"]
    if e2e["status"] == "ok":
        bars.append((f"end to end: unet-batch b{e2e['batch_size']}", e2e["images_per_second"]["median"], "end to end"))
    bars += [
        (f"naive: {r['label']}", r["images_per_second"]["median"], "baseline")
        for r in results["baselines"]
        if r["status"] == "ok"
    ]
    return bars


def draw_bars(draw: ImageDraw.ImageDraw, index: int, bars: list[tuple[str, float, str]], unit: str) -> None:
    """Horizontal bars with their labels above and values at their ends, on a linear axis from 0."""
    box = panel_box(index)
    top = max(v for _, v, _ in bars)
    scale_max = nice_max(top * 1.15)
    row = min(56, (box.bottom - box.top) // len(bars))
    small = font(12)
    for k in range(6):
        value = scale_max * k / 5
        x = box.left + value / scale_max * (box.right - box.left)
        draw.line([x, box.top, x, box.bottom], fill=GRID)
        draw.text((x, box.bottom + 8), fmt(value), fill=INK, font=small, anchor="mt")
    draw.text(((box.left + box.right) / 2, box.bottom + 30), unit, fill=INK, font=font(13), anchor="mt")
    for i, (label, value, stage) in enumerate(bars):
        y = box.top + i * row
        x = box.left + value / scale_max * (box.right - box.left)
        draw.text((box.left + 2, y + 2), label, fill=INK, font=small)
        draw.rectangle([box.left, y + 18, max(x, box.left + 1), y + row - 8], fill=STAGE_COLORS.get(stage, COLORS[0]))
        draw.text((x + 6, y + 18 + (row - 26) / 2), fmt(value), fill=INK, font=small, anchor="lm")
    draw.line([box.left, box.top, box.left, box.bottom], fill=INK)


def draw_results(results: dict) -> Image.Image:
    """The three panels with a header line naming the machine and suite."""
    image = Image.new("RGB", (3 * PANEL_W, TITLE_H + PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    photos = results["settings"]["photos"]
    h, w = results["settings"]["input_size"]
    header = (
        f"unet-bench {results['suite']}: {machine_name(results)} · {photos['kind']} photos · input {h}x{w} · "
        f"{results['machine']['date']}"
    )
    draw.text((16, 16), header, fill=INK, font=font(18))

    draw_sweep(draw, results)

    draw_title(draw, 1, "Throughput by stage", "images/s, median over repeats")
    bars = stage_bars(results)
    if bars:
        draw_bars(draw, 1, bars, "images/s")
    else:
        draw_message(draw, panel_box(1), "Nothing was measured successfully; see results.md.")

    e2e = results["end_to_end"]
    setup = e2e.get("setup_seconds")
    draw_title(
        draw,
        2,
        "End-to-end stages",
        f"ms per photo in unet-batch ({e2e.get('model') or '—'}, median run)"
        + (f"; one-time set-up {fmt(setup['median'])} s not shown" if setup else ""),
    )
    stages = running_stages(e2e)
    if stages:
        draw_bars(draw, 2, [(name, ms, "end to end") for name, ms in stages.items()], "ms per photo")
    else:
        draw_message(draw, panel_box(2), f"End to end did not complete: {e2e.get('reason') or 'no stages reported'}")
    return image
