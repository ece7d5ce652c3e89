"""Model checkpoints: our own format, plus the foreign ones users already have.

Our file is a plain dict readable with ``torch.load(weights_only=True)``: the architecture and
its kwargs, classes, input shape, normalisation, dataset, ``state_dict``, metrics and the plan
that made it, so any later command can rebuild the model and check it against data.

Foreign files are read, never required: RepDistiller/mdistiller ``{'model': state_dict, ...}``
(arch from ``arch=`` or from their folder naming, e.g. ``resnet110_vanilla/ckpt_epoch_240.pth``)
and a bare ``state_dict`` with ``arch=``. A whole pickled module runs code when unpickled, so it
is refused unless the caller passes ``trust=True`` (``--trust-checkpoint`` on the CLI).
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compressor.atomic import atomic_output
from compressor.errors import UserError

FORMAT = "kdcompress"
FORMAT_VERSION = 1
TRUST_FLAG = "--trust-checkpoint"


@dataclass
class ModelMeta:
    """Everything needed to rebuild a model and feed it correctly."""

    arch: str
    num_classes: int
    in_chans: int = 3
    input_size: tuple[int, int] | None = None  # (H, W) the model was trained at
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dataset: str | None = None  # the data spec it was trained on, e.g. "digits"
    class_names: list[str] | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    # a structurally pruned zoo model: the history that rebuilds it from a fresh ``arch`` (compressor.pruning);
    # plain lists and numbers, so the file stays readable with weights_only=True
    pruning: dict[str, Any] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        return None if self.input_size is None else (self.in_chans, *self.input_size)

    @classmethod
    def from_source(cls, arch: str, source: Any, **arch_kwargs: Any) -> "ModelMeta":
        """Meta for a model trained on a ``compressor.data`` source."""
        c, h, w = source.input_shape
        return cls(
            arch=arch,
            num_classes=source.num_classes,
            in_chans=c,
            input_size=(h, w),
            mean=tuple(float(m) for m in source.mean),
            std=tuple(float(s) for s in source.std),
            dataset=source.spec,
            class_names=list(source.class_names),
            arch_kwargs=dict(arch_kwargs),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("input_size", "mean", "std"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelMeta":
        return cls(
            arch=d["arch"],
            num_classes=int(d["num_classes"]),
            in_chans=int(d.get("in_chans", 3)),
            input_size=tuple(d["input_size"]) if d.get("input_size") is not None else None,
            mean=tuple(d["mean"]) if d.get("mean") is not None else None,
            std=tuple(d["std"]) if d.get("std") is not None else None,
            dataset=d.get("dataset"),
            class_names=list(d["class_names"]) if d.get("class_names") is not None else None,
            arch_kwargs=dict(d.get("arch_kwargs") or {}),
            pruning=dict(d["pruning"]) if d.get("pruning") is not None else None,
        )


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on the CPU
    meta: ModelMeta
    metrics: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source_format: str = FORMAT  # "kdcompress" | "repdistiller" | "state_dict" | "module"
    path: str | None = None


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    meta: ModelMeta,
    metrics: dict[str, Any] | None = None,
    plan: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write our format atomically (temporary file in the same folder, then rename).

    The records beside the weights are written in a canonical form, so the same content always
    gives the same bytes: pickle writes a string once per object, so a plan the planner built
    (its strings shared) and the same plan read back from plan.yaml by a resumed run (one string
    per occurrence) would give different files for identical checkpoints."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": _canonical(meta.to_dict()),
        "state_dict": state,
        "metrics": _canonical(dict(metrics or {})),
        "plan": _canonical(plan),
        "extra": _canonical(dict(extra or {})),
    }
    atomic_torch_save(payload, path)


def _canonical(value: Any) -> Any:
    """A copy of a record (dicts, lists, tuples, strings, numbers; tensors kept as they are) that
    shares every equal string and nothing else: its pickle depends on its content only."""
    if isinstance(value, dict):
        return {_canonical(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_canonical(v) for v in value)
    if type(value) is str:
        return sys.intern(value)
    return value


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary name beside ``path``, then rename: never a half file."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())


def read_checkpoint_dict(path: str | os.PathLike, trust: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True``; the refusals become one-line UserErrors."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory, not a file")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes)")
    check_zip_integrity(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        imported = _unsafe_global(text) or _pickle_imports(path)
        if imported is None:
            detail = (text.split("error:")[-1].strip().splitlines() or ["unreadable"])[0]
            raise UserError(f"{path} is not a PyTorch checkpoint ({_short(detail)})") from None
        if not trust:
            raise UserError(
                f"{path} holds pickled Python objects{imported}, which run code when loaded; "
                f"load it only if you trust its source, with {TRUST_FLAG}"
            ) from None
        return _load_trusted(path)
    except Exception as err:  # noqa: BLE001 - weights_only runs no code: any other failure is an unreadable file
        raise UserError(f"{path} is not a PyTorch checkpoint or is truncated "
                        f"({type(err).__name__}: {_short(str(err))})") from None


def check_zip_integrity(path: str | os.PathLike) -> None:
    """A zip checkpoint (torch >= 1.6) whose stored CRCs fail is refused: torch.load reads the
    damaged bytes as weights without a word (a flipped 4 KiB gave 9.75% and loss nan in eval)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise UserError(f"{path} is a damaged or truncated checkpoint ({_short(str(err))})") from None
    if bad is not None:
        raise UserError(f"{path} is damaged: its entry {bad} fails the zip CRC check (a copy error or a bad "
                        "disk); use an intact copy")


