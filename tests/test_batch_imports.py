"""batch/ runs with the [cpu] or [gpu] extras alone: it imports neither torch nor unet/."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
        runs = [segment, ["evaluate", r"{tmp_path}/out", r"{tmp_path}/out"]]
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
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
