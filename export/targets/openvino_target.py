"""``openvino``: OpenVINO IR (``.xml`` graph + ``.bin`` weights), from the verified ONNX file.

Conversion: OpenVINO's ONNX frontend reads the ONNX file (``Core.read_model``: names, the dynamic
batch and the folded BatchNorms carry over) and ``openvino.save_model`` writes the IR with fp32
weights (``compress_to_fp16=False``: the parity rule is the fp32 one). Not ``openvino.convert_model``:
that is the model-conversion tool's API, which starts a process to send usage telemetry over the
network unless the user opted out (openvino_telemetry; nothing here may reach the network), and
for an ONNX file it runs the same frontend. The metadata is one JSON string in the IR's
``rt_info`` under ``kdcompress_metadata``.

Parity and latency: the IR compiled for the ``CPU`` device with ``INFERENCE_PRECISION_HINT=f32``
(a CPU with bf16 or AMX units would otherwise run in bf16 and fail the fp32 tolerance), the
``LATENCY`` hint and ``INFERENCE_NUM_THREADS`` = the thread count; one infer request is reused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export.metadata import ExportMetadata
from export.targets import register_target
from export.targets._base import METADATA_KEY, ConvertJob, Predict, Target, metadata_from_json, metadata_json

DEVICE = "CPU"


@register_target
class OpenVinoTarget(Target):
    name = "openvino"
    title = "OpenVINO IR"
    suffix = ".xml"
    runtime = "openvino"
    extra = "openvino"
    modules = ("openvino",)
    packages = ("openvino",)
    from_onnx = True

    def paths(self, main: Path) -> list[Path]:
        return [main, main.with_suffix(".bin")]

    def convert(self, job: ConvertJob, main: Path) -> dict[str, Any]:
        import openvino as ov

        model = ov.Core().read_model(str(job.onnx_path))
        model.set_rt_info(metadata_json(self.metadata_for(job)), [METADATA_KEY])
        ov.save_model(model, str(main), compress_to_fp16=False)
        return {"device": DEVICE, "precision": "f32", "weights": "fp32"}

    def load(self, path: Path, threads: int | None = None) -> Predict:
        import openvino as ov

        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        compiled = ov.Core().compile_model(str(path), DEVICE, config)
        request = compiled.create_infer_request()
        output = compiled.output(0)
        return lambda x: request.infer([x])[output]

    def read_metadata(self, path: Path) -> ExportMetadata:
        import openvino as ov

        return metadata_from_json(ov.Core().read_model(str(path)).get_rt_info([METADATA_KEY]).astype(str))

    def provider(self) -> str:
        return DEVICE