def _check_finite(state: dict, path: str) -> None:
    """Weights that are NaN or infinite come from a run that diverged or a damaged file: refuse them."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"the weights in {path} are not finite (NaN or inf in {_few(bad)}): the run that wrote it "
                        "diverged or the file is damaged")


def _pickle_imports(path: Path) -> str | None:
    """Without executing anything: ' (module.name, ...)' if the file's pickle imports globals, else None.

    torch's weights-only unpickler says "Unsupported operand" both for garbage and for plain
    pickles it cannot read; ``pickletools`` tells them apart by parsing the opcodes only.
    """
    import io
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                data = zf.read(name)
        else:
            data = path.read_bytes()
        names: list[str] = []
        strings: list[str] = []
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                names.append(".".join(strings[-2:]))
            elif op.name in ("INST", "OBJ", "REDUCE", "NEWOBJ") and not names:
                names.append(op.name)
    except Exception:  # noqa: BLE001 - any parse failure means "not a pickle"
        return None
    allowed = ("collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage")
    # a real import is a dotted Python name; bytes that merely happen to parse are garbage
    dotted = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+")
    risky = [n for n in names if n not in allowed and (n in ("INST", "OBJ", "REDUCE", "NEWOBJ") or dotted.fullmatch(n))]
    return f" ({', '.join(sorted(set(risky))[:3])})" if risky else None


def _load_trusted(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a trusted file can still be broken or need missing classes
        raise UserError(f"{path} could not be unpickled even with {TRUST_FLAG} ({_short(str(err))})") from None


def _unsafe_global(text: str) -> str | None:
    for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
        if marker in text:
            name = text.split(marker, 1)[1].split()[0].rstrip(".,:")
            return f" ({name})"
    return None


def _short(text: str, limit: int = 160) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def load_model(
    path: str | os.PathLike,
    arch: str | None = None,
    num_classes: int | None = None,
    trust: bool = False,
) -> LoadedModel:
    """Rebuild a model from any supported file; every way it can fail is a UserError."""
    obj = read_checkpoint_dict(path, trust=trust)
    path_str = str(path)
    if isinstance(obj, nn.Module):
        return _from_module(obj, path_str, num_classes)
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a model checkpoint")
    if obj.get("format") == FORMAT:
        return _from_ours(obj, path_str, arch, num_classes)
    if "model" in obj and isinstance(obj["model"], nn.Module):
        return _from_module(obj["model"], path_str, num_classes)
    for key in ("model", "state_dict", "net"):
        if key in obj and _is_state_dict(obj[key]):
            metrics = {k: _plain(v) for k, v in obj.items() if k in ("epoch", "best_acc", "accuracy")}
            return _from_state_dict(obj[key], path_str, arch, num_classes, "repdistiller", metrics)
    if _is_state_dict(obj):
        return _from_state_dict(obj, path_str, arch, num_classes, "state_dict", {})
    raise UserError(
        f"{path} is a dict with keys {sorted(map(str, obj))[:6]} but holds no state_dict "
        "(expected a kdcompress file, {'model': state_dict} or a bare state_dict)"
    )


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def _from_ours(obj: dict, path: str, arch: str | None, num_classes: int | None) -> LoadedModel:
    try:
        meta = ModelMeta.from_dict(obj["meta"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{path} is a kdcompress checkpoint whose 'meta' record is missing or incomplete "
                        f"({type(err).__name__}: {_short(str(err))}); the file is damaged or was edited") from None
    if not _is_state_dict(obj.get("state_dict")):
        raise UserError(f"{path} is a kdcompress checkpoint without its weights ('state_dict'); the file is damaged")
    if not (isinstance(meta.arch, str) and meta.arch and meta.num_classes >= 1 and meta.in_chans >= 1
            and isinstance(meta.arch_kwargs, dict)):
        raise UserError(f"{path} is a kdcompress checkpoint whose 'meta' record is not valid (arch "
                        f"{_short(repr(meta.arch), 40)}, {meta.num_classes} classes, {meta.in_chans} input channels, "
                        f"arch_kwargs {_short(repr(meta.arch_kwargs), 40)}); the file is damaged or was edited")
    if arch is not None and arch != meta.arch:
        raise UserError(f"{path} holds a {meta.arch}, not a {arch}; drop --arch or pick the right file")
    _check_classes(path, meta.num_classes, num_classes)
    _check_meta_size(meta, obj["state_dict"], path)
    model = _build(meta.arch, meta.num_classes, meta.in_chans, meta.arch_kwargs)
    described = meta.arch
    if meta.pruning is not None:
        from compressor.pruning import replay

        replay(model, meta.pruning, path)
        described = f"{meta.arch} pruned by its recorded history"
    _load_weights(model, obj["state_dict"], path, described)
    return LoadedModel(model.eval(), meta, dict(obj.get("metrics") or {}), obj.get("plan"),
                       dict(obj.get("extra") or {}), FORMAT, path)


class _NoMetaNormal(torch.overrides.TorchFunctionMode):
    """Skips drawing normal values into meta tensors (they hold no values).

    ``Tensor.normal_``'s meta kernel is a Python decomposition whose first call imports
    ``torch._dynamo``: about 1 s of CPU (3 s on a loaded machine) at the start of every command
    that loads a checkpoint, only to size a model (kaiming_normal_ initialises most convs). The
    ``nn.init`` functions are caught too: they may reach ``normal_`` with this mode already set aside."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _NORMAL_INITS:
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor by name
            if getattr(target, "is_meta", False):
                return target
        return func(*args, **kwargs)


