"""export.verify: parity of exported models with PyTorch, and that it catches broken ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from batch.core.contract import ModelContract
from export.config import VerifyOptions
from export.verify import Outputs, VerifyError, compare, export_verified, pick_photos, verify_parity

HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


def on_cpu(limit: int) -> VerifyOptions:
    return VerifyOptions(limit=limit, device="cpu")


def tampered(source: Path, out: Path, name: str, change) -> Path:
    """A copy of the ONNX file at ``source`` with initializer ``name`` replaced by ``change(array)``."""
    model = onnx.load(str(source))
    (tensor,) = [t for t in model.graph.initializer if t.name == name]
    tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor).copy()), name))
    onnx.save(model, str(out))
    return out


def set_first(value: float):
    def change(array: np.ndarray) -> np.ndarray:
        array.flat[0] = value
        return array

    return change


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_exported_models_pass(exported_onnx, sharp_checkpoint, parity_photos, precision):
    report = verify_parity(sharp_checkpoint, exported_onnx[precision], parity_photos, on_cpu(4), progress=False)
    assert report.passed, "\n".join(report.lines())
    assert report.precision == precision and report.providers[0] == "CPUExecutionProvider"
    assert len(report.images) == 4 and all(image.photo_size == (128, 192) for image in report.images)
    assert all(0.05 < image.reference_car < 0.6 for image in report.images)  # real boundaries, not trivial masks
    assert all(image.finite and image.dice >= 0.999 for image in report.images)
    if precision == "fp32":
        assert max(image.rel_logit_diff for image in report.images) <= 1e-4
    lines = report.lines()
    assert len(lines) == 2 + 4 + 1 and lines[-1].endswith("PASS")
    assert all(image.name in "\n".join(lines) for image in report.images)


# Each breakage stands for a real failure: a blank FP16 mask (onnxruntime #23797), an overflow that
# spreads NaN, and FP32 weights that drifted (a wrong fold, a lossy conversion).
BREAKAGES = {
    "blank": ("fp16", "net.head.bias", lambda a: a - 100, ["blank mask where PyTorch finds a car", "mask Dice"]),
    "nan": ("fp16", "net.stem.0.weight", set_first(np.nan), ["NaN/Inf logits"]),
    "inf": ("fp16", "net.stem.0.weight", set_first(np.inf), ["NaN/Inf logits"]),
    "drift": ("fp32", "net.head.weight", lambda a: a * 1.01, ["relative (> 0.0001)"]),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_parity_fails_on_a_broken_model(exported_onnx, sharp_checkpoint, parity_photos, tmp_path, breakage):
    precision, name, change, messages = BREAKAGES[breakage]
    broken = tampered(exported_onnx[precision], tmp_path / "broken.onnx", name, change)
    report = verify_parity(sharp_checkpoint, broken, parity_photos, on_cpu(3), progress=False)
    assert not report.passed and len(report.failed) == 3
    for image in report.failed:
        for message in messages:
            assert any(message in failure for failure in image.failures), image.failures
    assert report.lines()[-1].endswith("FAIL") and "0/3 photos pass" in report.lines()[-1]


def test_small_fp16_error_passes_but_the_same_error_in_fp32_does_not(exported_onnx, sharp_checkpoint, parity_photos, tmp_path):
    """FP16 is judged by its masks, FP32 by its logits: a 1e-3 weight error is fine for one, not the other."""
    for precision in ("fp16", "fp32"):
        nudged = tampered(exported_onnx[precision], tmp_path / f"{precision}.onnx", "net.head.weight", lambda a: a * 1.001)
        report = verify_parity(sharp_checkpoint, nudged, parity_photos, on_cpu(2), progress=False)
        assert report.passed == (precision == "fp16"), "\n".join(report.lines())


def test_photos_are_spread_over_the_folder(tmp_path):
    for i in range(16):
        (tmp_path / f"car_{i:02d}.jpg").touch()
    (tmp_path / "notes.txt").touch()
    (tmp_path / "sub.jpg").mkdir()
    assert [p.name for p in pick_photos(tmp_path, 4)] == ["car_00.jpg", "car_05.jpg", "car_10.jpg", "car_15.jpg"]
    assert len(pick_photos(tmp_path, 100)) == 16


def test_a_folder_without_photos_is_an_error(tmp_path, exported_onnx, sharp_checkpoint):
    (tmp_path / "notes.txt").touch()
    with pytest.raises(VerifyError, match=f"no photos .* in {tmp_path}"):
        verify_parity(sharp_checkpoint, exported_onnx["fp16"], tmp_path, progress=False)


def test_an_unreadable_photo_is_named(tmp_path, exported_onnx, sharp_checkpoint):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(VerifyError, match="cannot read photo .*broken.jpg"):
        verify_parity(sharp_checkpoint, exported_onnx["fp16"], tmp_path, progress=False)


def test_a_model_without_the_contract_is_refused(tmp_path, exported_onnx, sharp_checkpoint, parity_photos):
    model = onnx.load(str(exported_onnx["fp32"]))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(VerifyError, match="bare.onnx has no 'input_height'"):
        verify_parity(sharp_checkpoint, tmp_path / "bare.onnx", parity_photos, progress=False)


def test_a_model_from_another_checkpoint_is_refused(tmp_path, exported_onnx, tiny_checkpoint, parity_photos):
    with pytest.raises(VerifyError, match="tiny-fp16.onnx was exported from another checkpoint than .*best.pt"):
        verify_parity(tiny_checkpoint, exported_onnx["fp16"], parity_photos, progress=False)


@pytest.mark.skipif(HAS_CUDA_EP, reason="this onnxruntime has the CUDA provider")
@pytest.mark.parametrize(("device", "shown"), [("cuda", "cuda:0"), ("CUDA:1", "cuda:1")])
def test_an_explicit_cuda_request_without_the_cuda_provider_is_an_error(
    device, shown, tmp_path, exported_onnx, sharp_checkpoint, parity_photos
):
    with pytest.raises(VerifyError, match=f"--device {shown} cannot be used: this onnxruntime .* has no CUDA provider"):
        verify_parity(sharp_checkpoint, exported_onnx["fp32"], parity_photos, VerifyOptions(device=device), progress=False)
    with pytest.raises(VerifyError, match=f"--device {shown} cannot be used"):  # before the (slow) export
        export_verified(
            sharp_checkpoint, tmp_path / "m.onnx", parity_photos, options=VerifyOptions(device=device), progress=False
        )
    assert list(tmp_path.iterdir()) == []


def test_auto_takes_the_gpu_only_when_onnxruntime_has_one(exported_onnx, sharp_checkpoint, parity_photos):
    report = verify_parity(sharp_checkpoint, exported_onnx["fp32"], parity_photos, VerifyOptions(limit=1), progress=False)
    assert report.providers[0] == ("CUDAExecutionProvider" if HAS_CUDA_EP else "CPUExecutionProvider")


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_real_photos_at_full_resolution(carvana_dir, exported_onnx, sharp_checkpoint, precision):
    """Real 1918x1280 JPEGs, masks compared at full size (the tiny model knows only synthetic cars)."""
    report = verify_parity(sharp_checkpoint, exported_onnx[precision], carvana_dir / "train", on_cpu(2), progress=False)
    assert report.passed, "\n".join(report.lines())
    assert all(image.photo_size == (1280, 1918) for image in report.images)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_EP, reason="needs onnxruntime-gpu with the CUDA provider")
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_cuda_provider_parity(exported_onnx, sharp_checkpoint, parity_photos, precision):
    report = verify_parity(
        sharp_checkpoint, exported_onnx[precision], parity_photos, VerifyOptions(device="cuda"), progress=False
    )
    assert report.providers[0] == "CUDAExecutionProvider"
    assert report.passed, "\n".join(report.lines())


def test_tracked_peak_activation_sees_what_the_folded_graph_holds():
    """Tracked on the unfolded model, it equals the largest |output| of any layer of the folded (exported) net."""
    import torch

    from export.onnx_export import fold_batchnorm
    from export.verify import track_peak_activation
    from unet.model import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4, depth=2)).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 48) * 4)
    model.eval()
    x = torch.randn(1, 3, 32, 48) * 3
    outputs = []
    folded = fold_batchnorm(model)
    handles = [
        m.register_forward_hook(lambda m, i, o: outputs.append(float(o.abs().max())))
        for m in folded.modules()
        if not any(m.children())
    ]
    with torch.no_grad(), track_peak_activation(model) as peak:
        model(x)
        folded(x)  # hooks on `model` only: this adds nothing to peak
    for handle in handles:
        handle.remove()
    assert peak[0] == pytest.approx(max(outputs), rel=1e-5)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def outputs(reference: np.ndarray, logits: np.ndarray | None = None, peak: float = 1.0) -> Outputs:
    """One 8x8 photo's outputs: (4, 4) logits each, ONNX's equal to the reference's unless given."""
    shape = (1, 1, 4, 4)
    return Outputs("a.jpg", (8, 8), reference.reshape(shape), (reference if logits is None else logits).reshape(shape), peak, 1.0)


