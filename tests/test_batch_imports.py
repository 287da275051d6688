"""The layering: each layer imports only from those below it (the rule per subpackage, checked on every import
statement at any depth); batch/ runs with the [cpu] or [gpu] extras alone (no torch, no unet/); every
command's --help works with no extra installed."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from batch.core.version import package_version

REPO = Path(__file__).resolve().parents[1]


def test_batch_never_imports_torch_or_unet(tmp_path: Path, tiny_onnx: Path):
    """Import every batch module and run a whole segment + evaluate in a fresh interpreter."""
    script = textwrap.dedent(
        f"""
        import pkgutil, sys, importlib
        import numpy as np
        from PIL import Image
        import batch
        for module in pkgutil.walk_packages(batch.__path__, "batch."):
            importlib.import_module(module.name)
        from click.testing import CliRunner
        from batch.cli import main
        Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(r"{tmp_path}/in/a.jpg")
        from batch.inference.decode import dali_available
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


# Which of the project's packages each package may import, from every import statement at any depth
# (``__init__`` and ``benchmarks`` excepted: the public API and the measurements use every layer).
LAYERS = {
    "batch.core": ("batch.core",),
    "batch.inference": ("batch.core", "batch.inference"),
    "batch.runs": ("batch.core", "batch.inference", "batch.runs"),
    "batch.evaluation": ("batch.core", "batch.runs", "batch.evaluation"),
    "batch.cli": ("batch",),
    "unet": ("batch.core", "unet"),  # the trainer: the torch-free base only
    "export": ("batch.core", "batch.inference", "unet", "export"),  # the runtime, to verify an export
}
COMMAND_LINE = ("batch.cli.options",)  # what unet/cli.py and export/cli.py may add: the options all four commands share
PROJECT = ("batch", "unet", "export", "benchmarks")
RUNNER = ("batch.runs", "batch.evaluation", "batch.cli.segment", "batch.cli.evaluate")  # the folder runs and their commands
HEAVY = ("torch", "onnxruntime", "onnx", "onnxscript", "nvidia.dali", "ray")  # what the extras bring


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The project modules ``path`` imports anywhere in it (top level, functions, TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PROJECT}


def layer_of(module: str) -> str | None:
    return max((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), key=len, default=None)


def allowed(importer: str, imported: str) -> bool:
    layer = layer_of(importer)
    if layer is None:
        return True
    permitted = LAYERS[layer] + (COMMAND_LINE if importer in ("unet.cli", "export.cli") else ())
    return any(imported == p or imported.startswith(p + ".") for p in permitted)


def test_every_layer_imports_only_the_layers_below_it():
    violations = []
    for package in ("batch", "unet", "export"):
        for path in sorted((REPO / package).rglob("*.py")):
            importer = module_name(path)
            if importer == "batch":
                continue  # the public API imports its names lazily from every layer
            violations += [f"{importer} imports {name}" for name in sorted(imported_modules(path)) if not allowed(importer, name)]
    assert violations == []


def test_batch_keeps_at_most_eight_modules_at_its_top():
    assert len(list((REPO / "batch").glob("*.py"))) <= 8


def test_the_layering_check_catches_a_violation(tmp_path: Path):
    """The check above can fail: an inference module importing the runs, or unet importing the inference layer."""
    assert not allowed("batch.inference.segmenter", "batch.runs.plan")
    assert not allowed("unet.train", "batch.inference.runtime")
    assert not allowed("batch.core.images", "batch.inference.decode")
    assert allowed("unet.cli", "batch.cli.options") and not allowed("unet.train", "batch.cli.options")
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from batch.runs.plan import make_plan\n")
    assert imported_modules(module) == {"batch.runs.plan.make_plan"}


def run_script(script: str) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one JSON object as its last line."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_unet_export_and_the_base_never_load_the_runner():
    """Importing unet/, export/ and batch's core and inference layers loads nothing of the runs, the evaluation or the CLI."""
    found = run_script(f"""
        import importlib, json, pkgutil, sys
        import batch.core, batch.inference, export, unet
        packages = (batch.core, batch.inference, unet, export)
        modules = [f"{{p.__name__}}.{{m.name}}" for p in packages for m in pkgutil.iter_modules(p.__path__)]
        for name in modules:
            importlib.import_module(name)
        runner = sorted(name for name in sys.modules if name.startswith({RUNNER!r}))
        print(json.dumps({{"imported": modules, "runner": runner}}))
    """)
    expected = {"unet.train", "export.onnx_export", "export.verify", "batch.inference.runtime", "batch.core.files"}
    assert expected <= set(found["imported"])
    assert found["runner"] == []


def test_the_base_imports_without_any_extra():
    """Every base module imports with torch, ONNX Runtime, onnx, DALI and Ray all missing (a bare install)."""
    found = run_script(f"""
        import importlib, json, pkgutil, sys
        for name in {HEAVY!r}:
            sys.modules[name] = None  # import fails as if not installed
        import batch.core
        base = [f"batch.core.{{m.name}}" for m in pkgutil.iter_modules(batch.core.__path__)]
        light = ["batch.inference.runtime", "batch.inference.postprocess", "batch.inference.config", "batch.runs.config"]
        for name in base + light + ["unet.config", "export.config", "benchmarks.config"]:
            importlib.import_module(name)
        print(json.dumps({{"imported": base + light}}))
    """)
    expected = {"batch.core.devices", "batch.core.contract", "batch.core.extras", "batch.inference.postprocess"}
    assert expected <= set(found["imported"])


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
