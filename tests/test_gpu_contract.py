"""The GPU path's contracts, checked on the CPU: what a first run on a GPU host would otherwise find out.

ONNX Runtime's CUDA provider (where its libraries are found, what it is asked for, what a provider
listed but not starting does), the DALI graph and calls against the installed DALI, the device copy
and the one-shape inference, and the rule that a gpu test skipping on a GPU host fails.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import logging
import os
import re
import subprocess
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import REPO, write_photo
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException
from PIL import Image

from batch.cli import main
from batch.core.contract import ModelContract
from batch.core.devices import DeviceError
from batch.inference import runtime
from batch.inference.decode import DALI_IN_FLIGHT, Batch, DaliDecoder, Failure, Item, dali_available, define_pipeline
from batch.inference.model import BoundPredictor, load_model
from batch.inference.runtime import cuda_library_names, find_cuda_libraries, open_session

pytestmark = pytest.mark.gpu_contract
needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (pip install '.[dali]')")

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# What NVIDIA's CUDA 13 wheels install (nvidia-cublas, -cuda-runtime, -cuda-nvrtc, -curand, -cufft) and cuDNN 9's.
CUDA13_LIBRARIES = [
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libnvrtc.so.13",
    "libcurand.so.10",
    "libcufft.so.12",
    "libcudart.so.13",
]
CUDNN9_LIBRARIES = ["libcudnn.so.9"]


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


@pytest.fixture
def acceptance_layout(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """The GPU acceptance run's install, as empty files: onnxruntime-gpu (built for CUDA 13) by ``pip --target``
    into SITE, where the only NVIDIA library is nvJPEG's; CUDA 13 and cuDNN 9 in the host's torch environment."""
    monkeypatch.setattr(ort, "cuda_version", "13.0")  # the onnxruntime-gpu build's; its library list follows it
    site, host = tmp_path / "site", tmp_path / "host-site-packages"
    touch(site / "onnxruntime" / "__init__.py")
    touch(site / "nvidia" / "cu13" / "lib" / "libnvjpeg.so.13")
    for name in CUDA13_LIBRARIES:
        touch(host / "nvidia" / "cu13" / "lib" / name)
    for name in CUDNN9_LIBRARIES:
        touch(host / "nvidia" / "cudnn" / "lib" / name)
    touch(host / "torch" / "__init__.py")
    return site, host


@pytest.fixture
def cuda_listed(monkeypatch):
    """This (CPU) onnxruntime lists a CUDA provider that cannot start: a GPU build without its libraries or a GPU."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])


@pytest.fixture
def loaded(monkeypatch) -> list[str]:
    """What is loaded with ctypes.CDLL, and when ort.preload_dlls() runs ("preload_dlls"), in order; nothing is loaded."""
    calls: list[str] = []
    monkeypatch.setattr(ctypes, "CDLL", lambda path, *args, **kwargs: calls.append(str(path)))
    monkeypatch.setattr(ort, "preload_dlls", lambda *args, **kwargs: calls.append("preload_dlls"), raising=False)
    return calls


# ---- ONNX Runtime's CUDA provider -------------------------------------------------------------------


def test_onnxruntime_alone_finds_no_cuda_library_in_the_acceptance_layout(acceptance_layout):
    site, host = acceptance_layout
    names = cuda_library_names()
    assert set(names) <= set(CUDA13_LIBRARIES + CUDNN9_LIBRARIES)  # onnxruntime's list matches the wheels' files
    # preload_dlls() looks beside the onnxruntime package, at these paths:
    assert not any(site.joinpath(*relative).is_file() for relative in ort._get_nvidia_dll_paths(False))
    found = find_cuda_libraries(names, [str(site), str(host)])
    assert list(found) == names  # every one, in onnxruntime's load order (cublasLt before cublas)
    assert all(path.parent.parent.parent == host / "nvidia" for path in found.values())


def test_a_cuda_session_loads_them_by_full_path_before_onnxruntime_looks(
    acceptance_layout, cuda_listed, loaded, tiny_onnx: Path, monkeypatch
):
    site, host = acceptance_layout
    monkeypatch.syspath_prepend(str(host))
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(DeviceError, match="could not start its CUDA provider"), pytest.warns(UserWarning):
        open_session(tiny_onnx, "cuda")
    libraries = [str(path) for path in find_cuda_libraries(cuda_library_names(), [str(host)]).values()]
    assert loaded == [*libraries, "preload_dlls"]


