"""Every zoo family the benchmark ships exports with the default (dynamo) exporter and passes parity."""

from __future__ import annotations

import onnx
import pytest

from compressor.models import create
from export.metadata import read_metadata
from export.pipeline import export_model

FAMILIES = ["resnet20", "wrn_16_2", "resnet8x4", "MobileNetV2", "ShuffleV2", "tv:resnet18"]


def unfolded_batch_norms(proto: onnx.ModelProto) -> list[str]:
    """BatchNormalization nodes fed by a Conv that feeds nothing else (those could have been folded).

    Pre-activation blocks (WRN: BN -> ReLU -> Conv) keep BNs that no convolution precedes.
    """
    producer = {out: node for node in proto.graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    return [
        node.name for node in proto.graph.node
        if node.op_type == "BatchNormalization"
        and getattr(producer.get(node.input[0]), "op_type", None) == "Conv"
        and consumers.get(node.input[0]) == 1
    ]


@pytest.mark.parametrize("arch", FAMILIES)
def test_zoo_family_exports_with_parity(arch, tmp_path):
    import torch

    torch.manual_seed(0)
    model = create(arch, num_classes=100).eval()
    out = tmp_path / "m.onnx"
    report = export_model(model, out, input_shape=(3, 32, 32), measure_cost=False, log=None)
    assert report.exporter == "dynamo" and report.graph.notes == []  # no fallback was needed
    assert report.parity.passed and report.parity.max_abs_diff <= 1e-4 and report.parity.top1_agreement == 1.0
    proto = onnx.load(str(out))
    assert proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 100
    assert unfolded_batch_norms(proto) == []  # every BN right after a convolution is folded into it
    assert read_metadata(out).input_size == [32, 32]
