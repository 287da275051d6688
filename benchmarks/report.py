"""Readable forms of results.json: the results.md tables, results.png, and the side-by-side comparison of two runs.

results.png (matplotlib, the ``bench`` extra) has three panels: images/s of inference alone against
batch size, one line per provider and model, on log-log axes; the throughput of every stage side by
side; and the milliseconds per photo in each stage of ``unet-batch segment``. It is drawn on a
``Figure`` without pyplot, so no global state or display backend is involved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from batch.core.devices import parse_device
from batch.core.extras import require
from batch.core.files import write_atomic
from benchmarks.config import BenchError
from benchmarks.end_to_end import CPU_END_TO_END, ONE_TIME_STAGES

SCHEMA_PREFIX = "unet-bench/"
STAGE_NAMES = {
    "decode": "decode + resize",
    "inference": "inference alone",
    "end_to_end": "end to end",
    "baseline": "naive baseline",
}


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with about ``digits`` significant digits, never in scientific notation; "—" for None."""
    if value is None:
        return "—"
    if value == 0:
        return "0"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 else f"{value:.2e}"


def succeeded(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok"]


def median_rate(row: dict) -> float:
    return row["images_per_second"]["median"]


def spread(stats: dict | None) -> str:
    return f"{fmt(stats['q1'])}–{fmt(stats['q3'])}" if stats else "—"


def machine_name(results: dict) -> str:
    facts = results["machine"]
    device = parse_device(results["device"])
    if device.is_cuda:
        name = next((g["name"] for g in facts["gpus"] if g["index"] == device.index), "unknown GPU")
        return f"{name} ({results['device']})"
    cpu = facts["cpu"]
    return f"{cpu['model'] or 'unknown CPU'}, {cpu['usable_cores']} cores (CPU only)"


def load_results(path: str | Path) -> dict:
    """Read a results.json (or the one in a run folder), checking it is one; errors name the file."""
    path = Path(path)
    if path.is_dir():  # a run folder (the --out of `unet-bench run`)
        if not (path / "results.json").is_file():
            raise BenchError(f"{path} holds no results.json: pass a folder written by `unet-bench run`, or a results.json")
        path = path / "results.json"
    try:
        results = json.loads(path.read_text())
    except OSError as e:
        raise BenchError(f"cannot read {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise BenchError(
            f"{path} is not JSON ({e.msg} at line {e.lineno}): pass a results.json written by `unet-bench run`"
        ) from e
    if not isinstance(results, dict) or not str(results.get("schema", "")).startswith(SCHEMA_PREFIX):
        raise BenchError(
            f"{path} is not a unet-bench results file (no '{SCHEMA_PREFIX}…' schema): pass a results.json from `unet-bench run`"
        )
    return results


# ---- results.md -------------------------------------------------------------------------------------


def rate_row(stage: str, what: str, batch: str, r: dict, notes: str) -> list[str]:
    """A summary row: the stage, what ran, its batch, median images/s and IQR, and notes."""
    rate = r["images_per_second"]
    return [STAGE_NAMES[stage], what, batch, fmt(rate["median"]), spread(rate), notes]


def not_run_row(stage: str, r: dict) -> list[str]:
    return [STAGE_NAMES[stage], r["label"], "—", "—", "—", f"{r['status']}: {r['reason']}"]


def summary_rows(results: dict) -> list[list[str]]:
    mp = "{} MP/s of source photos"
    rows = [
        rate_row("decode", f"{r['label']}, {r['threads']} threads", "—", r, mp.format(fmt(r["megapixels_per_second"]["median"])))
        if r["status"] == "ok"
        else not_run_row("decode", r)
        for r in results["decode"]
    ]
    for r in best_inference_rows(results):
        tflops = f"{fmt(r['achieved_tflops'])} TFLOP/s" if r["achieved_tflops"] is not None else ""
        peak = f" ({fmt(100 * r['fraction_of_peak'])} % of {fmt(r['peak_tflops'])})" if r["fraction_of_peak"] is not None else ""
        rows.append(rate_row("inference", f"{r['label']}, {r['model']} (fastest batch)", str(r["batch_size"]), r, tflops + peak))
    rows += [end_to_end_row(results[key]) for key in CPU_END_TO_END if results.get(key)]
    return rows + [
        rate_row("baseline", f"{r['label']} ({r['device']})", str(r.get("batch_size", 1)), r, f"{r['images']} photos")
        if r["status"] == "ok"
        else not_run_row("baseline", r)
        for r in results["baselines"]
    ]


def end_to_end_row(e2e: dict) -> list[str]:
    what = f"unet-batch segment, {e2e['model']}" + (f" {e2e['precision'].upper()}" if e2e.get("precision") else "")
    what += f", {e2e['runtime']}" if e2e.get("runtime") else ""
    if e2e["status"] != "ok":
        return [STAGE_NAMES["end_to_end"], what, "—", "—", "—", f"failed: {e2e['reason']}"]
    notes = (
        f"{e2e['images']} photos x {e2e['repeats']} runs; decoder {e2e['decoder']}, device {e2e['device']}; "
        f"after {fmt(e2e['setup_seconds']['median'])} s of set-up (model load): "
        f"{fmt(e2e['runner_images_per_second']['median'])} images/s counting it, "
        f"{fmt(e2e['wall_images_per_second']['median'])} counting process start too"
    )
    return rate_row("end_to_end", what, str(e2e["batch_size"]), e2e, notes)


def best_inference_rows(results: dict) -> list[dict]:
    """The fastest batch of each (provider, precision, model), in sweep order."""
    best: dict[tuple, dict] = {}
    for r in results["inference"]:
        if r["status"] != "ok":
            continue
        key = (r["label"], r["model"])
        if key not in best or r["images_per_second"]["median"] > best[key]["images_per_second"]["median"]:
            best[key] = r
    return list(best.values())


RATIO_PREFIXES = {"ratios": "", "ratios_int8": "INT8 ", "ratios_openvino": "OpenVINO ", "ratios_int8_openvino": "OpenVINO INT8 "}
RELATIVE = {  # ratios between end-to-end runs: key -> what it compares
    "end_to_end_over_fp32": "{prefix}/ FP32, end to end",
    "inference_over_fp32": "{prefix}/ FP32, inference alone (fastest batches)",
    "end_to_end_over_onnxruntime": "{prefix}/ ONNX Runtime, end to end",
    "inference_over_onnxruntime": "{prefix}/ ONNX Runtime, inference alone (fastest batches)",
}


def ratio_lines(results: dict) -> list[str]:
    """The headline ratios: end to end over each naive loop and over inference alone; on a CPU, INT8's and OpenVINO's
    too, and how they compare with FP32 and with ONNX Runtime."""
    labels = {b["baseline"]: b["label"] for b in results["baselines"]}
    lines = e2e_ratio_lines(results["ratios"], labels, "") or ["- no ratios: the end-to-end run did not complete"]
    for key, prefix in list(RATIO_PREFIXES.items())[1:]:
        found = results.get(key)
        if not found:
            continue
        lines += [
            f"- {what.format(prefix=prefix)}: **{fmt(found[name])}x**"
            for name, what in RELATIVE.items()
            if found.get(name) is not None
        ]
        lines += e2e_ratio_lines(found, labels, prefix)
    return lines


def e2e_ratio_lines(ratios: dict, labels: dict[str, str], prefix: str) -> list[str]:
    lines = [
        f"- {prefix}end to end / naive {labels.get(name, name)}: **{fmt(value)}x**"
        for name, value in ratios["end_to_end_over_baseline"].items()
    ]
    if ratios["end_to_end_over_inference"] is not None:
        ref = ratios["inference_reference"]
        lines.append(
            f"- {prefix}end to end / inference alone ({ref['label']}, {ref['model']}, batch {ref['batch_size']}): "
            f"**{fmt(ratios['end_to_end_over_inference'])}**"
        )
    return lines


def write_files(out_dir: Path, texts: dict[str, str]) -> dict[str, Path]:
    """Write each ``{name: text}`` into ``out_dir``, whole or not at all; return the paths by suffix ("json", "md")."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        write_atomic(out_dir / name, text.encode())
    return {Path(name).suffix[1:]: out_dir / name for name in texts}


def as_json(document: dict) -> str:
    return json.dumps(document, indent=2) + "\n"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def inference_table(results: dict) -> str:
    header = ["provider", "model", "batch", "images/s", "IQR", "ms / batch", "GFLOP / image", "TFLOP/s", "% of peak", "GPU MiB"]
    return table([*header, "status"], [inference_cells(r) for r in results["inference"]])


def inference_cells(r: dict) -> list[str]:
    ips, per_batch, of_peak = r["images_per_second"], r["seconds_per_batch"], r["fraction_of_peak"]
    speed = [fmt(ips["median"]) if ips else "—", spread(ips), fmt(1e3 * per_batch["median"]) if per_batch else "—"]
    work = [fmt(r["gflop_per_image"]), fmt(r["achieved_tflops"]), fmt(100 * of_peak) if of_peak is not None else "—"]
    status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
    return [r["label"], r["model"], str(r["batch_size"]), *speed, *work, fmt(r["gpu_memory_mib"]), status]


def stage_table(results: dict) -> str:
    e2e = results["end_to_end"]
    stages = running_stages(e2e)
    if not stages:
        return "_No end-to-end stages: the run did not complete._"
    total = sum(stages.values())
    rows = [[name, fmt(ms), f"{100 * ms / total:.0f} %" if total else "—"] for name, ms in stages.items()]
    return table(["stage (unet-batch report)", "ms / photo", "share of stage time"], rows) + (
        f"\n\nOne-time set-up (finding photos, loading the model) took {fmt(e2e['setup_seconds']['median'])} s per run and is "
        "left out. Stage times are busy time summed over the runner's threads, so stages that overlap add up to more "
        "than the wall time."
    )


def running_stages(e2e: dict) -> dict[str, float]:
    """ms per photo of each stage that runs per photo (the one-time set-up stages left out)."""
    return {name: ms for name, ms in (e2e.get("stage_ms_per_image") or {}).items() if name not in ONE_TIME_STAGES}


def memory_table(results: dict) -> str:
    m = results["memory"]
    rows = [
        ["benchmark process, peak RSS", fmt(m["benchmark_peak_rss_mib"]), "resource.getrusage"],
        ["unet-batch process, peak RSS", fmt(m["end_to_end_peak_rss_mib"]), "its own ru_maxrss (started from a small launcher)"],
    ]
    if parse_device(results["device"]).is_cuda:
        rows += [
            ["inference sweep, GPU", fmt(m["inference_gpu_peak_mib"]), m["inference_gpu_method"] or "—"],
            ["unet-batch, GPU", fmt(m["end_to_end_gpu_peak_mib"]), m["end_to_end_gpu_method"] or "—"],
        ]
    return table(["what", "MiB", "measured with"], rows)


def host_cost_table(results: dict) -> str:
    host = results.get("host_cost") or {}
    if host.get("status") != "ok":
        return f"_Not measured: {host.get('reason') or 'this results file predates it'}._"
    stages = host["ms_per_photo"]
    rows = [[stage, fmt(ms)] for stage, ms in stages.items()]
    rows += [["total, 8-bit PNG", fmt(host["total_ms"])], ["total, 1-bit PNG (png1)", fmt(host["total_ms_png1"])]]
    h, w = host["input_size"]
    return table(["stage", "ms of one core per photo"], rows) + (
        f"\n\nMedians over {host['photos']} photos decoded to {h}x{w}, CPU time of one thread through the runner's own "
        f"functions (wall time of the whole 8-bit path: {fmt(host['wall_ms'])} ms). On a GPU host these milliseconds, not "
        f"the GPU, bound the throughput: {host['gpu_host_cores']} cores feed at most "
        f"**{fmt(host['gpu_host_photos_per_second'])} photos/s** (8-bit PNG masks)."
    )


def machine_table(results: dict) -> str:
    facts, cpu, git = results["machine"], results["machine"]["cpu"], results["machine"]["git"]
    gpus = [f"{g['name']} (driver {g['driver']}, CUDA {g['cuda_driver_api']}, {fmt(g['memory_mib'])} MiB)" for g in facts["gpus"]]
    revision = (git["commit"][:12] + (" (uncommitted changes)" if git["dirty"] else "")) if git["commit"] else "unknown"
    cores = f"{cpu['usable_cores']} usable of {cpu['logical_cores']} logical cores, {fmt(cpu['memory_gib'])} GiB"
    load = f"{fmt(cpu['load_average_1min'])} at start, {fmt(facts.get('load_average_1min_at_end'))} at end"
    rows = [
        ["date (UTC)", facts["date"]],
        ["CPU", f"{cpu['model']}, {cores}"],
        ["CPU flags", ", ".join(cpu.get("flags") or []) or "—"],
        ["GPU", "; ".join(gpus) or "none"],
        ["packages", ", ".join(f"{name} {ver}" for name, ver in facts["packages"].items() if ver)],
        ["git revision", revision],
        ["1-min load average", load],
        ["python / platform", f"{facts['python']} / {facts['platform']}"],
    ]
    return table(["", ""], rows)


def render_markdown(results: dict) -> str:
    settings = results["settings"]
    photos = settings["photos"]
    source = f"{photos['count']} " + (f"real photos from `{photos['dir']}`" if photos["kind"] == "real" else "synthetic photos")
    h, w = settings["input_size"]
    parts = [
        f"# unet-bench: {machine_name(results)}, {results['suite']} suite",
        f"{results['machine']['date']} · device `{results['device']}` · {source} · model input {h}x{w} · "
        f"{settings['threads']} CPU threads · took {results['duration_seconds']:.0f} s",
        "\n".join(f"> {note}" for note in results["notes"]),
        "## Summary\n\nMedian over repeats, with the interquartile range.\n\n"
        + table(["stage", "what", "batch", "images/s", "IQR", "notes"], summary_rows(results)),
        "\n".join(ratio_lines(results)),
        "## Inference sweep\n\nPre-decoded batches; on a GPU, input and output stay on the device (I/O binding). "
        "FLOPs are 2 x the convolutions' multiply-accumulates; % of peak is against the card's dense tensor-core "
        "datasheet peak (FP16, or TF32 for FP32), and is blank for CPUs.\n\n" + inference_table(results),
        "## End-to-end stages (median run)\n\n" + stage_table(results),
        "## Host cost per photo\n\n" + host_cost_table(results),
        "## Memory\n\n" + memory_table(results),
        "## Machine\n\n" + machine_table(results),
    ]
    return "\n\n".join(part for part in parts if part) + "\n"


# ---- results.png ------------------------------------------------------------------------------------


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


# ---- compare ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    label: str
    unit: str
    value: float


def metrics(results: dict) -> dict[str, Metric]:
    """Comparable figures of one run, keyed so that the same measurement on two machines shares a key."""
    found = {
        f"decode/{r['decoder']}": Metric(f"decode {r['label']}", "images/s", median_rate(r)) for r in succeeded(results["decode"])
    }
    for r in succeeded(results["inference"]):
        name = f"{r['label']} {r['model']} batch {r['batch_size']}"
        found[f"inference/{r['backend']}/{r['precision']}/{r['model']}/{r['batch_size']}"] = Metric(
            name, "images/s", median_rate(r)
        )
    for r in best_inference_rows(results):
        name = f"{r['label']} {r['model']} fastest batch"
        found[f"inference-best/{r['backend']}/{r['precision']}/{r['model']}"] = Metric(name, "images/s", median_rate(r))
    e2e = results["end_to_end"]
    for key, prefix in zip(CPU_END_TO_END, RATIO_PREFIXES.values()):
        run = results.get(key)
        if run and run["status"] == "ok":
            found[key] = Metric(f"end to end {prefix}({run['model']})", "images/s", median_rate(run))
    if e2e["status"] == "ok":
        found["end_to_end/rss"] = Metric("unet-batch peak RSS", "MiB", e2e["peak_rss_mib"])
    host = results.get("host_cost") or {}
    if host.get("status") == "ok":
        found["host_cost"] = Metric("host cost per photo (8-bit PNG)", "ms", host["total_ms"])
    found |= {
        f"baseline/{r['baseline']}": Metric(f"naive {r['label']}", "images/s", median_rate(r))
        for r in succeeded(results["baselines"])
    }
    ratios = results["ratios"]
    for name, value in ratios["end_to_end_over_baseline"].items():
        found[f"ratio/baseline/{name}"] = Metric(f"end to end / naive {name}", "x", value)
    if ratios["end_to_end_over_inference"] is not None:
        found["ratio/inference"] = Metric("end to end / inference alone", "x", ratios["end_to_end_over_inference"])
    for key, prefix in list(RATIO_PREFIXES.items())[1:]:
        for name, what in RELATIVE.items():
            value = (results.get(key) or {}).get(name)
            if value is not None:
                found[f"ratio/{key}/{name}"] = Metric(what.format(prefix=prefix).replace(", ", " ", 1), "x", value)
    return found


def compare_rows(a: dict, b: dict) -> list[list[str]]:
    """Rows of metric, unit, A, B and B/A, in A's order then B's extras."""
    ma, mb = metrics(a), metrics(b)
    rows = []
    for key in [*ma, *(k for k in mb if k not in ma)]:
        va, vb = ma.get(key), mb.get(key)
        label = (va or vb).label
        ratio = f"{vb.value / va.value:.2f}x" if va and vb and va.value else "—"
        rows.append([label, (va or vb).unit, fmt(va.value) if va else "—", fmt(vb.value) if vb else "—", ratio])
    return rows


def render_comparison(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> str:
    """Markdown: the two machines, then every metric side by side with B / A."""
    head = [
        f"A: {name_a} — {machine_name(a)}, {a['suite']} suite, {a['machine']['date']}",
        f"B: {name_b} — {machine_name(b)}, {b['suite']} suite, {b['machine']['date']}",
    ]
    if a["settings"]["input_size"] != b["settings"]["input_size"]:
        head.append(
            f"Warning: input sizes differ ({a['settings']['input_size']} vs {b['settings']['input_size']}): "
            "images/s are not comparable."
        )
    if a["settings"]["photos"]["kind"] != b["settings"]["photos"]["kind"]:
        head.append("Warning: one run used real photos and the other synthetic ones.")
    return "\n".join(head) + "\n\n" + table(["metric", "unit", "A", "B", "B / A"], compare_rows(a, b)) + "\n"
