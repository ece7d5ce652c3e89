"""What an export target is: its conversion, its parity check in its own runtime, its metadata and
its latency runner. One subclass per target, in one file of this package, registered with
``@register_target`` (``export/targets/__init__.py``).

Every target keeps nothing unverified, as the ONNX export does: the converted files are written to
a private staging folder, loaded back in the target's own runtime, run on the same inputs as
PyTorch and held to the same rule (largest absolute logit difference within ``atol``, the top-1
class equal on every input); only then is each file copied onto its destination through a
temporary name and a rename (:func:`export.io.atomic_output`), the main file last. A failure
leaves the destinations as they were.

The heavy converters and runtimes (ExecuTorch, OpenVINO, LiteRT) are optional extras: a target
names the modules its extra installs, and :meth:`Target.require` turns their absence into one line
naming the pip command. They are imported only inside the methods that use them.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn as nn

from compressor.errors import UserError
from export.io import atomic_output
from export.metadata import ExportMetadata
from export.onnx_export import Log
from export.parity import ParityError, ParityResult, compare_logits, torch_logits

Predict = Callable[[np.ndarray], np.ndarray]
METADATA_KEY = "kdcompress_metadata"  # where a non-ONNX file keeps ExportMetadata.to_props(), as JSON


class MissingExtra(UserError):
    """A target's converter or runtime is not installed."""


@dataclass
class ConvertJob:
    """What every target converts and checks against: one model, one set of inputs, one tolerance."""

    model: nn.Module  # on the CPU, in eval mode
    inputs: torch.Tensor  # the parity inputs (normalised images), on the CPU
    inputs_from_data: bool
    metadata: ExportMetadata  # input shape, normalisation, classes, FLOPs: filled by the caller
    atol: float
    onnx_path: Path | None = None  # the verified ONNX file, for targets that convert from it
    opset: int = 18
    exporter: str = "auto"
    simplify: bool = False
    log: Log | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.inputs.shape[1:])


