"""The layering: batch/ runs with the [cpu] or [gpu] extras alone (no torch, no unet/); unet/ and export/
use only batch/'s base modules, never the runner; every command's --help works with no extra installed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from batch.version import package_version

REPO = Path(__file__).resolve().parents[1]


def test_batch_never_imports_torch_or_unet(tmp_path: Path, tiny_onnx: Path):
    """Import every batch module and run a whole segment + evaluate in a fresh interpreter."""
    script = textwrap.dedent(
        f"""
        import pkgutil, sys, importlib
        import numpy as np
        from PIL import Image
        import batch
        for module in pkgutil.iter_modules(batch.__path__):
            importlib.import_module(f"batch.{{module.name}}")
        from click.testing import CliRunner
        from batch.cli import main
        Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(r"{tmp_path}/in/a.jpg")
        from batch.decode import dali_available
        segment = ["segment", r"{tmp_path}/in", r"{tmp_path}/out", "--model", r"{tiny_onnx}", "--no-progress"]
        Image.fromarray(np.zeros((48, 64), np.uint8)).save(r"{tmp_path}/truth/a.png")
        runs = [segment, ["evaluate", r"{tmp_path}/out", r"{tmp_path}/truth"]]
        if dali_available():
            runs.append(segment + ["--decoder", "dali", "--overwrite"])
        for args in runs:
            result = CliRunner().invoke(main, args, catch_exceptions=False)
            assert result.exit_code == 0, result.output
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "unet", "torchvision"))
        print("LOADED", loaded)
        """
    )
    (tmp_path / "in").mkdir()
    (tmp_path / "truth").mkdir()
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout


RUNNER = ("batch.runner", "batch.engine", "batch.decode", "batch.api", "batch.cli", "batch.ray_engine")
HEAVY = ("torch", "onnxruntime", "onnx", "onnxscript", "nvidia.dali", "ray")  # what the extras bring


def run_script(script: str) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one JSON object as its last line."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_unet_export_and_the_base_never_import_the_runner():
    """unet/ and export/ build on the base modules of batch/, never on the runner (nor the base on it)."""
    found = run_script(f"""
        import importlib, json, pkgutil, sys
        import batch, export, unet
        runner = {RUNNER!r}
        base = [f"batch.{{m.name}}" for m in pkgutil.iter_modules(batch.__path__) if f"batch.{{m.name}}" not in runner]
        modules = base + [f"{{p.__name__}}.{{m.name}}" for p in (unet, export) for m in pkgutil.iter_modules(p.__path__)]
        for name in modules:
            importlib.import_module(name)
        print(json.dumps({{"imported": modules, "runner": sorted(set(runner) & set(sys.modules))}}))
    """)
    assert {"unet.train", "export.onnx_export", "export.verify", "batch.runtime", "batch.files"} <= set(found["imported"])
    assert found["runner"] == []


def test_the_base_imports_without_any_extra():
    """Every base module imports with torch, ONNX Runtime, onnx, DALI and Ray all missing (a bare install)."""
    found = run_script(f"""
        import importlib, json, pkgutil, sys
        for name in {HEAVY!r}:
            sys.modules[name] = None  # import fails as if not installed
        import batch
        runner = {RUNNER!r}
        base = [f"batch.{{m.name}}" for m in pkgutil.iter_modules(batch.__path__) if f"batch.{{m.name}}" not in runner]
        for name in base + ["unet.config", "export.config", "benchmarks.config"]:
            importlib.import_module(name)
        print(json.dumps({{"imported": base}}))
    """)
    assert {"batch.devices", "batch.runtime", "batch.contract", "batch.extras", "batch.postprocess"} <= set(found["imported"])


COMMANDS = {  # console script -> (module of its click command, a sub-command or None)
    "unet-train": ("unet.cli", None),
    "unet-export": ("export.cli", "to-onnx"),
    "unet-batch": ("batch.cli", "segment"),
    "unet-bench": ("benchmarks.cli", "run"),
}


def test_help_and_version_of_every_command_work_without_any_extra(tmp_path: Path):
    """A bare install (no torch, no ONNX Runtime): --help and --version work; running says which extra to install."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "model.pt").write_bytes(b"not needed: the extra check comes first")
    runs = {
        "unet-train": [str(tmp_path / "photos"), "--out", str(tmp_path / "run")],
        "unet-export": ["to-onnx", str(tmp_path / "model.pt"), "-o", str(tmp_path / "m.onnx")],
        "unet-batch": ["segment", str(tmp_path / "photos"), str(tmp_path / "masks")],
        "unet-bench": ["run", "--suite", "smoke", "--out", str(tmp_path / "bench")],
    }
    found = run_script(f"""
        import importlib, json, sys
        for name in {HEAVY!r}:
            sys.modules[name] = None  # import fails as if not installed
        from click.testing import CliRunner
        results = {{}}
        for command, (module, sub) in {COMMANDS!r}.items():
            main = importlib.import_module(module).main
            calls = {{"help": ["--help"], "version": ["--version"], "run": {runs!r}[command]}}
            if sub:
                calls["sub-help"] = [sub, "--help"]
            for label, args in calls.items():
                result = CliRunner().invoke(main, args, prog_name=command)
                results[f"{{command}} {{label}}"] = [result.exit_code, result.output]
        print(json.dumps(results))
    """)
    for command in COMMANDS:
        assert found[f"{command} help"][0] == 0 and "Usage:" in found[f"{command} help"][1]
        assert found[f"{command} version"] == [0, f"{command} {package_version()}\n"]
        if COMMANDS[command][1]:
            assert found[f"{command} sub-help"][0] == 0
        code, output = found[f"{command} run"]
        extra = "train" if command in ("unet-train", "unet-export") else "cpu"  # the first one each lacks
        assert code == 2 and f"needs the '{extra}' extra" in output and f"pip install '.[{extra}]'" in output, output
        assert "Traceback" not in output
