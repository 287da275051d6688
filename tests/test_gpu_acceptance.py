"""The GPU acceptance run (benchmarks/gpu-acceptance.sh) and its verdict, exercised on the CPU."""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, synthetic_pair
from PIL import Image
from setuptools import find_packages

CHECK = REPO / "scripts" / "gpu_acceptance_verdict.py"
VAL_IMAGES = json.loads((REPO / "checkpoints" / "w16-320x480" / "config.json").read_text())["val_images"]


def load_check():
    """The verdict script, outside the installed packages: loaded by its path, as gpu-acceptance.sh runs it."""
    spec = importlib.util.spec_from_file_location("acceptance_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_acceptance_tooling_is_not_in_the_installed_package():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    packages = find_packages(str(REPO), include=setup["options.packages.find"]["include"].split())
    assert "benchmarks" in packages and not [p for p in packages if "acceptance" in p or p.startswith("scripts")]
    assert not list((REPO / "benchmarks").glob("**/acceptance*.py"))
    assert "scripts/gpu_acceptance_verdict.py" in (REPO / "benchmarks" / "gpu-acceptance.sh").read_text()


def test_the_verdict_script_runs_with_the_standard_library_alone(tmp_path: Path):
    """python -I: no PYTHONPATH, no site-packages, so the script cannot lean on the project or its dependencies."""
    (tmp_path / "steps.tsv").write_text("install 0 30\n")
    done = subprocess.run([sys.executable, "-I", "-S", str(CHECK), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "offline install" in (tmp_path / "summary.md").read_text()


def write_evaluation(path: Path, scores: list[float]) -> None:
    rows = "".join(f"p{i},{s:.6f},{s:.6f},a,b,\n" for i, s in enumerate(scores))
    path.write_text("name,dice,iou,prediction,truth,error\n" + rows)


def test_verdict_meets_misses_and_never_invents(tmp_path: Path):
    (tmp_path / "steps.tsv").write_text("install 0 30\npytest-gpu 0 50\npytest-rest 1 90\n")
    write_evaluation(tmp_path / "agreement-gpu-dali-vs-cpu-pillow.csv", [0.9995] * 1000)
    write_evaluation(tmp_path / "agreement-gpu-pillow-vs-cpu-pillow.csv", [0.9995] * 10)  # too few photos
    write_evaluation(tmp_path / "truth-val-cpu.csv", [0.9920] * 4)
    write_evaluation(tmp_path / "truth-val-dali.csv", [0.9910] * 4)  # 0.001 below: missed
    check = load_check()
    verdict = {t.name.split(":")[0].split(" Dice")[0]: t.met for t in check.summarize(tmp_path)}
    assert verdict["offline install, CUDA provider present (and DALI, where the phase tests it)"] is True
    assert verdict["the rest of the suite passes"] is False
    assert verdict["gpu-dali masks vs CPU/Pillow masks"] is True
    assert verdict["gpu-pillow masks vs CPU/Pillow masks"] is False
    assert verdict["val-dali"] is False
    assert verdict["val-dali-tta"] is None  # not measured is not met
    assert verdict["bundled model end to end >= 1000 images/s"] is None
    assert check.main([str(tmp_path)]) == 1
    assert "**missed**" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.dali
def test_acceptance_script_segments_scores_and_summarizes_on_the_cpu(tmp_path: Path):
    """DEVICE=cpu: every segment step (Pillow, DALI's CPU backend, TTA) runs, is scored, and lands in OUT_DIR."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install '.[dali]')")
    photos, truth = tmp_path / "carvana" / "photos", tmp_path / "carvana" / "truth"
    photos.mkdir(parents=True)
    truth.mkdir()
    rng = np.random.default_rng(0)
    for stem in VAL_IMAGES[:3] + ["ffffffffffff_01"]:
        photo, mask = synthetic_pair(rng, 64, 96)
        Image.fromarray(photo).save(photos / f"{stem}.jpg", quality=95)
        Image.fromarray(mask.astype(np.uint8) * 255).save(truth / f"{stem}_mask.gif")
    out = tmp_path / "out"
    env = os.environ | {
        "PHOTOS": str(photos),
        "TRUTH": str(truth),
        "STAGES": "segment",
        "DEVICE": "cpu",
        "WORK": str(tmp_path / "work"),
    }
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu-acceptance.sh"), str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    steps = {line.split()[0]: int(line.split()[1]) for line in (out / "steps.tsv").read_text().splitlines()}
    failed = {name: rc for name, rc in steps.items() if rc and name != "summary"}
    assert not failed, (failed, result.stderr[-3000:])
    assert json.loads((out / "gpu-dali.report.json").read_text())["decoder"] == "dali-cpu"
    assert json.loads((out / "val-dali-tta.report.json").read_text())["tta"] is True
    summary = {t["name"]: t for t in json.loads((out / "summary.json").read_text())}
    agreement = next(t for name, t in summary.items() if name.startswith("gpu-dali masks"))
    assert agreement["figure"].endswith("on 4 photos") and agreement["met"] is False  # far fewer than 1,000 photos
    assert result.returncode == 1  # targets not met on 4 photos: the run says so