def contract_of(precision: str) -> ModelContract:
    return ModelContract(input_height=4, input_width=4, input_multiple=4, precision=precision)


CAR_AND_BACKGROUND = np.linspace(-5, 5, 16, dtype=np.float32)


def test_fp16_activations_beyond_its_range_fail_even_when_the_logits_agree():
    ok = compare(outputs(CAR_AND_BACKGROUND, peak=6e4), contract_of("fp16"), VerifyOptions())
    over = compare(outputs(CAR_AND_BACKGROUND, peak=7e4), contract_of("fp16"), VerifyOptions())
    assert ok.passed and ok.dice == 1.0 and ok.photo_size == (8, 8) and not ok.untested
    assert over.failures == ("activations reach 7e+04, beyond FP16's 65504: export with --fp32",)


# ---- masks that test nothing (issue 22, item 6) -----------------------------------------------------
#
# Two empty masks have Dice 1 whatever the models compute: an untrained checkpoint (no car anywhere)
# "passed" the FP16 and INT8 verification with Dice 1.000000 without testing anything.

NO_CAR = np.full(16, -3.0, dtype=np.float32)
ALL_CAR = np.full(16, 3.0, dtype=np.float32)


@pytest.mark.parametrize(("reference", "reason"), [(NO_CAR, "PyTorch predicts no car"), (ALL_CAR, "car everywhere")])
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_mask_comparison_that_cannot_fail_is_not_a_pass(reference, reason, precision):
    image = compare(outputs(reference), contract_of(precision), VerifyOptions())
    assert image.dice == 1.0 and not image.failures  # what used to be reported as a pass
    assert not image.passed and reason in image.untested and image.verdict.startswith("NOT TESTED: ")


