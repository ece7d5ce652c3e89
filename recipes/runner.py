"""Run a plan: its stages in order, each through the one trainer, each with its own checkpoint.

Layout of a run directory::

    stages/<name>/model.pt    the stage's deployable (our checkpoint format), written when it ends
    stages/<name>/state.pt    the trainer's per-epoch state (exact resume inside a stage)
    stages/<name>/log.jsonl   one line per epoch

With ``resume``, a stage whose ``model.pt`` exists is loaded instead of trained, and the first
unfinished stage continues from its ``state.pt``: a chain resumes at the stage and the epoch
where it stopped. Teachers of a stage are the user's teacher or earlier stages' models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from compressor.checkpoint import LoadedModel, ModelMeta, load_model, save_model
from compressor.errors import UserError
from compressor.features import strip_taps
from compressor.schemes import SchemeRequest, build_scheme
from recipes.journal import enter
from recipes.plan import TEACHER, Plan, Stage

Echo = Callable[[str], None]


@dataclass
class StageResult:
    name: str
    arch: str
    scheme: str
    checkpoint: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_file: bool = False  # finished in an earlier run, loaded, not trained


@dataclass
class RunResult:
    stages: list[StageResult]
    final: LoadedModel  # the last stage's deployable, as saved

    @property
    def metrics(self) -> dict[str, Any]:
        return self.stages[-1].metrics


def stage_dir(run_dir: Path, stage: Stage) -> Path:
    return Path(run_dir) / "stages" / stage.name


def run_plan(
    plan: Plan,
    source: Any,
    run_dir: str | Path,
    *,
    teacher: LoadedModel | None = None,
    resume: bool = False,
    device: str = "auto",
    echo: Echo = print,
    on_stage_end: Callable[[StageResult], None] | None = None,
) -> RunResult:
    """Train every stage of ``plan`` on ``source``; return each stage's figures and the final model.

    ``device`` is where a stage whose settings say ``auto`` trains. ``on_stage_end`` is called with
    each stage's result once its model file is written (or found, on resume): the main command drops
    a run it replaces only then."""
    from compressor.trainer import NotLearning, fit, seed_everything

    plan.validate()
    run_dir = Path(run_dir)
    done: dict[str, LoadedModel] = {}
    results: list[StageResult] = []
    total = len(plan.stages)
    for number, stage in enumerate(plan.stages, 1):
        enter(f"stage:{stage.name}")
        folder = stage_dir(run_dir, stage)
        model_path = folder / "model.pt"
        label = f"stage {number} of {total}: {stage.name} ({stage.arch} via {stage.scheme}"
        label += f" from {', '.join(stage.teachers)})" if stage.teachers else ")"
        if resume and model_path.is_file():
            loaded = load_model(model_path)
            done[stage.name] = loaded
            results.append(StageResult(stage.name, stage.arch, stage.scheme, str(model_path), loaded.metrics,
                                       _logged_history(folder / "log.jsonl"), resumed_from_file=True))
            echo(f"{label}: already trained, loaded {model_path}")
            if on_stage_end is not None:
                on_stage_end(results[-1])
            continue
        echo(label)
        teachers = [_teacher_model(name, teacher, done) for name in stage.teachers]
        config = stage.config if stage.config.device != "auto" else replace(stage.config, device=device)
        seed_everything(config.seed)  # the models' initial weights depend on it, not on the process's past
        start = _pruned_start(stage, teacher)
        request = SchemeRequest(
            student_arch=stage.arch, num_classes=source.num_classes, input_shape=tuple(source.input_shape),
            num_train=source.num_train, teacher=teachers[0] if teachers else None, method=stage.method,
            options=stage.options, teachers=teachers,
            batch_size=config.batch_size // int(os.environ.get("WORLD_SIZE", "1")),
            label_smoothing=config.label_smoothing, student_init=start,
        )
        scheme = build_scheme(stage.scheme, request)
        _check_label_smoothing(stage, scheme, config.label_smoothing)
        try:
            result = fit(scheme, source, config, state_path=folder / "state.pt", log_path=folder / "log.jsonl",
                         resume=resume, echo=echo)
        except NotLearning as err:
            raise StageNotLearning(stage, err, run_dir, [r.name for r in results]) from None
        deployable = strip_taps(result.deployable)  # plain, for the checkpoint and as a later stage's teacher
        meta = ModelMeta.from_source(getattr(deployable, "kd_arch", stage.arch), source,
                                     **getattr(deployable, "kd_arch_kwargs", {}))
        if stage.options.get("prune"):  # a pruned teacher: the checkpoint records the history that rebuilds it
            meta.pruning = dict(stage.options["prune"])
        extra = {"stage": stage.name, "scheme": stage.scheme, "method": stage.method.text if stage.method else None,
                 "teachers": stage.teachers,
                 "data": source.describe(),  # split and corruption options: a later run can match them
                 **getattr(result, "extra", {}), **_accuracy_before(start, source)}
        if result.is_main:
            save_model(model_path, deployable, meta, metrics=result.metrics(), plan=plan.to_dict(), extra=extra)
        loaded = LoadedModel(deployable.cpu().eval(), meta, result.metrics(), plan.to_dict(), extra, "kdcompress",
                             str(model_path))
        done[stage.name] = loaded
        results.append(StageResult(stage.name, stage.arch, stage.scheme, str(model_path), result.metrics(),
                                   result.history))
        if on_stage_end is not None:
            on_stage_end(results[-1])
    return RunResult(results, done[plan.final.name])


class StageNotLearning(UserError):
    """A stage stopped by the trainer's learning guard, said with the stage, its method and what to try.

    Its training state is removed (it holds a dead model: resuming it would stay dead), so a
    ``--resume`` after a fix retrains this stage from its start and keeps the stages that finished.
    """

    def __init__(self, stage: Stage, err: Exception, run_dir: Path, finished: list[str]) -> None:
        state = stage_dir(run_dir, stage) / "state.pt"
        state.unlink(missing_ok=True)
        method = f", method {stage.method.text}" if stage.method else ""
        lr = stage.config.lr
        kept = (f"stage(s) {', '.join(finished)} finished and are kept; " if finished else "")
        super().__init__(
            f"stage {stage.name!r} ({stage.arch} via {stage.scheme}{method}) stopped: {getattr(err, 'reason', err)} "
            f"(epoch {getattr(err, 'epoch', '?')} of {getattr(err, 'epochs', '?')}). Try a lower learning rate "
            f"(now {lr}), a simpler --method (e.g. hinton) or a gradient clip (grad_clip in the plan); "
            f"{kept}resuming the run in {run_dir} after the fix retrains this stage"
        )
        self.stage = stage.name


def _logged_history(log: Path) -> list[dict[str, Any]]:
    """A finished stage's per-epoch records, as its training wrote them: a resumed run reports the
    same curves as an uninterrupted one (the log is rewritten from the training state, never half)."""
    from compressor.trainer.progress import read_jsonl

    try:
        return read_jsonl(log)
    except (OSError, ValueError):  # no log (deleted by hand): the stage is reported without its curves
        return []


def _check_label_smoothing(stage: Stage, scheme: nn.Module, value: float | None) -> None:
    """``train.label_smoothing`` (a trainer setting) goes to the scheme, which owns the cross-entropy;
    a scheme honours it by exposing ``label_smoothing``; asking one that does not is an error."""
    if value and getattr(scheme, "label_smoothing", None) != value:
        raise UserError(f"stage {stage.name!r} asks for label_smoothing={value}, which the {stage.scheme} scheme does "
                        "not apply (vanilla, offline, dgkd and tcn do): remove it")


def _teacher_model(name: str, teacher: LoadedModel | None, done: dict[str, LoadedModel]) -> nn.Module:
    """A fresh, frozen copy for each stage, so no stage can change another's teacher."""
    import copy

    if name == TEACHER:
        if teacher is None:
            raise UserError("the plan's stages learn from a teacher, but none was given (--teacher)")
        model = teacher.model
    else:
        model = done[name].model
    return copy.deepcopy(model).eval()


def _pruned_start(stage: Stage, teacher: LoadedModel | None) -> nn.Module | None:
    """A pruned-teacher stage starts from the teacher's kept weights, its recorded channels removed."""
    record = stage.options.get("prune")
    if not record:
        return None
    if teacher is None:
        raise UserError(f"stage {stage.name!r} prunes the teacher, but no teacher was given")
    from recipes.pruned import student_from_teacher

    return student_from_teacher(teacher.model, record)


def _accuracy_before(model: nn.Module | None, source: Any) -> dict[str, Any]:
    """A pruned teacher's validation accuracy before recovery training: the report shows what it recovered."""
    if model is None or not source.split_size("val"):
        return {}
    import copy
    import itertools

    from compressor.trainer import evaluate

    batches = iter(source.loader("val", 256, shuffle=False, augment=False))
    first = next(batches, None)
    if first is None:
        return {}
    probe = copy.deepcopy(model).to(first.x.device).eval()  # the data may already live on the training device
    top1 = evaluate(probe, itertools.chain([first], batches), source.num_classes).top1
    return {"val_top1_before_recovery": float(top1)}
