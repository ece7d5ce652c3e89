"""``onnx``: the ONNX file (export/pipeline.py: dynamo or TorchScript exporter, checker, parity in
onnxruntime, metadata in ``metadata_props``). The default target, and the source of the targets
that convert from ONNX (``ort``, ``openvino``)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from export.metadata import ExportMetadata, read_metadata
from export.targets import register_target
from export.targets._base import ConvertJob, Predict, Target, TargetResult


@register_target
class OnnxTarget(Target):
    name = "onnx"
    title = "ONNX"
    suffix = ".onnx"
    runtime = "onnxruntime"
    packages = ("onnx", "onnxruntime")
    rank = 0

    def export(self, job: ConvertJob, dest: Path) -> TargetResult:
        from export.pipeline import export_model

        report = export_model(job.model, dest, inputs=job.inputs, inputs_from_data=job.inputs_from_data,
                              metadata=job.metadata, opset=job.opset, exporter=job.exporter, simplify=job.simplify,
                              atol=job.atol, measure_cost=False, log=job.log)  # the caller measured the cost
        return TargetResult(self.name, self.title, report.path, [report.path], report.bytes, report.parity,
                            report.metadata, f"{report.exporter} exporter, opset {report.graph.opset}",
                            report.graph.seconds, lines=report.summary_lines(),
                            details={k: v for k, v in report.to_dict().items() if k in ("nodes", "export", "simplify", "notes")})

    def load(self, path: Path, threads: int | None = None) -> Predict:
        from export.runtime import make_session, run_logits

        session = make_session(path, threads=threads)
        return lambda x: run_logits(session, x)

    def read_metadata(self, path: Path) -> ExportMetadata:
        return read_metadata(path)

    def runner(self, path: Path, *, batch: int = 1, threads: int | None = None,
               input_shape: Sequence[int]) -> tuple[Callable[[], object], str]:
        from export.latency import onnx_runner

        return onnx_runner(path, batch=batch, threads=threads, provider="CPUExecutionProvider", input_shape=input_shape)

    def provider(self) -> str:
        return "CPUExecutionProvider"