_NORMAL_INITS = (torch.Tensor.normal_, nn.init.normal_, nn.init.kaiming_normal_, nn.init.xavier_normal_)


def _check_meta_size(meta: ModelMeta, state: dict, path: str) -> None:
    """Refuse a meta record that describes a model far larger than the weights the file holds.

    The model is built from ``meta`` before the weights are compared with it, so a meta that lies
    (``num_classes: 10000000000``) would allocate terabytes first. Built on the ``meta`` device,
    where tensors have shapes but no memory, its size is known for free. Only a model much larger
    than the weights is refused here; any other mismatch is left to the weight check, which names
    the layers that differ."""
    try:
        with torch.device("meta"), _NoMetaNormal():
            probe = _build(meta.arch, meta.num_classes, meta.in_chans, meta.arch_kwargs)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - an architecture that cannot be built on the meta device: no guard
        return
    described = sum(t.numel() for t in probe.state_dict().values())
    held = sum(int(t.numel()) for t in state.values())
    if described > 4 * held + 1_000_000:
        raise UserError(f"{path}: its meta record describes a {meta.arch} of {described:,} weight values "
                        f"({meta.num_classes} classes, {meta.in_chans} input channels) but the file holds "
                        f"{held:,}; the file is damaged or was edited")


def _from_state_dict(
    state: dict, path: str, arch: str | None, num_classes: int | None, fmt: str, metrics: dict
) -> LoadedModel:
    state = _strip_prefix(state, "module.")
    arch = arch or arch_from_path(path)
    if arch is None:
        raise UserError(
            f"{path} holds bare weights without an architecture name; give it with --arch "
            "(see `kdcompress zoo`)"
        )
    found_classes, in_chans = _shape_from_state(arch, state)
    _check_classes(path, found_classes, num_classes)
    model = _build(arch, found_classes, in_chans, {})
    _load_weights(model, state, path, arch)
    meta = ModelMeta(arch=arch, num_classes=found_classes, in_chans=in_chans)
    return LoadedModel(model.eval(), meta, metrics, None, {}, fmt, path)


