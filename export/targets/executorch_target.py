"""``executorch``: an ExecuTorch program (``.pte``) lowered to the XNNPACK backend.

Conversion: ``torch.export`` of the PyTorch model at batch 1 (a phone app's batch; the file takes
batches of 1 only), ``executorch.exir.to_edge_transform_and_lower`` with the
``XnnpackPartitioner`` (the operators XNNPACK supports run as delegated blobs, the rest on
ExecuTorch's portable kernels: the report counts both), then ``to_executorch`` and the program's
bytes. The metadata is a constant method ``kdcompress_metadata`` of the program that returns one
JSON string (an app calls it like ``forward``).

Parity and latency: ExecuTorch's Python runtime (``executorch.runtime.Runtime``) loads the file
and executes ``forward`` one image at a time; the XNNPACK threadpool is set to the thread count
(a process-wide setting of ExecuTorch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export.metadata import ExportMetadata
from export.targets import register_target
from export.targets._base import METADATA_KEY, ConvertJob, Predict, Target, metadata_from_json, metadata_json


@register_target
class ExecuTorchTarget(Target):
    name = "executorch"
    title = "ExecuTorch .pte, XNNPACK"
    suffix = ".pte"
    runtime = "executorch"
    extra = "executorch"
    modules = ("executorch",)
    packages = ("executorch",)
    batch = 1

    def convert(self, job: ConvertJob, main: Path) -> dict[str, Any]:
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.devtools.backend_debug import get_delegation_info
        from executorch.exir import to_edge_transform_and_lower

        sample = job.inputs[:1].contiguous()
        program = torch.export.export(job.model, (sample,))
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                           constant_methods={METADATA_KEY: metadata_json(self.metadata_for(job))})
        info = get_delegation_info(edge.exported_program().graph_module)
        main.write_bytes(edge.to_executorch().buffer)
        return {"backend": "XNNPACK", "delegated_subgraphs": int(info.num_delegated_subgraphs),
                "delegated_nodes": int(info.num_delegated_nodes),
                "non_delegated_nodes": int(info.num_non_delegated_nodes)}

    def describe(self, details: dict[str, Any]) -> list[str]:
        return [f"XNNPACK runs {details['delegated_nodes']} operator nodes in {details['delegated_subgraphs']} "
                f"delegated subgraph(s); {details['non_delegated_nodes']} run on ExecuTorch's portable kernels"]

    def _method(self, path: Path, name: str, threads: int | None = None):
        from executorch.runtime import Runtime

        from export.onnx_export import _native_output_discarded

        with _native_output_discarded():  # the runtime prints its CPU probing and threadpool changes to fd 2
            if threads:
                from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

                _unsafe_reset_threadpool(int(threads))
            return Runtime.get().load_program(Path(path)).load_method(name)

    def load(self, path: Path, threads: int | None = None) -> Predict:
        import torch

        forward = self._method(path, "forward", threads)
        return lambda x: forward.execute([torch.from_numpy(x)])[0].numpy()

    def read_metadata(self, path: Path) -> ExportMetadata:
        return metadata_from_json(self._method(path, METADATA_KEY).execute([])[0])

    def provider(self) -> str:
        return "XNNPACK"
