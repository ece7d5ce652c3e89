"""What a deployed ONNX file says about itself, so a mobile app knows how to feed it.

Written into ``ModelProto.metadata_props`` (string key -> string value; every ONNX runtime exposes
them, e.g. ``InferenceSession.get_modelmeta().custom_metadata_map``). Keys are plain words; values
are JSON, so lists and numbers survive the round trip exactly:

    mean, std          per-channel normalisation applied AFTER scaling pixels to [0, 1]
    input_size         [H, W]; in_chans  C; layout "NCHW"
    class_names        list of names in logit order (may be absent)
    input_name, output_name
    arch, num_classes, dataset, source_checkpoint
    flops, params      flops_convention says how FLOPs are counted (fvcore: 1 multiply-add = 1 FLOP)
    exporter, opset    which torch.onnx exporter wrote the graph, and the ONNX opset
    quantization       absent for fp32; "int8 static QDQ per-channel ..." for the quantized file
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import onnx

PRODUCER = "kdcompress"


@dataclass
class ExportMetadata:
    input_name: str = "input"
    output_name: str = "logits"
    in_chans: int | None = None
    input_size: list[int] | None = None  # [H, W]
    mean: list[float] | None = None
    std: list[float] | None = None
    class_names: list[str] | None = None
    num_classes: int | None = None
    arch: str | None = None
    dataset: str | None = None
    source_checkpoint: str | None = None
    flops: int | None = None
    params: int | None = None
    flops_convention: str | None = None
    exporter: str | None = None
    opset: int | None = None
    quantization: str | None = None
    layout: str = "NCHW"
    extra: dict[str, Any] = field(default_factory=dict)  # anything else a caller wants to carry

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != {}}

    def to_props(self) -> dict[str, str]:
        """String props for ``metadata_props``; ``None`` fields are left out."""
        props = {k: json.dumps(v) for k, v in self.to_dict().items() if k != "extra"}
        props.update({k: json.dumps(v) for k, v in self.extra.items()})
        return props

    @classmethod
    def from_props(cls, props: dict[str, str]) -> "ExportMetadata":
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, raw in props.items():
            try:
                value = json.loads(raw)
            except (TypeError, ValueError):
                value = raw  # written by another tool as a plain string
            (kwargs if key in known else extra)[key] = value
        return cls(**kwargs, extra=extra)


def write_metadata(proto: onnx.ModelProto, meta: ExportMetadata) -> onnx.ModelProto:
    """Replace the file's metadata props with ``meta`` (in place; returns ``proto`` for chaining)."""
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta.to_props())
    proto.producer_name = PRODUCER
    from compressor import __version__

    proto.producer_version = __version__
    return proto


def read_metadata(model: str | os.PathLike | onnx.ModelProto) -> ExportMetadata:
    """The metadata of an ONNX file or proto (weights are not loaded for a path)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return ExportMetadata.from_props({p.key: p.value for p in proto.metadata_props})