def _from_module(module: nn.Module, path: str, num_classes: int | None) -> LoadedModel:
    arch = getattr(module, "kd_arch", None) or f"module:{type(module).__name__}"
    found = _classes_of(module)
    if found is not None:
        _check_classes(path, found, num_classes)
    _check_finite(module.state_dict(), path)
    first = next((p for p in module.parameters() if p.dim() == 4), None)
    meta = ModelMeta(arch=arch, num_classes=found or num_classes or 0,
                     in_chans=int(first.shape[1]) if first is not None else 3)
    return LoadedModel(module.cpu().eval(), meta, {}, None, {}, "module", path)


def _strip_prefix(state: dict, prefix: str) -> dict:
    if all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def arch_from_path(path: str) -> str | None:
    """RepDistiller/mdistiller name folders and files after the model: take the longest known prefix.

    ``save/models/resnet110_vanilla/ckpt_epoch_240.pth`` -> resnet110;
    ``wrn_40_2_cifar100_lr_0.05/wrn_40_2_best.pth`` -> wrn_40_2.
    """
    from compressor.models import list_models

    known = set(list_models())
    p = Path(path)
    for text in (p.stem, p.parent.name):
        parts = text.split("_")
        for n in range(len(parts), 0, -1):
            candidate = "_".join(parts[:n])
            if candidate in known:
                return candidate
    return None


def _build(arch: str, num_classes: int, in_chans: int, kwargs: dict) -> nn.Module:
    from compressor.models import create

    try:
        return create(arch, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as err:  # settings the architecture does not take (a checkpoint's arch_kwargs)
        raise UserError(f"{arch} cannot be built with {_short(repr(kwargs), 80)}: {_short(str(err), 120)}") from None


def _classes_of(model: nn.Module) -> int | None:
    name = getattr(model, "classifier_name", None)
    modules = dict(model.named_modules())
    layer = modules.get(name) if name else None
    if layer is None:
        linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
        layer = linears[-1] if linears else None
    return getattr(layer, "out_features", None)


def _shape_from_state(arch: str, state: dict) -> tuple[int, int]:
    """(num_classes, in_chans) read off the weights: the classifier's rows, the first conv's inputs."""
    probe = _build(arch, 10, 3, {})
    classifier = getattr(probe, "classifier_name", None)
    if classifier is None:
        linears = [n for n, m in probe.named_modules() if isinstance(m, nn.Linear)]
        classifier = linears[-1] if linears else None
    weight = state.get(f"{classifier}.weight") if classifier else None
    if weight is None:
        raise UserError(f"the weights do not fit {arch}: no '{classifier}.weight' classifier entry")
    first_conv = next((n for n, p in probe.named_parameters() if p.dim() == 4), None)
    in_chans = int(state[first_conv].shape[1]) if first_conv in state else 3
    return int(weight.shape[0]), in_chans


def _check_classes(path: str, found: int, wanted: int | None) -> None:
    if wanted is not None and int(wanted) != int(found):
        raise UserError(f"{path} predicts {found} classes but {wanted} were expected")


def _load_weights(model: nn.Module, state: dict, path: str, arch: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if wrong:
            k = wrong[0]
            parts.append(f"wrong shape {k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                         + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""))
        raise UserError(f"the weights in {path} do not fit {arch}: " + "; ".join(parts))
    _check_finite(state, path)
    model.load_state_dict(state)


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