def test_fp32_is_judged_by_its_logits_so_an_empty_mask_still_passes_and_says_so():
    image = compare(outputs(NO_CAR), contract_of("fp32"), VerifyOptions())
    assert image.passed and image.untested == "PyTorch predicts no car"
    assert image.verdict == "ok (logits; masks not compared: PyTorch predicts no car)"
    drifted = compare(outputs(NO_CAR, NO_CAR * 1.01), contract_of("fp32"), VerifyOptions())
    assert not drifted.passed and "relative" in drifted.verdict  # the logits are still tested


def test_car_where_pytorch_finds_none_is_a_failure_not_untested():
    image = compare(outputs(NO_CAR, ALL_CAR), contract_of("fp16"), VerifyOptions())
    assert image.dice == 0.0 and image.verdict.startswith("FAIL: mask Dice 0.000000 < 0.999")


@pytest.mark.parametrize(("share", "untested"), [(1 / 16, False), (0, True), (15 / 16, False), (1, True)])
def test_min_car_is_the_share_of_car_and_of_background_a_tested_mask_needs(share, untested):
    reference = np.where(np.arange(16) < round(16 * share), 3.0, -3.0).astype(np.float32)  # share of the pixels car
    image = compare(outputs(reference), contract_of("fp16"), VerifyOptions(min_car=0.05))
    assert bool(image.untested) == untested


