"""Train one model on its labels (a teacher, or a baseline student) and score a checkpoint.

The Python calls behind ``kdcompress train`` and ``kdcompress eval``. Training settings start from
the dataset's protocol (:mod:`recipes.protocols`) and any override given wins.

Files written by ``train_vanilla(output=X.pt)``:
  * ``X.pt``       the deployable model in the kdcompress checkpoint format, with the weights of
                   the best epoch on the VALIDATION split; a teacher for every later command;
  * ``X.pt.state`` the training state after the last finished epoch (for ``resume=True``);
  * ``X.pt.jsonl`` one JSON line of metrics per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from compressor.atomic import check_writable
from compressor.checkpoint import LoadedModel, ModelMeta, load_model, save_model
from compressor.data.corruptions import Corruption
from compressor.errors import UserError
from compressor.lock import file_lock, hold
from compressor.threads import threads_for
from compressor.trainer import EvalResult, TrainConfig, TrainResult, default_state_path, evaluate, fit, session
from compressor.trainer.evaluate import Renormalize, check_fits, class_names_warning
from compressor.trainer.seeding import seed_everything
from recipes.protocols import default_train


def log_path_for(output: str | Path) -> Path:
    return Path(str(output) + ".jsonl")


def train_config(data: str, arch: str, **overrides: Any) -> TrainConfig:
    """The dataset protocol's settings for ``arch``, with the non-None ``overrides`` on top."""
    from compressor.models import model_family

    return TrainConfig.from_dict(default_train(data, arch, family=model_family(arch), **overrides))


def train_vanilla(
    arch: str,
    data: str,
    output: str | Path,
    *,
    val_fraction: float = 0.1,
    resume: bool = False,
    echo: Callable[[str], None] | None = None,
    corruption: Corruption | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train ``arch`` on ``data`` with cross-entropy and write ``output`` (on rank 0 under torchrun).

    ``corruption`` (default clean) corrupts the training labels, seeded by the run's seed; the
    checkpoint records it (``extra['data']['options']``), so its students can match it."""
    from compressor.data import load_source
    from compressor.models import create
    from compressor.schemes import Vanilla

    output = Path(output)
    if output.exists() and output.is_dir():
        raise UserError(f"output {output} is a directory: give a file name such as {output / (arch + '.pt')}")
    config = train_config(data, arch, **overrides)
    check_writable(output)  # a read-only or full folder is refused before an epoch is spent
    with session(config.device) as ctx:
        seed_everything(config.seed)
        source = load_source(data, val_fraction=val_fraction, seed=config.seed, **(corruption or Corruption()).to_dict())
        check_batch_size(overrides.get("batch_size"), source)
        model = create(arch, num_classes=source.num_classes, in_chans=source.input_shape[0])
        with hold(file_lock(output), output):  # one run per output file (its .state and .jsonl too)
            result = fit(Vanilla(model, label_smoothing=config.label_smoothing), source, config,
                         state_path=default_state_path(output), log_path=log_path_for(output), resume=resume,
                         echo=echo, ctx=ctx)
            if ctx.is_main:
                meta = ModelMeta.from_source(arch, source)
                save_model(output, result.deployable, meta, metrics=result.metrics(),
                           extra={"train": config.to_dict(), "data": source.describe(), "history": result.history,
                                  "world_size": ctx.world_size})
        ctx.barrier()
    return result


def check_batch_size(batch_size: int | None, source: Any) -> None:
    """A batch asked for (``--batch-size``) larger than the training split would train on one short
    batch per epoch without saying so: refuse it before anything is written."""
    available = source.split_size("train")
    if batch_size is not None and batch_size > available:
        raise UserError(f"batch size {batch_size} is larger than the training set ({available} images after the "
                        f"validation hold-out): give --batch-size {available} or less")


@dataclass
class CheckpointScore:
    loaded: LoadedModel
    data: str
    split: str
    result: EvalResult
    class_names: list[str]
    renormalized: bool
    warnings: list[str] = field(default_factory=list)  # one line each: it could be scored, but look twice


def evaluate_checkpoint(
    path: str | Path,
    data: str | None = None,
    *,
    split: str = "test",
    batch_size: int = 256,
    device: str = "auto",
    arch: str | None = None,
    trust: bool = False,
    seed: int | None = None,
) -> CheckpointScore:
    """Accuracy of a checkpoint on a split; a UserError when it cannot fit the data."""
    from compressor.data import load_source
    from compressor.trainer.distributed import resolve_device

    loaded = load_model(path, arch=arch, trust=trust)
    meta = loaded.meta
    spec = data or meta.dataset
    if spec is None:
        raise UserError(f"{path} does not record its dataset ({loaded.source_format} file): give --data")
    if seed is None:
        seed = int(loaded.metrics.get("seed", 0) or 0)  # the val split is seeded like the training run
    source = load_source(spec, seed=seed)
    check_fits(str(path), meta.num_classes, meta.input_shape, meta.in_chans, spec, source.num_classes,
               source.input_shape, advice="evaluate it on the data it was trained for (--data)")
    warning = class_names_warning(str(path), meta.class_names, spec, source.class_names)
    model = loaded.model
    renorm = (meta.mean is not None and meta.std is not None
              and (tuple(meta.mean) != tuple(source.mean) or tuple(meta.std) != tuple(source.std)))
    if renorm:
        model = Renormalize(model, source.mean, source.std, meta.mean, meta.std)
    dev = resolve_device(device)
    model.to(dev)
    source.to(dev)
    batches = source.loader(split, batch_size, shuffle=False, augment=False)
    with threads_for(model, tuple(source.input_shape), batch_size, device_type=dev.type):
        result = evaluate(model, batches, source.num_classes)
    return CheckpointScore(loaded, spec, split, result, list(source.class_names), renorm, [warning] if warning else [])
