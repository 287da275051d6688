"""A folded U-Net (``UNetConfig.fold``, issue 21) through ``unet-export``: its contract, its fold ops, FP32/FP16/INT8, --verify.

The tiny folded net (width 4, depth 2, fold 2) takes 64x96 photos, runs on a 32x48 grid and unfolds its
4 logits per block back to 64x96: ``input_multiple`` is 2**2 * 2 = 8.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from conftest import fine_tune
from test_export import random_photos, relative_diff, run_onnx, torch_logits

from batch.core.contract import ModelContract
from export.cli import main
from export.config import ExportError, ExportOptions
from export.onnx_export import export_checkpoint
from export.quantize import find_float_nodes
from unet.checkpoint import load_checkpoint
from unet.config import UNetConfig
from unet.model import refold

PRECISIONS = {"fp32": ["--fp32"], "fp16": ["--fp16"], "int8": ["--int8", "--calibrate", "{photos}"]}
FOLD_OPS = ("SpaceToDepth", "DepthToSpace")
STEPS = 40  # of fine-tuning after the refold


@pytest.fixture(scope="module")
def folded_checkpoint(sharp_checkpoint: Path, parity_photos: Path, tmp_path_factory) -> Path:
    """sharp_checkpoint refolded to fold 2 (``unet.model.refold``) and fine-tuned for STEPS full-batch steps.

    Refolded weights alone repeat each logit over its 2x2 block: blocky boundaries whose pixels sit on the
    threshold, where INT8's error flips them. A few steps on the parity photos make them sharp again.
    """
    state = load_checkpoint(sharp_checkpoint)
    unfolded = UNetConfig.from_dict(state["model_config"])
    folded = replace(unfolded, fold=2)
    state = {**state, "model": refold(state["model"], unfolded, folded), "model_config": folded.to_dict()}
    return fine_tune(state, parity_photos, steps=STEPS, lr=1e-2, out=tmp_path_factory.mktemp("folded"))


@pytest.fixture(scope="module")
def folded_exports(folded_checkpoint: Path, parity_photos: Path, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """The folded checkpoint through ``unet-export to-onnx --verify`` in each precision: {precision: (file, output)}."""
    folder = tmp_path_factory.mktemp("folded-onnx")
    verify = ["--verify", parity_photos, "--verify-limit", 3, "--device", "cpu", "--no-progress"]
    exports = {}
    for precision, options in PRECISIONS.items():
        out = folder / f"{precision}.onnx"
        args = [folded_checkpoint, "-o", out, *[str(a).format(photos=parity_photos) for a in options], *verify]
        result = CliRunner().invoke(main, ["to-onnx", *map(str, args)])
        exports[precision] = (out, result.output)
        assert result.exit_code == 0, result.output
    return exports


def graph_of(exports: dict[str, tuple[Path, str]], precision: str) -> onnx.GraphProto:
    return onnx.load(str(exports[precision][0])).graph


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_passes_verification_and_states_the_multiple_of_8(folded_exports, precision):
    out, output = folded_exports[precision]
    assert "3/3 photos pass" in output and "-> PASS" in output and "NOT TESTED" not in output
    assert f"wrote {out}: {precision}" in output and "input uint8 NHWC 64x96 (any multiple of 8)" in output
    contract = ModelContract.from_metadata({p.key: p.value for p in onnx.load(str(out)).metadata_props})
    assert (contract.input_size, contract.input_multiple, contract.precision) == ((64, 96), 8, precision)
    assert '"fold": 2' in contract.provenance["model_config"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fold_and_unfold_are_space_to_depth_and_depth_to_space(folded_exports, precision):
    """No Reshape/Transpose chain with shape arithmetic, no Gather of channels: SpaceToDepth read by the stem's first
    convolution (its weights in SpaceToDepth's channel order), DepthToSpace."""
    graph = graph_of(folded_exports, precision)
    ops = [node.op_type for node in graph.node]
    assert [op for op in ops if op in FOLD_OPS] == ["SpaceToDepth", "DepthToSpace"] and "Gather" not in ops
    assert not {"Reshape", "Shape"} & set(ops) and ops.count("Transpose") == 1  # the NHWC input's
    found = {node.op_type: node for node in graph.node if node.op_type in FOLD_OPS}
    attributes = {op: {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} for op, node in found.items()}
    assert attributes["SpaceToDepth"] == {"blocksize": 2}
    assert attributes["DepthToSpace"] == {"blocksize": 2, "mode": b"CRD"}  # pixel_shuffle's channel order
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert found["SpaceToDepth"].output[0] in convs[0].input and convs[-1].output[0] in found["DepthToSpace"].input


def test_int8_keeps_the_fold_ops_stem_and_head_in_float(folded_exports):
    graph = graph_of(folded_exports, "int8")
    made_by = producers(graph)
    for node in (n for n in graph.node if n.op_type in FOLD_OPS):
        assert made_by[node.input[0]].op_type not in ("QuantizeLinear", "DequantizeLinear"), node.name
        assert not any(node.output[0] in n.input for n in graph.node if n.op_type == "QuantizeLinear"), node.name
    convs = [node for node in graph.node if node.op_type == "Conv"]
    float_convs = [node.name for node in convs if node.input[1] not in made_by]  # weights an initializer, not dequantized
    assert float_convs == find_float_nodes(graph) == [convs[0].name, convs[1].name, convs[-1].name]  # stem x2, head
    assert made_by[graph.output[0].name].op_type == "DepthToSpace"  # the head is not what writes the logits


@pytest.mark.parametrize("batch, size", [(1, (40, 56)), (2, (64, 96)), (3, (24, 128))])
@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-4), ("fp16", 1e-2)])
def test_it_matches_pytorch_at_any_batch_and_multiple_of_8(folded_exports, folded_checkpoint, precision, tolerance, batch, size):
    images = random_photos(batch, *size, seed=5)
    logits = run_onnx(folded_exports[precision][0], images)
    assert logits.shape == (batch, 1, *size)
    assert relative_diff(logits, torch_logits(folded_checkpoint, images)) < tolerance


def test_the_nchw_layout_folds_the_same(folded_exports, folded_checkpoint, tmp_path):
    export_checkpoint(folded_checkpoint, tmp_path / "nchw.onnx", ExportOptions(fp16=False, layout="NCHW"))
    images = random_photos(2, 32, 48, seed=6)
    assert relative_diff(run_onnx(tmp_path / "nchw.onnx", images, "NCHW"), torch_logits(folded_checkpoint, images)) < 1e-4


def test_a_size_that_is_not_a_multiple_of_8_is_refused(folded_checkpoint, tmp_path):
    with pytest.raises(ExportError, match=r"\(depth 2, fold 2\): .* multiples of 8. Try --input-size 64x96 or 72x96"):
        export_checkpoint(folded_checkpoint, tmp_path / "m.onnx", ExportOptions(input_size=(68, 96)))
    assert list(tmp_path.iterdir()) == []


def test_openvino_computes_the_folded_export_as_pytorch_does(folded_exports, folded_checkpoint, parity_photos):
    """OpenVINO 2026.4 fused the channel Gather the export once put after SpaceToDepth into the stem's convolution
    wrongly (logits off by 35% on the 640x960 model); the export's graph has no such Gather now."""
    pytest.importorskip("openvino")
    from export.config import VerifyOptions
    from export.verify import verify_parity

    options = VerifyOptions(limit=3, runtime="openvino")
    report = verify_parity(folded_checkpoint, folded_exports["fp32"][0], parity_photos, options, progress=False)
    assert report.passed and max(image.rel_logit_diff for image in report.images) <= 1e-4, "\n".join(report.lines())
