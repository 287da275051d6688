"""OpenVINO on the CPU: the peer of ONNX Runtime's CPU provider (:mod:`batch.inference.runtime`).

OpenVINO reads the ONNX files of ``unet-export`` as they are (the uint8 input, the normalization in
the graph, INT8's QDQ pairs) and compiles them for this CPU's instruction set; on CPUs with AVX-512
VNNI, BF16 or AMX it runs them faster than ONNX Runtime runs the same file. Which of the two runs a
model is :mod:`batch.inference.runtime_choice`'s business; this module only opens one.

Precision: OpenVINO's CPU plugin computes a float model in bf16 by default where the CPU has bf16
instructions, which changes the numbers (masks within Dice 0.9999 of FP32 for the bundled model, but
not guaranteed for any model). Here the precision is always asked for explicitly: ``f32`` (the
numbers of ONNX Runtime's FP32 to ~1e-5) unless ``bf16`` is asked for, which
:mod:`batch.inference.runtime_choice` does only for a model whose bf16 masks were verified.

openvino is imported inside the functions, so this module imports without the ``cpu`` extra.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from batch.core.contract import ModelContract
from batch.core.devices import cpu_count
from batch.core.extras import require
from batch.core.logs import first_line
from batch.inference.config import OPENVINO_PRECISIONS
from batch.inference.runtime import Lanes, ModelError, cpu_streams

if TYPE_CHECKING:
    import openvino as ov

PROVIDER = "OpenVINO CPU"  # how reports name what runs the graph, beside ONNX Runtime's provider names


def openvino():
    """The openvino module; :class:`~batch.core.extras.MissingExtra` naming the extra when it is not installed."""
    return require("openvino", "cpu", what="--runtime openvino")


def installed() -> bool:
    """Whether openvino can be imported (``runtime auto`` measures it only then)."""
    try:
        openvino()
    except ImportError:
        return False
    return True


def version() -> str:
    return openvino().__version__.split("-")[0]


def cpu_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin can use here (``FP32``, ``INT8``, ``BF16``, ...): BF16 only on CPUs with bf16
    instructions (AVX-512 BF16, AMX)."""
    return tuple(openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def computes_bf16() -> bool:
    """Whether OpenVINO computes bf16 on this CPU (where it cannot, asking for bf16 quietly gives f32)."""
    return "BF16" in cpu_capabilities()


def compile_config(threads: int | None, precision: str, streams: int | None = None) -> dict[str, object]:
    """``threads`` threads split into ``streams`` (None: as OpenVINO's THROUGHPUT hint splits them; 1: its LATENCY
    hint, every thread on each batch), the precision asked for.

    Streams run batches side by side and never wait for each other, where one stream of all the threads
    waits at every layer for its slowest thread, and in a run the decode and writer threads take turns on
    the same cores: on the project's 2-core VM, two streams of one thread run the bundled INT8 file at
    28.4-31.1 images/s against 24.9-25.9 for one stream of two (inference alone). Threads are not pinned
    to cores, because the decode and writer threads share those cores.
    """
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"OpenVINO precision must be one of {', '.join(OPENVINO_PRECISIONS)}, not {precision!r}")
    threads = threads or cpu_count()
    config = {
        "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": precision,
        "ENABLE_CPU_PINNING": False,
    }
    return config | ({"NUM_STREAMS": cpu_streams(threads, streams)[0]} if streams else {})  # at most one a thread


class OpenVinoNetwork:
    """A model compiled by OpenVINO for this CPU: a batch of the model's input -> its (N, 1, h, w) scores, up to
    ``streams`` batches at once from as many threads (an infer request each).

    The graph's batch stays dynamic; its height and width are fixed to the model's input size (the
    runner feeds no other), which lets OpenVINO plan its memory once instead of on every call.
    """

    name = "openvino"
    provider = PROVIDER

    def __init__(
        self, path: Path, contract: ModelContract, threads: int | None = None, precision: str = "f32", streams: int | None = None
    ):
        self.precision = precision
        self.compiled = compile_model(path, contract, compile_config(threads, precision, streams))
        self.streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.requests = Lanes(self.compiled.create_infer_request() for _ in range(self.streams))
        self.first_call = threading.Lock()
        self.warm = False  # a call has completed

    def run(self, x: np.ndarray) -> np.ndarray:
        """The scores for ``x``, in the output's dtype: a copy (a request reuses its output buffer); ``x`` is
        read in place.

        The first call runs alone, the others waiting for it: OpenVINO's Python binding initializes statics on
        its first inference, and two threads doing that at once can deadlock (one holds the GIL and waits for
        the initialization, the other holds the initialization and waits for the GIL; seen with two streams,
        OpenVINO 2026.4).
        """
        if not self.warm:
            with self.first_call:
                if not self.warm:
                    scores = self.infer(x)
                    self.warm = True
                    return scores
        return self.infer(x)

    def infer(self, x: np.ndarray) -> np.ndarray:
        with self.requests.take() as request:
            return request.infer({0: x}, share_inputs=True)[0]

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "version": version(), "precision": self.precision}


def compile_model(path: Path, contract: ModelContract, config: dict[str, object]) -> ov.CompiledModel:
    """``path`` read and compiled for the CPU; :class:`ModelError` naming the file when OpenVINO cannot."""
    ov = openvino()
    core = ov.Core()
    height, width = contract.input_size
    shape = [-1, height, width, 3] if contract.input_layout == "NHWC" else [-1, 3, height, width]
    try:
        model = core.read_model(str(path))
        model.reshape(shape)
        return core.compile_model(model, "CPU", config)
    except Exception as e:  # openvino raises RuntimeError and its own exception types
        raise ModelError(
            f"{path}: OpenVINO {version()} cannot compile this model ({first_line(e)}); "
            "run it with ONNX Runtime (--runtime onnxruntime)"
        ) from e