def test_cuda_that_does_not_start_names_the_libraries_not_found(acceptance_layout, cuda_listed, loaded, tiny_onnx, monkeypatch):
    site, host = acceptance_layout
    (host / "nvidia" / "cudnn" / "lib" / "libcudnn.so.9").unlink()
    monkeypatch.syspath_prepend(str(host))
    with pytest.raises(DeviceError) as error, pytest.warns(UserWarning):
        load_model(tiny_onnx, "cuda")
    assert "libcudnn.so.9 in no nvidia/*/lib folder on sys.path" in str(error.value)
    assert "--device cpu" in str(error.value)


def test_auto_with_a_cuda_provider_that_does_not_start_runs_on_the_cpu_and_says_why(
    cuda_listed, loaded, tiny_onnx: Path, photo_tree: Path, tmp_path: Path, caplog
):
    caplog.set_level(logging.INFO, logger="batch")
    with pytest.warns(UserWarning):
        result = CliRunner().invoke(main, ["segment", str(photo_tree), str(tmp_path / "out"), "--model", str(tiny_onnx)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["device"], report["decoder"], report["batch_size"]) == ("cpu", "pillow", 8)
    assert "device auto: running on the CPU (ONNX Runtime could not start its CUDA provider" in caplog.text


def test_explicit_cuda_with_a_cuda_provider_that_does_not_start_exits_2(
    cuda_listed, loaded, tiny_onnx: Path, photo_tree: Path, tmp_path: Path
):
    with pytest.warns(UserWarning):
        result = CliRunner().invoke(
            main, ["segment", str(photo_tree), str(tmp_path / "out"), "--model", str(tiny_onnx), "--device", "cuda"]
        )
    assert result.exit_code == 2 and "--device cuda:0 cannot be used: ONNX Runtime could not start" in result.output
    assert not (tmp_path / "out").exists()


def test_the_cuda_provider_is_asked_for_cudnn_heuristics(cuda_listed, loaded, tiny_onnx: Path, monkeypatch):
    asked: list[list] = []
    real_new_session = runtime.new_session
    monkeypatch.setattr(
        runtime,
        "new_session",
        lambda model, options, providers: asked.append(providers) or real_new_session(model, options, providers),
    )
    with pytest.raises(DeviceError), pytest.warns(UserWarning):
        load_model(tiny_onnx, "cuda:1")
    assert asked[0][0] == (CUDA, {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC"})


# ---- BoundPredictor: one shape, warmed up, the allocator started before the threads -------------------


def test_bound_predictor_warms_up_pads_to_one_shape_and_starts_the_allocator_first(tiny_onnx: Path, monkeypatch):
    events: list[tuple[str, object]] = []
    real_run, real_alloc, real_upload = (
        BoundPredictor._run,
        ort.OrtValue.ortvalue_from_shape_and_type,
        ort.OrtValue.ortvalue_from_numpy,
    )
    monkeypatch.setattr(
        BoundPredictor, "_run", lambda self, x, rows: events.append(("run", x.shape()[0])) or real_run(self, x, rows)
    )

    def spy(kind, real):
        return staticmethod(lambda *args: events.append((kind, threading.current_thread().name)) or real(*args))

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", spy("allocate", real_alloc))
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", spy("upload", real_upload))
    predictor = BoundPredictor(load_model(tiny_onnx, "cpu"), 0.5, tta=True, batch_size=8, device_type="cpu")
    main_thread = threading.current_thread().name
    assert events[:2] == [("allocate", main_thread), ("upload", main_thread)]  # before any decoder thread can race it
    assert events[-1] == ("run", 8)  # the warm-up, at the one shape
    events.clear()
    pixels = np.random.default_rng(0).integers(0, 256, (5, 64, 96, 3), dtype=np.uint8)
    batch = Batch([Item(str(i), image=p) for i, p in enumerate(pixels)], list(range(5)), [(96, 144)] * 5, "pillow", pixels=pixels)
    predictions = predictor.predict(batch)
    assert [run for run in events if run[0] == "run"] == [("run", 8), ("run", 8)]  # plain and mirrored, padded 5 -> 8
    assert len(predictions) == 5 and predictions[0].mask().shape == (96, 144)
    assert predictions[0].scores.nbytes == 64 * 96 * 4  # only low-resolution scores came back


# ---- DALI: the graph, the calls, the device copy ----------------------------------------------------------

CONTRACTS = {
    "uint8-nhwc": ModelContract(64, 96),
    "float16-nchw": ModelContract(64, 96, input_layout="NCHW", input_dtype="float16"),
    "float32-nhwc": ModelContract(64, 96, input_layout="NHWC", input_dtype="float32"),
}


def graph_of(contract: ModelContract, device_id: int | None, tta: bool) -> list:
    """The defined (not built: no GPU needed) pipeline's operator instances."""
    pipeline = define_pipeline(contract, 4, 1, device_id, tta)
    pipeline._build_graph()  # DALI's own graph walk; build() would need CUDA
    return pipeline._ops


def public_arguments(instance) -> dict:
    return {k: v for k, v in instance._op._init_args.items() if not k.startswith("_")}


@needs_dali
@pytest.mark.dali
@pytest.mark.parametrize("contract", CONTRACTS.values(), ids=CONTRACTS.keys())
@pytest.mark.parametrize("tta", [False, True])
def test_the_gpu_graph_uses_operators_devices_and_arguments_the_installed_dali_has(contract: ModelContract, tta: bool):
    from nvidia.dali import backend

    for instance in graph_of(contract, 0, tta):
        schema = instance._op.schema or backend.GetSchema(instance._op.schema_name)
        assert not schema.IsDeprecated(), schema.Name()
        assert instance._op.device in schema.GetSupportedBackends(), (schema.Name(), instance._op.device)
        for argument in public_arguments(instance):
            assert schema.HasArgument(argument) and not schema.IsDeprecatedArg(argument), (schema.Name(), argument)


@needs_dali
@pytest.mark.dali
@pytest.mark.parametrize("tta", [False, True])
def test_the_cpu_and_mixed_pipelines_are_one_graph_differing_only_in_device(tta: bool):
    contract = CONTRACTS["float16-nchw"]
    cpu, gpu = graph_of(contract, None, tta), graph_of(contract, 0, tta)
    assert [(i._op.schema.Name(), public_arguments(i)) for i in cpu] == [(i._op.schema.Name(), public_arguments(i)) for i in gpu]
    assert {i._op.device for i in cpu} == {"cpu"}
    devices = {i._op.schema.Name(): i._op.device for i in gpu}
    assert devices.pop("ExternalSource") == "cpu" and devices.pop("decoders__Image") == "mixed"
    assert set(devices.values()) == {"gpu"}  # resize and crop_mirror_normalize run where the decoder left the images


def documented_parameters(function) -> list[str]:
    """A pybind11 method's parameter names, from the signature on its docstring's first line."""
    signature = function.__doc__.strip().splitlines()[0]
    return re.findall(r"(\w+): ", signature.split("(", 1)[1])


@needs_dali
@pytest.mark.dali
def test_the_pipeline_and_copy_calls_match_the_installed_dali():
    from nvidia.dali import Pipeline
    from nvidia.dali.tensors import TensorListCPU, TensorListGPU

    pipeline = define_pipeline(CONTRACTS["uint8-nhwc"], 4, 1, 0, tta=False)
    # Pipelined and asynchronous, which makes DALI choose its dynamic executor: outputs stay valid after the next run.
    assert (pipeline.exec_pipelined, pipeline.exec_async, pipeline.exec_dynamic) == (True, True, True)
    assert pipeline.prefetch_queue_depth == DALI_IN_FLIGHT and pipeline.device_id == 0
    inspect.signature(Pipeline.feed_input).bind(pipeline, "encoded", [np.zeros(4, np.uint8)])
    for method in (Pipeline.schedule_run, Pipeline.outputs, Pipeline.build):
        inspect.signature(method).bind(pipeline)
    assert documented_parameters(TensorListGPU.copy_to_external)[:4] == ["self", "ptr", "cuda_stream", "non_blocking"]
    assert documented_parameters(TensorListCPU.copy_to_external) == ["self", "arg0"]  # the pointer only


class FakeGpuTensorList:
    """DALI's TensorListGPU as _copy_out uses it, holding host samples; copy_to_external has the real one's parameters."""

    def __init__(self, samples: np.ndarray):
        self.samples = np.ascontiguousarray(samples)
        self.copies: list[dict] = []

    def __len__(self) -> int:
        return len(self.samples)

    def shape(self) -> list[tuple[int, ...]]:
        return [sample.shape for sample in self.samples]

    def copy_to_external(self, ptr, cuda_stream=None, non_blocking=False, use_copy_kernel=False) -> None:
        self.copies.append({"cuda_stream": cuda_stream, "non_blocking": non_blocking})
        ctypes.memmove(ptr, self.samples.ctypes.data, self.samples.nbytes)


@needs_dali
@pytest.mark.dali
def test_the_device_copy_fills_a_padded_buffer_and_waits():
    from nvidia.dali.tensors import TensorListGPU

    fake_parameters = list(inspect.signature(FakeGpuTensorList.copy_to_external).parameters)
    assert fake_parameters == documented_parameters(TensorListGPU.copy_to_external)
    buffers = []

    def allocate(shape, dtype):  # OrtValues on the CPU stand in for the GPU's
        buffers.append(ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cpu", 0))
        return buffers[-1]

    decoder = DaliDecoder(CONTRACTS["float16-nchw"], 4, 1, device_id=None, tta=False, allocate=allocate)
    samples = np.random.default_rng(0).standard_normal((3, 3, 64, 96)).astype(np.float16)
    fake = FakeGpuTensorList(samples)
    buffer = decoder._copy_out(fake)
    assert buffer is buffers[0] and buffer.shape() == [4, 3, 64, 96] and buffer.data_type() == "tensor(float16)"
    np.testing.assert_array_equal(buffer.numpy()[:3], samples)
    assert fake.copies == [{"cuda_stream": None, "non_blocking": False}]  # the buffer is complete when handed out


@needs_dali
@pytest.mark.dali
def test_an_onnxruntime_error_in_the_device_copy_fails_one_batch(tmp_path: Path, monkeypatch):
    for i in range(6):
        write_photo(tmp_path / f"{i}.jpg", (96, 144), seed=i)
    decoder = DaliDecoder(CONTRACTS["uint8-nhwc"], 2, 2, device_id=None, tta=False)
    real_copy_out, calls = decoder._copy_out, []

    def fail_second(tensor_list):
        calls.append(len(tensor_list))
        if len(calls) == 2:  # ONNX Runtime's out-of-memory error: not a RuntimeError
            raise RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer")
        return real_copy_out(tensor_list)

    monkeypatch.setattr(decoder, "_copy_out", fail_second)
    entries = list(decoder.batches([Item.from_path(tmp_path / f"{i}.jpg") for i in range(6)]))
    failed = [entry for entry in entries if isinstance(entry, Failure)]
    decoded = [item for entry in entries if isinstance(entry, Batch) for item in entry.items]
    assert [Path(f.item.name).name for f in failed] == ["2.jpg", "3.jpg"] and len(decoded) == 4
    assert "could not be copied for inference (" in failed[0].reason and "Failed to allocate memory" in failed[0].reason


# ---- the test suite on a GPU host --------------------------------------------------------------------------


def test_a_gpu_test_that_skips_fails_on_a_gpu_host(pytester):
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    pytester.makepyfile(
        test_skips="""
import pytest

@pytest.mark.gpu
def test_on_the_gpu():
    pytest.skip("no usable CUDA GPU")

def test_elsewhere():
    pytest.skip("not a gpu test")
"""
    )
    pytester.runpytest_subprocess("--gpu-host").assert_outcomes(failed=1, skipped=1)
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        pytester.runpytest_subprocess().assert_outcomes(skipped=2)  # no GPU here: a skip is a skip


# ---- the acceptance run, cut into phases that fit a lease --------------------------------------------------


def plan_lines() -> tuple[dict[str, tuple[int, float]], str]:
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu-acceptance.sh"), "--plan"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return {
        m[1]: (int(m[2]), float(m[3]))
        for m in re.finditer(r"^phase (\w): (\d+) calls, ([\d.]+) estimated device minutes", done.stdout, re.M)
    }, done.stdout


def test_the_plan_fits_phase_a_in_eight_calls_and_twelve_minutes_from_the_real_sizes():
    phases, text = plan_lines()
    assert set(phases) == {"A", "B", "C"}
    calls, minutes = phases["A"]
    assert calls <= 8 and minutes <= 12
    # Every byte of the recorded wheels is carried once: the pieces of a wheel add up to its size.
    carried = re.findall(r"(\S+\.whl)(?:\.piece-\d\d)? ([\d.]+)", text.split("phase B:")[0])
    ort_wheel = next(
        line.split("\t") for line in (REPO / "scripts" / "gpu_wheels.tsv").read_text().splitlines() if line.startswith("ort\t")
    )
    assert {name for name, _ in carried} == {ort_wheel[1]}  # phase A: onnxruntime-gpu alone, no DALI
    assert sum(float(mib) for _, mib in carried) == pytest.approx(int(ort_wheel[2]) / 2**20, abs=0.1 * len(carried))
    assert calls == len(re.findall(r"^  call \d+: carry \.gpu-payload/A/part-\d\d", text, re.M))


def test_the_staged_wheels_pin_what_dali_needs():
    """DALI 2.4 needs libcst~=1.8: gpu-pack.sh stages that, and the recorded sizes are of a libcst that satisfies it."""
    assert "libcst~=1.8" in (REPO / "benchmarks" / "gpu-pack.sh").read_text()
    recorded = (REPO / "scripts" / "gpu_wheels.tsv").read_text()
    assert re.search(r"^dali\tlibcst-1\.(8|9|\d\d)\.", recorded, re.M)
    if dali_available():
        from importlib.metadata import requires

        assert "libcst~=1.8" in requires("nvidia-dali-cuda130")


@pytest.mark.slow
def test_phase_a_checks_run_on_the_cpu_and_leave_their_results_in_the_archive(tmp_path: Path, tiny_onnx: Path):
    """PHASE=A's segment, scoring and throughput steps with DEVICE=cpu; the CPU's reference masks made beforehand."""
    import tarfile

    carvana = tmp_path / "carvana"
    for i in range(4):
        mask = write_photo(carvana / "photos" / f"car{i}_01.jpg", (96, 144), seed=i)
        (carvana / "truth").mkdir(exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(carvana / "truth" / f"car{i}_01_mask.gif")
    for tta in ("", "-tta"):
        args = [
            str(carvana / "photos"),
            str(carvana / f"cpu{tta}"),
            "--model",
            str(tiny_onnx),
            "--device",
            "cpu",
            "--no-progress",
        ]
        assert CliRunner().invoke(main, ["segment", *args, *(["--tta"] if tta else [])]).exit_code == 0
    env = os.environ | {
        "PHASE": "A", "STAGES": "val-pillow,throughput-pillow", "DEVICE": "cpu", "COPIES": "10",
        "PHOTOS": str(carvana / "photos"), "TRUTH": str(carvana / "truth"), "REFERENCE": str(carvana),
        "AGREEMENT_MODEL": str(tiny_onnx), "WORK": str(tmp_path / "work"), "ARCHIVE": str(tmp_path / "acceptance-A.tgz"),
    }  # fmt: skip
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu-acceptance.sh"), str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    steps = dict(line.split()[:2] for line in (out / "steps.tsv").read_text().splitlines())
    assert {name for name, rc in steps.items() if rc != "0"} == set(), done.stderr[-3000:]
    summary = {t["name"]: t for t in json.loads((out / "summary.json").read_text())}
    agreement = summary["val-gpu-pillow masks vs val-cpu's (validation photos): mean Dice >= 0.999"]
    assert agreement["met"] is True and agreement["figure"].startswith("1.000000 on 4 photos")  # same model, same decoder
    assert summary["val-gpu-pillow-tta Dice vs truth within 0.0005 of val-cpu-tta's"]["met"] is True
    assert json.loads((out / "throughput-pillow.report.json").read_text())["processed"] == 10
    assert "throughput-pillow: 10 photos" in (out / "summary.md").read_text() and "bound by " in (out / "summary.md").read_text()
    with tarfile.open(tmp_path / "acceptance-A.tgz") as archive:
        assert {"./steps.tsv", "./summary.md", "./throughput-pillow.report.json"} <= set(archive.getnames())