@pytest.fixture(scope="module")
def no_car(sharp_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """sharp_checkpoint with its head's bias lowered by 100 (PyTorch finds no car anywhere) and its exports."""
    from export.config import ExportOptions
    from export.onnx_export import export_checkpoint
    from unet.checkpoint import load_checkpoint, save_checkpoint

    folder = tmp_path_factory.mktemp("no-car")
    state = load_checkpoint(sharp_checkpoint)
    weights = {**state["model"], "head.bias": state["model"]["head.bias"] - 100}
    fields = {key: value for key, value in state.items() if key not in ("kind", "format")}
    save_checkpoint({**fields, "model": weights}, folder / "best.pt")
    paths = {"checkpoint": folder / "best.pt", "fp16": folder / "fp16.onnx", "fp32": folder / "fp32.onnx"}
    for precision in ("fp16", "fp32"):
        export_checkpoint(paths["checkpoint"], paths[precision], ExportOptions(fp16=precision == "fp16"))
    return paths


def test_fp16_of_a_model_that_finds_no_car_is_not_verified(no_car, parity_photos):
    report = verify_parity(no_car["checkpoint"], no_car["fp16"], parity_photos, on_cpu(3), progress=False)
    assert all(image.dice == 1.0 and image.reference_car == 0 for image in report.images)
    assert not report.passed and report.failed == () and len(report.untested) == 3
    text = "\n".join(report.lines())
    assert "not tested: PyTorch predicts no car on 3 of 3 photos" in text and "fp16 file is not verified" in text
    assert "min Dice n/a (no masks compared)" in text and text.endswith("-> NOT TESTED")


def test_fp32_of_a_model_that_finds_no_car_passes_on_its_logits_and_says_the_masks_were_not_compared(no_car, parity_photos):
    report = verify_parity(no_car["checkpoint"], no_car["fp32"], parity_photos, on_cpu(3), progress=False)
    assert report.passed, "\n".join(report.lines())
    assert "masks not compared: PyTorch predicts no car on 3 of 3 photos (the FP32 criterion" in "\n".join(report.lines())


def test_unet_export_does_not_install_an_fp16_file_it_could_not_verify(no_car, parity_photos, tmp_path):
    from click.testing import CliRunner

    from export.cli import main

    out = tmp_path / "m.onnx"
    args = [no_car["checkpoint"], "-o", out, "--verify", parity_photos, "--verify-limit", 2, "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(main, ["to-onnx", *map(str, args)])
    assert result.exit_code == 1, result.output
    assert "NOT TESTED: PyTorch predicts no car" in result.output and "-> NOT TESTED" in result.output
    assert f"the masks of 2 of 2 photos test nothing (PyTorch predicts no car on them, or car everywhere): {out} was not" in (
        result.output
    )
    assert "or try --fp32, which is verified by its logits" in result.output and list(tmp_path.iterdir()) == []


# ---- under OpenVINO (--runtime openvino) -----------------------------------------------------------


def openvino_bf16() -> bool:
    from batch.inference import openvino_runtime

    return openvino_runtime.installed() and openvino_runtime.computes_bf16()


def test_openvino_runs_the_fp32_file_within_its_logit_tolerance(exported_onnx, sharp_checkpoint, parity_photos):
    pytest.importorskip("openvino")
    options = VerifyOptions(limit=3, runtime="openvino")
    report = verify_parity(sharp_checkpoint, exported_onnx["fp32"], parity_photos, options, progress=False)
    assert report.passed, "\n".join(report.lines())
    assert report.precision == "fp32" and report.providers == ("OpenVINO CPU f32",)
    assert max(image.rel_logit_diff for image in report.images) <= 1e-4
    assert "OpenVINO CPU f32" in report.lines()[0]


def test_openvino_fails_a_drifted_file_as_onnxruntime_does(exported_onnx, sharp_checkpoint, parity_photos, tmp_path):
    pytest.importorskip("openvino")
    broken = tampered(exported_onnx["fp32"], tmp_path / "drift.onnx", "net.head.weight", lambda a: a * 1.01)
    report = verify_parity(sharp_checkpoint, broken, parity_photos, VerifyOptions(limit=2, runtime="openvino"), progress=False)
    assert not report.passed and all("relative (> 0.0001)" in image.verdict for image in report.images)


@pytest.mark.skipif(not openvino_bf16(), reason="needs openvino on a CPU with bf16 instructions (AVX-512 BF16 or AMX)")
def test_bf16_is_judged_by_its_masks_and_a_pass_lets_auto_consider_it(exported_onnx, sharp_checkpoint, parity_photos, tmp_path):
    from click.testing import CliRunner

    from batch.core.files import file_sha256
    from batch.inference.runtime_choice import OPENVINO_BF16, openvino_candidates
    from export.cli import main

    out = tmp_path / "m.onnx"
    args = [sharp_checkpoint, "-o", out, "--fp32", "--verify", parity_photos, "--verify-limit", 3, "--runtime", "openvino",
            "--openvino-precision", "bf16", "--no-progress"]  # fmt: skip
    assert OPENVINO_BF16 not in openvino_candidates("0" * 64)
    result = CliRunner().invoke(main, ["to-onnx", *map(str, args)])
    assert result.exit_code == 0, result.output
    assert "(bf16, OpenVINO CPU bf16)" in result.output and "mask Dice >= 0.999" in result.output
    assert "unet-batch --runtime auto may run m.onnx at bf16 on this CPU" in result.output
    assert OPENVINO_BF16 in openvino_candidates(file_sha256(out))  # auto now times bf16 too


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runtime", "openvino"], "--runtime choose how --verify checks the file: add --verify DIR"),
        (["--openvino-precision", "bf16", "--verify", "PHOTOS"], "an OpenVINO precision (bf16) needs runtime openvino"),
        (["--runtime", "openvino", "--device", "cuda", "--verify", "PHOTOS"], "runtime openvino runs on the CPU only"),
    ],
)
def test_openvino_verification_options_that_cannot_work_are_refused(sharp_checkpoint, parity_photos, tmp_path, args, message):
    from click.testing import CliRunner

    from export.cli import main

    out = tmp_path / "m.onnx"
    args = [str(parity_photos) if arg == "PHOTOS" else arg for arg in args]
    result = CliRunner().invoke(main, ["to-onnx", str(sharp_checkpoint), "-o", str(out), "--fp32", "--no-progress", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and not out.exists()
