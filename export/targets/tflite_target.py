"""``tflite``: a LiteRT (TensorFlow Lite) flatbuffer, by ``litert-torch`` (ai-edge-torch's successor).

Conversion: ``litert_torch.convert`` of the PyTorch model at batch 1 (the file takes batches of 1
only; NCHW input as in PyTorch, the layout changes inside the graph), written with
``LiteRTModel.export``. The metadata is one JSON string in the flatbuffer's ``metadata`` table
under ``kdcompress_metadata`` (a named buffer, as TFLite model metadata is stored).

Parity and latency: ``ai_edge_litert.interpreter.Interpreter`` (with its default XNNPACK delegate)
and ``num_threads`` = the thread count; one image per ``invoke``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from export.metadata import ExportMetadata
from export.targets import register_target
from export.targets._base import METADATA_KEY, ConvertJob, Predict, Target, metadata_from_json, metadata_json


@register_target
class TfliteTarget(Target):
    name = "tflite"
    title = "LiteRT .tflite"
    suffix = ".tflite"
    runtime = "litert"
    extra = "tflite"
    modules = ("litert_torch", "ai_edge_litert")
    packages = ("litert-torch", "ai-edge-litert")
    batch = 1

    def convert(self, job: ConvertJob, main: Path) -> dict[str, Any]:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the converter's C++ logging
        import litert_torch
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils

        model = litert_torch.convert(job.model, (job.inputs[:1].contiguous(),))
        plain = main.with_suffix(".plain.tflite")
        model.export(str(plain))
        tree = flatbuffer_utils.read_model(str(plain))
        buffer = schema.BufferT()
        buffer.data = list(metadata_json(self.metadata_for(job)).encode())
        tree.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = METADATA_KEY, len(tree.buffers) - 1
        tree.metadata = [*(tree.metadata or []), entry]
        flatbuffer_utils.write_model(tree, str(main))
        plain.unlink()
        return {"delegate": "XNNPACK"}

    def load(self, path: Path, threads: int | None = None) -> Predict:
        from ai_edge_litert.interpreter import Interpreter

        from export.onnx_export import _native_output_discarded

        with _native_output_discarded():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            interpreter = Interpreter(model_path=str(path), num_threads=int(threads) if threads else None)
            interpreter.allocate_tensors()
        source = interpreter.get_input_details()[0]["index"]
        result = interpreter.get_output_details()[0]["index"]

        def predict(x):
            interpreter.set_tensor(source, x)
            interpreter.invoke()
            return interpreter.get_tensor(result).copy()

        return predict

    def read_metadata(self, path: Path) -> ExportMetadata:
        from ai_edge_litert.tools import flatbuffer_utils

        tree = flatbuffer_utils.read_model(str(path))
        entry = next(m for m in tree.metadata or [] if _text(m.name) == METADATA_KEY)
        return metadata_from_json(bytes(tree.buffers[entry.buffer].data))

    def provider(self) -> str:
        return "XNNPACK"


def _text(name: str | bytes | None) -> str:
    return name.decode() if isinstance(name, bytes) else (name or "")
