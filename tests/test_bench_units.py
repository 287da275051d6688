"""unet-bench building blocks: timing statistics, FLOP counting, machine facts, synthetic photos, config."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from batch.core.devices import parse_device
from benchmarks.config import SUITES, RunConfig, SweepConfig
from benchmarks.flops import unet_gflops, unet_macs
from benchmarks.machine import Hardware, machine_facts, machine_slug, peak_tflops
from benchmarks.synthetic import synthesize_photo, write_synthetic_photos
from benchmarks.timing import Stats, rates, summarize, time_calls

# ---- timing -----------------------------------------------------------------------------------------


def test_summarize_gives_median_quartiles_and_extremes():
    stats = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.median, stats.q1, stats.q3, stats.min, stats.max, stats.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert stats.iqr == 2.0


def test_rates_divide_items_by_seconds_per_repeat():
    stats = rates([8, 8, 8], [2.0, 1.0, 4.0])  # 4, 8 and 2 items/s
    assert stats.median == 4.0 and stats.min == 2.0 and stats.max == 8.0


def test_stats_scaled_keeps_the_spread():
    assert Stats(2, 1, 3, 0.5, 4, 3).scaled(10) == Stats(20, 10, 30, 5, 40, 3)


def test_time_calls_warms_up_then_times_each_repeat_with_its_sync():
    calls, syncs = [], []
    seconds = time_calls(lambda: calls.append(1), warmup=2, repeats=3, sync=lambda: syncs.append(1))
    assert len(seconds) == 3 and all(s >= 0 for s in seconds)
    assert len(calls) == 5 and len(syncs) == 5


@pytest.mark.parametrize("bad", [dict(warmup=-1, repeats=1), dict(warmup=0, repeats=0)])
def test_time_calls_rejects_bad_counts(bad):
    with pytest.raises(ValueError):
        time_calls(lambda: None, **bad)


def test_rates_reject_mismatched_or_zero_timings():
    with pytest.raises(ValueError):
        rates([1, 2], [1.0])
    with pytest.raises(ValueError):
        rates([1], [0.0])


# ---- FLOPs ------------------------------------------------------------------------------------------


def count_macs_with_hooks(config, size):
    """MACs of every Conv2d / ConvTranspose2d, counted by torch forward hooks on a real forward pass."""
    import torch
    from torch import nn

    from unet.model import UNet, UNetConfig

    model = UNet(UNetConfig(**config)).eval()
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        if isinstance(module, nn.ConvTranspose2d):  # every input pixel meets every kernel tap of every output channel
            total += inputs[0].numel() * module.out_channels * kh * kw // module.groups
        else:  # every output value is a dot product over cin/groups x kh x kw
            total += output.numel() * module.in_channels * kh * kw // module.groups

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            module.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, config.get("in_channels", 3), *size))
    return total


@pytest.mark.parametrize(
    "config",
    [
        {"width": 4, "depth": 2},
        {"width": 3, "depth": 3, "upsample": "bilinear"},
        {"width": 8, "depth": 1, "in_channels": 1, "out_channels": 2},
        {"width": 4, "depth": 2, "fold": 2},
    ],
)
def test_unet_macs_match_a_count_of_the_real_network(config):
    assert unet_macs(config, (32, 48)) == count_macs_with_hooks(config, (32, 48))


def test_unet_gflops_of_the_classic_width_64_network_at_320x480():
    # 225.8 GFLOPs: the figure the doc table quotes; 4x per doubling of the width
    assert unet_gflops({"width": 64, "depth": 4}, (320, 480)) == pytest.approx(225.78, abs=0.01)
    assert unet_gflops({"width": 32, "depth": 4}, (320, 480)) == pytest.approx(
        unet_gflops({"width": 64, "depth": 4}, (320, 480)) / 4, rel=0.01
    )


def test_unet_macs_reject_a_size_that_is_not_a_multiple():
    with pytest.raises(ValueError, match="multiple of 2\\*\\*depth = 16"):
        unet_macs({"width": 4, "depth": 4}, (30, 48))


# ---- machine ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, precision, peak",
    [
        ("NVIDIA H200", "fp16", 989.4),
        ("NVIDIA H200", "fp32", 494.7),
        ("NVIDIA H100 PCIe", "fp16", 756.0),
        ("NVIDIA H100 80GB HBM3", "fp16", 989.4),
        ("NVIDIA A100-SXM4-80GB", "fp16", 312.0),
        ("Tesla K80", "fp16", None),
        (None, "fp16", None),
    ],
)
def test_peak_tflops_matches_datasheet_names(name, precision, peak):
    assert peak_tflops(name, precision) == peak


def test_machine_facts_have_what_results_json_promises():
    facts = machine_facts()
    assert {"date", "cpu", "gpus", "packages", "git", "python"} <= facts.keys()
    assert facts["cpu"]["usable_cores"] >= 1
    assert facts["packages"]["onnxruntime"] and facts["packages"]["numpy"]
    assert "commit" in facts["git"] and "dirty" in facts["git"]


def test_machine_slug_names_the_gpu_or_the_cpu():
    facts = {
        "gpus": [{"index": 0, "name": "NVIDIA H200"}, {"index": 1, "name": "NVIDIA A100-SXM4-80GB"}],
        "cpu": {"model": "AMD EPYC 9654 96-Core Processor", "usable_cores": 16},
    }
    assert machine_slug(facts, "cuda:0") == "nvidia-h200"
    assert machine_slug(facts, "cuda:1") == "nvidia-a100-sxm4-80gb"
    assert machine_slug(facts, "cpu") == "cpu-amd-epyc-9654-96-core-processor-16-cores"


# ---- synthetic photos -------------------------------------------------------------------------------


def test_synthetic_photo_is_textured_not_flat():
    photo = synthesize_photo(np.random.default_rng(0), (128, 192))
    assert photo.shape == (128, 192, 3) and photo.dtype == np.uint8
    assert photo.std() > 20  # car against backdrop
    high_pass = np.abs(np.diff(photo.astype(np.int16), axis=1)).mean()
    assert high_pass > 1.0  # per-pixel texture and noise: JPEG has real work to do


def test_write_synthetic_photos_draws_distinct_ones_then_copies(tmp_path):
    paths = write_synthetic_photos(tmp_path, 5, distinct=2, size=(64, 96), seed=1)
    assert [p.name for p in paths] == [f"synthetic_{i:04d}.jpg" for i in range(5)]
    data = [p.read_bytes() for p in paths]
    assert data[0] != data[1] and data[2] == data[0] and data[3] == data[1] and data[4] == data[0]
    with Image.open(paths[0]) as im:
        assert im.format == "JPEG" and im.size == (96, 64)


# ---- config -----------------------------------------------------------------------------------------


def test_every_suite_has_a_cpu_and_a_gpu_preset():
    for name, presets in SUITES.items():
        assert presets.keys() == {"cpu", "cuda"}, name
        assert presets["cpu"].name == presets["cuda"].name == name


def test_run_config_applies_width_override_and_validates(tmp_path):
    config = RunConfig(suite="quick", widths=(4, 8))
    assert config.preset("cpu").widths == (4, 8)
    assert config.preset("cuda").batch_sizes == SUITES["quick"]["cuda"].batch_sizes
    with pytest.raises(ValueError, match="not one of"):
        RunConfig(suite="huge")
    with pytest.raises(ValueError, match="multiples of 2\\*\\*depth"):
        RunConfig(suite="quick", input_size=(30, 48))
    with pytest.raises(ValueError, match=".onnx"):
        RunConfig(suite="quick", model=tmp_path / "model.h5")
    with pytest.raises(ValueError, match="--size cannot change"):
        RunConfig(suite="quick", model=tmp_path / "model.onnx", input_size=(320, 480))


def test_sweep_config_rejects_what_cannot_be_measured():
    assert SUITES["quick"]["cpu"].sweep == SweepConfig((1, 2, 4), warmup=1, repeats=3, max_batch_seconds=2.5)
    with pytest.raises(ValueError, match="positive and increasing"):
        SweepConfig((4, 2))
    with pytest.raises(ValueError, match="repeats >= 1"):
        SweepConfig((1,), repeats=0)


def test_run_config_device_is_canonical():
    assert RunConfig(suite="quick", device="CUDA").device == "cuda:0"
    with pytest.raises(ValueError, match="'gpu' is not one of auto, cpu, cuda, cuda:N"):
        RunConfig(suite="quick", device="gpu")


# ---- nvidia-smi parsing (a stand-in nvidia-smi on PATH) ---------------------------------------------

FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *query-gpu=index,name*) echo "0, NVIDIA H200, 570.86.15, 143771"; echo "1, NVIDIA H200, 570.86.15, [N/A]" ;;
  *query-compute-apps*) echo "$FAKE_APPS" ;;
  *memory.used*) echo "4096" ;;
  "") echo "| NVIDIA-SMI 570.86.15    Driver Version: 570.86.15    CUDA Version: 12.8 |" ;;
esac
"""


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    script = tmp_path / "nvidia-smi"
    script.write_text(FAKE_NVIDIA_SMI)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    return monkeypatch


