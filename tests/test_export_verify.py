"""export.verify: parity of exported models with PyTorch, and that it catches broken ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from export.verify import VerifyError, export_verified, pick_photos, verify_parity

HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


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
    report = verify_parity(sharp_checkpoint, exported_onnx[precision], parity_photos, limit=4, device="cpu", progress=False)
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
    report = verify_parity(sharp_checkpoint, broken, parity_photos, limit=3, device="cpu", progress=False)
    assert not report.passed and len(report.failed) == 3
    for image in report.failed:
        for message in messages:
            assert any(message in failure for failure in image.failures), image.failures
    assert report.lines()[-1].endswith("FAIL") and "0/3 photos pass" in report.lines()[-1]


def test_small_fp16_error_passes_but_the_same_error_in_fp32_does_not(exported_onnx, sharp_checkpoint, parity_photos, tmp_path):
    """FP16 is judged by its masks, FP32 by its logits: a 1e-3 weight error is fine for one, not the other."""
    for precision in ("fp16", "fp32"):
        nudged = tampered(exported_onnx[precision], tmp_path / f"{precision}.onnx", "net.head.weight", lambda a: a * 1.001)
        report = verify_parity(sharp_checkpoint, nudged, parity_photos, limit=2, device="cpu", progress=False)
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
        verify_parity(sharp_checkpoint, exported_onnx["fp32"], parity_photos, device=device, progress=False)
    with pytest.raises(VerifyError, match=f"--device {shown} cannot be used"):  # before the (slow) export
        export_verified(sharp_checkpoint, tmp_path / "m.onnx", parity_photos, device=device, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_auto_takes_the_gpu_only_when_onnxruntime_has_one(exported_onnx, sharp_checkpoint, parity_photos):
    report = verify_parity(sharp_checkpoint, exported_onnx["fp32"], parity_photos, limit=1, device="auto", progress=False)
    assert report.providers[0] == ("CUDAExecutionProvider" if HAS_CUDA_EP else "CPUExecutionProvider")


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_real_photos_at_full_resolution(carvana_dir, exported_onnx, sharp_checkpoint, precision):
    """Real 1918x1280 JPEGs, masks compared at full size (the tiny model knows only synthetic cars)."""
    report = verify_parity(
        sharp_checkpoint, exported_onnx[precision], carvana_dir / "train", limit=2, device="cpu", progress=False
    )
    assert report.passed, "\n".join(report.lines())
    assert all(image.photo_size == (1280, 1918) for image in report.images)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_EP, reason="needs onnxruntime-gpu with the CUDA provider")
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_cuda_provider_parity(exported_onnx, sharp_checkpoint, parity_photos, precision):
    report = verify_parity(sharp_checkpoint, exported_onnx[precision], parity_photos, device="cuda", progress=False)
    assert report.providers[0] == "CUDAExecutionProvider"
    assert report.passed, "\n".join(report.lines())


def test_peak_activation_sees_what_the_folded_graph_holds():
    """Tracked on the unfolded model, it equals the largest |output| of any layer of the folded (exported) net."""
    import torch

    from export.onnx_export import fold_batchnorm
    from export.verify import peak_activation
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
    with torch.no_grad(), peak_activation(model) as peak:
        model(x)
        folded(x)  # hooks on `model` only: this adds nothing to peak
    for handle in handles:
        handle.remove()
    assert peak[0] == pytest.approx(max(outputs), rel=1e-5)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_fp16_activations_beyond_its_range_fail_even_when_the_logits_agree():
    from batch.core.contract import ModelContract
    from export.verify import compare

    contract = ModelContract(input_height=4, input_width=4, input_multiple=4, precision="fp16")
    logits = np.linspace(-5, 5, 16, dtype=np.float32).reshape(1, 1, 4, 4)
    ok = compare("a.jpg", logits, logits, (8, 8), contract, 1e-4, 0.999, 1.0, 6e4)
    over = compare("a.jpg", logits, logits, (8, 8), contract, 1e-4, 0.999, 1.0, 7e4)
    assert ok.passed and ok.dice == 1.0 and ok.photo_size == (8, 8)
    assert over.failures == ("activations reach 7e+04, beyond FP16's 65504: export with --fp32",)
