"""Optional graph simplification (constant folding, dead-node and shape-chain removal).

onnxslim is the tool (pure Python, installs cleanly with the rest of the stack here); onnxsim is
used where it is installed instead and onnxslim is not. The simplified graph is only a candidate:
the pipeline verifies it exactly like the export (checker + onnxruntime parity) before keeping it.
Metadata props are carried over explicitly, whatever the tool does with them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import time
from dataclasses import dataclass
from typing import Callable

import onnx

from compressor.errors import UserError


@dataclass
class SimplifiedGraph:
    proto: onnx.ModelProto
    tool: str
    nodes_before: int
    nodes_after: int
    seconds: float

    def to_dict(self) -> dict:
        return {
            "tool": self.tool,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "seconds": round(self.seconds, 3),
        }


def _onnxslim(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(proto)


def _onnxsim(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, ok = onnxsim.simplify(proto)
    if not ok:
        raise RuntimeError("onnxsim could not validate its simplified model")
    return simplified


TOOLS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {"onnxslim": _onnxslim, "onnxsim": _onnxsim}


def available_tool() -> str | None:
    """The first installed simplifier, in preference order."""
    return next((name for name in TOOLS if importlib.util.find_spec(name) is not None), None)


def simplify_graph(proto: onnx.ModelProto, tool: str | None = None) -> SimplifiedGraph:
    """A simplified copy of ``proto`` (the input is not modified)."""
    tool = tool or available_tool()
    if tool is None:
        raise UserError("--simplify needs onnxslim or onnxsim: pip install onnxslim")
    if tool not in TOOLS:
        raise UserError(f"unknown simplifier {tool!r}: choose {', '.join(TOOLS)}")
    source = onnx.ModelProto()
    source.CopyFrom(proto)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        simplified = TOOLS[tool](source)
    seconds = time.perf_counter() - start
    del simplified.metadata_props[:]
    simplified.metadata_props.extend(proto.metadata_props)
    simplified.producer_name, simplified.producer_version = proto.producer_name, proto.producer_version
    return SimplifiedGraph(simplified, tool, len(proto.graph.node), len(simplified.graph.node), seconds)
