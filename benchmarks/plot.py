"""results.png with matplotlib (the ``bench`` extra): three panels side by side.

1. Inference alone: images/s against batch size, one line per provider and model (log-log axes).
2. Throughput by stage: images/s of each decoder, of inference alone, end to end and of the naive loops.
3. End-to-end stages: milliseconds per photo in each stage of ``unet-batch segment``.

A ``Figure`` is drawn without pyplot, so no global state or display backend is involved.
"""

from __future__ import annotations

from batch.extras import require
from benchmarks.report import best_inference_rows, fmt, machine_name, running_stages

STAGE_COLORS = {"decode": "tab:blue", "inference": "tab:green", "end to end": "tab:red", "baseline": "tab:gray"}


def draw_results(results: dict):
    """The three panels under a title naming the machine, suite, photos and input size: a matplotlib ``Figure``."""
    require("matplotlib", "bench", what="drawing results.png")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(19.2, 7.2), dpi=100, layout="constrained")
    sweep, stages, e2e = figure.subplots(1, 3)
    photos, (h, w) = results["settings"]["photos"], results["settings"]["input_size"]
    figure.suptitle(
        f"unet-bench {results['suite']}: {machine_name(results)} · {photos['kind']} photos · input {h}x{w} · "
        f"{results['machine']['date']}"
    )
    draw_sweep(sweep, results)
    draw_bars(stages, stage_bars(results), "Throughput by stage", "images/s, median over repeats")
    draw_e2e_stages(e2e, results["end_to_end"])
    return figure


def draw_sweep(ax, results: dict) -> None:
    """Panel 1: images/s against batch size, log-log, one line per provider and model."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results["inference"]:
        if r["status"] == "ok":
            series.setdefault(f"{r['label']} {r['model']}", []).append((r["batch_size"], r["images_per_second"]["median"]))
    ax.set_title("Inference alone: images/s against batch size (log-log)", loc="left")
    if not series:
        show_message(ax, "No inference measurement succeeded; see results.md for the reasons.")
        return
    for name, points in series.items():
        batches, rates = zip(*sorted(points))
        ax.plot(batches, rates, marker="o", label=name)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = sorted({b for points in series.values() for b, _ in points})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 1-2-5 ticks, labelled as plain numbers
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: fmt(value)))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize="small", frameon=False)


def stage_bars(results: dict) -> list[tuple[str, float, str]]:
    """(label, images/s, stage) of panel 2: decoders, inference alone, end to end, the peers."""
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
    ok_baselines = (r for r in results["baselines"] if r["status"] == "ok")
    return bars + [(f"naive: {r['label']}", r["images_per_second"]["median"], "baseline") for r in ok_baselines]


def draw_e2e_stages(ax, e2e: dict) -> None:
    """Panel 3: ms per photo in each per-photo stage of the median end-to-end run."""
    stages = running_stages(e2e)
    setup = e2e.get("setup_seconds")
    subtitle = f"ms per photo in unet-batch ({e2e.get('model') or '—'}, median run)"
    subtitle += f"\none-time set-up ({fmt(setup['median'])} s per run) not shown" if setup else ""
    if not stages:
        ax.set_title(f"End-to-end stages\n{subtitle}", loc="left")
        show_message(ax, f"End to end did not complete: {e2e.get('reason') or 'no stages reported'}")
        return
    draw_bars(ax, [(name, ms, "end to end") for name, ms in stages.items()], "End-to-end stages", subtitle)
    ax.set_xlabel("ms per photo")


def draw_bars(ax, bars: list[tuple[str, float, str]], title: str, subtitle: str) -> None:
    """Horizontal bars, first at the top, each labelled with its value, on a linear axis from 0."""
    ax.set_title(f"{title}\n{subtitle}", loc="left")
    if not bars:
        show_message(ax, "Nothing was measured successfully; see results.md.")
        return
    labels, values, stages = zip(*bars)
    drawn = ax.barh(labels, values, color=[STAGE_COLORS.get(stage, "tab:blue") for stage in stages])
    ax.bar_label(drawn, labels=[fmt(v) for v in values], padding=3, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlim(0, max(values) * 1.2)
    ax.set_xlabel("images/s")
    ax.grid(True, axis="x", alpha=0.3)


def show_message(ax, message: str) -> None:
    ax.text(0.02, 0.95, message, transform=ax.transAxes, va="top", wrap=True, color="dimgray")
    ax.set_xticks([])
    ax.set_yticks([])
