"""``ort``: onnxruntime's mobile ORT format, by onnxruntime's own converter.

Conversion: the verified ONNX file (with this target's metadata) goes through
``onnxruntime.tools.convert_onnx_models_to_ort`` (the Python API of
``python -m onnxruntime.tools.convert_onnx_models_to_ort``), optimisation style ``Fixed``: the graph
is optimised once, at conversion, without platform-specific layouts. It writes the ``.ort`` file
and the ``.required_operators.config`` that a reduced-size onnxruntime mobile build is compiled
with (kept beside it). Then onnxruntime's mobile-usability check
(``onnxruntime.tools.check_onnx_model_mobile_usability``) looks at the ONNX graph: whether the
NNAPI (Android) and CoreML (iOS) execution providers could take it as it is, or with fixed input
shapes; its verdicts and messages go into the report.

Parity and latency: the ``.ort`` file in onnxruntime (an ORT-format file loads like an ONNX
file), with the session options of every other onnxruntime figure here (export/runtime.py).
The metadata travels inside: the ORT format keeps the ONNX ``metadata_props``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from export.metadata import ExportMetadata
from export.targets import register_target
from export.targets._base import ConvertJob, Predict, Target

_VERDICT = re.compile(r"Model should perform well with (?P<ep>.+?) (?P<when>as is|if modified to have fixed input "
                      r"shapes): (?P<verdict>YES|NO|MAYBE)")


@register_target
class OrtTarget(Target):
    name = "ort"
    title = "onnxruntime ORT format"
    suffix = ".ort"
    runtime = "onnxruntime"
    packages = ("onnxruntime",)
    from_onnx = True

    def paths(self, main: Path) -> list[Path]:
        return [main, main.with_suffix(".required_operators.config")]

    def convert(self, job: ConvertJob, main: Path) -> dict[str, Any]:
        import onnx
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

        from export.metadata import write_metadata

        source = main.with_suffix(".onnx")
        proto = onnx.load(str(job.onnx_path))
        write_metadata(proto, self.metadata_for(job))
        onnx.save(proto, str(source))
        convert_onnx_models_to_ort(source, output_dir=main.parent, optimization_styles=[OptimizationStyle.Fixed])
        config = self.paths(main)[1]
        if not config.exists():  # the converter names it after the style in some versions
            next(main.parent.glob("*.config")).rename(config)
        source.unlink()
        operators = [line for line in config.read_text().splitlines() if line and not line.startswith("#")]
        return {"optimization_style": "Fixed", "required_operators": operators,
                "mobile_usability": mobile_usability(job.onnx_path)}

    def describe(self, details: dict[str, Any]) -> list[str]:
        usability = details.get("mobile_usability") or {}
        verdicts = ", ".join(
            f"{ep} {v['as_is']}" + (f" ({v['fixed_shapes']} with fixed input shapes)" if v.get("fixed_shapes") else "")
            for ep, v in (usability.get("providers") or {}).items())
        return [f"required operators: {len(details.get('required_operators') or [])} "
                f"({', '.join(op.split(';')[-1] for op in details.get('required_operators') or [])})",
                f"mobile usability (onnxruntime's check): {verdicts or 'no verdict'}"]

    def load(self, path: Path, threads: int | None = None) -> Predict:
        from export.runtime import make_session, run_logits

        session = make_session(path, threads=threads)
        return lambda x: run_logits(session, x)

    def read_metadata(self, path: Path) -> ExportMetadata:
        from export.runtime import make_session

        return ExportMetadata.from_props(make_session(path).get_modelmeta().custom_metadata_map)

    def runner(self, path: Path, *, batch: int = 1, threads: int | None = None,
               input_shape: Sequence[int]) -> tuple[Callable[[], object], str]:
        from export.latency import onnx_runner

        return onnx_runner(path, batch=batch, threads=threads, provider="CPUExecutionProvider", input_shape=input_shape)

    def provider(self) -> str:
        return "CPUExecutionProvider"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def mobile_usability(onnx_path: Path) -> dict[str, Any]:
    """onnxruntime's mobile-usability check of an ONNX file: per execution provider (NNAPI, CoreML
    NeuralNetwork, CoreML MLProgram), whether it should perform well as is and with fixed input
    shapes (YES / MAYBE / NO), whether NNAPI or CoreML is worth trying at all, and its messages."""
    from onnxruntime.tools.mobile_helpers.usability_checker import analyze_model

    logger = logging.getLogger("kdcompress.ort_usability")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    collect = _Collect()
    logger.addHandler(collect)
    try:
        try_eps = analyze_model(Path(onnx_path), skip_optimize=False, logger=logger)
    finally:
        logger.removeHandler(collect)
    providers: dict[str, dict[str, str]] = {}
    for message in collect.messages:
        match = _VERDICT.search(message)
        if match:
            key = "as_is" if match["when"] == "as is" else "fixed_shapes"
            providers.setdefault(match["ep"], {})[key] = match["verdict"]
    lines = [line.strip() for m in collect.messages for line in m.splitlines()]
    messages = [line for line in lines if line and not set(line) <= {"=", "-"} and not line.startswith("Checking ")]
    return {"try_nnapi_or_coreml": bool(try_eps), "providers": providers, "messages": messages}