@dataclass
class TargetResult:
    """One kept, verified file (or set of files) of one target."""

    target: str
    title: str
    path: str
    files: list[str]
    bytes: int  # all files together
    parity: ParityResult
    metadata: ExportMetadata
    converter: str
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)  # target-specific lines under the parity line
    lines: list[str] = field(default_factory=list)  # the whole summary, where the target writes its own

    def summary_lines(self) -> list[str]:
        if self.lines:
            return list(self.lines)
        others = [Path(f).name for f in self.files if f != self.path]
        return [f"exported {self.path} ({self.bytes / 1e6:.2f} MB, {self.title}, {self.converter}"
                + (f"; with {', '.join(others)}" if others else "") + ")",
                f"  {self.parity.summary()}"] + [f"  {line}" for line in self.findings]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "path": self.path, "files": list(self.files), "bytes": self.bytes,
                "converter": self.converter, "seconds": round(self.seconds, 3), "parity": self.parity.to_dict(),
                "metadata": self.metadata.to_dict(), **self.details}


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Target:
    """Base class: subclasses set the class attributes and implement convert, load and read_metadata."""

    name: ClassVar[str]
    title: ClassVar[str]  # e.g. "ExecuTorch .pte, XNNPACK"
    suffix: ClassVar[str]  # of the main file
    runtime: ClassVar[str]  # the back end's name in latency tables
    extra: ClassVar[str | None] = None  # the setup.cfg extra that installs the converter and runtime
    modules: ClassVar[tuple[str, ...]] = ()  # top-level modules that extra provides
    packages: ClassVar[tuple[str, ...]] = ()  # their pip names, for versions and messages
    from_onnx: ClassVar[bool] = False  # converts the verified ONNX file (else the PyTorch model)
    batch: ClassVar[int | None] = None  # the file's fixed batch size; None: any batch
    rank: ClassVar[int] = 1  # listing order (ONNX, which others convert from, is 0)

    # --- availability -------------------------------------------------------------------------

    def missing(self) -> list[str]:
        """The modules of this target's extra that cannot be imported here."""
        return [m for m in self.modules if importlib.util.find_spec(m) is None]

    def require(self) -> None:
        """One line naming the pip command when the target's extra is not installed."""
        missing = self.missing()
        if missing:
            raise MissingExtra(f"export target {self.name} needs {' and '.join(self.packages or missing)}, "
                               f"not installed here: pip install 'kdcompress[{self.extra}]'")

    def converter(self) -> str:
        return ", ".join(f"{p} {package_version(p)}" for p in self.packages) or self.name

    # --- what a subclass provides ---------------------------------------------------------------

    def paths(self, main: Path) -> list[Path]:
        """Every file the target writes for the main file ``main`` (main first)."""
        return [main]

    def convert(self, job: ConvertJob, main: Path) -> dict[str, Any]:
        """Write :meth:`paths` (``main`` and its companions) with the metadata inside; return details."""
        raise NotImplementedError

    def load(self, path: Path, threads: int | None = None) -> Predict:
        """The file in its own runtime: float32 NCHW batch -> logits (any batch if ``batch`` is None)."""
        raise NotImplementedError

    def read_metadata(self, path: Path) -> ExportMetadata:
        """The ExportMetadata the file carries, read back through the target's own tools."""
        raise NotImplementedError

    def provider(self) -> str:
        """What runs the file in :meth:`load` (a kernel library or device), for parity and latency rows."""
        return "CPU"

    def describe(self, details: dict[str, Any]) -> list[str]:
        """Lines worth printing about what :meth:`convert` found (e.g. mobile usability); none by default."""
        return []

    # --- shared behaviour ----------------------------------------------------------------------

    def metadata_for(self, job: ConvertJob) -> ExportMetadata:
        """The job's metadata (the ONNX file's, for a target converted from it) plus what this file is."""
        from export.metadata import read_metadata

        meta = read_metadata(job.onnx_path) if self.from_onnx and job.onnx_path else copy.deepcopy(job.metadata)
        meta.extra.update({"target": self.name, "converter": self.converter()})
        if self.batch is not None:
            meta.extra["batch"] = self.batch
        return meta

    def parity(self, path: Path, job: ConvertJob, *, raise_on_failure: bool = True) -> ParityResult:
        """The file in its runtime against PyTorch on the job's inputs (a fixed-batch file one batch at a
        time), at PyTorch's thread count, which the caller's thread policy set (compressor/threads.py)."""
        predict = self.load(path, torch.get_num_threads())
        x = job.inputs.detach().float().cpu().numpy()
        step = self.batch or len(x)
        candidate = np.concatenate([predict(np.ascontiguousarray(x[i:i + step])) for i in range(0, len(x), step)])
        diff, agree = compare_logits(torch_logits(job.model, job.inputs), candidate)
        result = ParityResult(max_abs_diff=diff, top1_agreement=agree, samples=len(x), atol=job.atol,
                              inputs="data" if job.inputs_from_data else "random",
                              provider=f"{self.runtime} {self.provider()}", checker="not applicable")
        if raise_on_failure and not result.passed:
            raise ParityError(f"{self.name}: {result.summary()}", result)
        return result

    def runner(self, path: Path, *, batch: int = 1, threads: int | None = None,
               input_shape: Sequence[int]) -> tuple[Callable[[], object], str]:
        """(one forward of a fixed seeded batch, what runs it): what latency timing calls."""
        from export.latency import fixed_input

        if self.batch is not None and batch != self.batch:
            raise UserError(f"the {self.name} file takes batches of {self.batch} only, not {batch}")
        predict = self.load(path, threads)
        x = np.ascontiguousarray(fixed_input(input_shape, batch).numpy())
        return (lambda: predict(x)), self.provider()

    def export(self, job: ConvertJob, dest: Path) -> TargetResult:
        """Convert into a staging folder, check parity and metadata there, then keep the files."""
        from export.onnx_export import _quiet

        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"kdcompress-{self.name}-") as tmp:
            staged = Path(tmp) / dest.name
            try:
                with _quiet():
                    details = self.convert(job, staged)
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - any converter failure is the model's, said in one line
                raise UserError(f"{self.name} conversion failed: {_first_line(err)}") from err
            parity = self.parity(staged, job)
            metadata = self.read_metadata(staged)
            for src, dst in reversed(list(zip(self.paths(staged), self.paths(dest)))):  # the main file last
                with atomic_output(dst) as out:
                    shutil.copyfile(src, out)
        files = [str(p) for p in self.paths(dest)]
        return TargetResult(self.name, self.title, str(dest), files, sum(os.path.getsize(f) for f in files), parity,
                            metadata, self.converter(), time.perf_counter() - start, details, self.describe(details))


def metadata_json(meta: ExportMetadata) -> str:
    """ExportMetadata as one JSON object of the same string props an ONNX file carries."""
    return json.dumps(meta.to_props(), sort_keys=True)


def metadata_from_json(text: str | bytes) -> ExportMetadata:
    return ExportMetadata.from_props(json.loads(text))


def _first_line(err: BaseException, limit: int = 300) -> str:
    inner = err
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
    return (text[: limit - 3] + "...") if len(text) > limit else text