def test_gpu_facts_parse_nvidia_smi(fake_nvidia_smi):
    from benchmarks.machine import gpu_facts

    gpus = gpu_facts()
    assert gpus[0] == {
        "index": 0,
        "name": "NVIDIA H200",
        "driver": "570.86.15",
        "cuda_driver_api": "12.8",
        "memory_mib": 143771.0,
    }
    assert gpus[1]["memory_mib"] is None  # "[N/A]"


def test_gpu_memory_of_this_process_or_of_the_whole_device(fake_nvidia_smi):
    from benchmarks.machine import gpu_memory_of

    fake_nvidia_smi.setenv("FAKE_APPS", "123, 2048\n124, 1024\n456, 512")
    reading = gpu_memory_of(lambda pid: pid in (123, 124), 0)
    assert reading.mib == 3072 and "benchmarked process" in reading.method
    fake_nvidia_smi.setenv("FAKE_APPS", "No running processes found")
    reading = gpu_memory_of(lambda pid: pid == 123, 0)
    assert reading.mib == 4096 and "whole device" in reading.method


def test_run_child_reports_the_childs_own_peak_rss_not_ours(tmp_path):
    """Linux carries a parent's high-water RSS into its exec'd child; the launcher keeps ours out."""
    import sys

    from benchmarks.machine import peak_rss_mib, run_child

    ballast = np.ones(300 * 2**20 // 8)  # 300 MiB touched in this process  # noqa: F841
    small = run_child([sys.executable, "-c", "pass"], stdout=None, stderr=None, timeout_s=60)
    big = run_child(
        [sys.executable, "-c", "import numpy as np; a = np.ones(200 * 2**20 // 8)"], stdout=None, stderr=None, timeout_s=60
    )
    assert small.returncode == 0 and small.peak_rss_mib < 100 < 300 < peak_rss_mib()
    assert 200 < big.peak_rss_mib < 300


def test_run_child_kills_the_command_at_its_timeout():
    import sys
    import time

    from benchmarks.machine import run_child

    start = time.perf_counter()
    result = run_child([sys.executable, "-c", "import time; time.sleep(60)"], stdout=None, stderr=None, timeout_s=1)
    assert result.returncode != 0 and time.perf_counter() - start < 30


def test_torch_peer_says_why_it_cannot_run_here(tmp_path):
    """The strong PyTorch peer is a GPU pipeline: on a CPU run, or without torchvision/CUDA, it is a recorded skip."""
    import numpy as np
    from PIL import Image

    from benchmarks.peers import encode_png, torch_missing

    assert "--device cuda" in torch_missing(None, Hardware(parse_device("cpu")), peer=True)
    mask = np.zeros((5, 7), np.uint8)
    mask[1:3, 2:6] = 255
    path = tmp_path / "m.png"
    path.write_bytes(encode_png(mask))
    assert np.array_equal(np.asarray(Image.open(path)), mask)
