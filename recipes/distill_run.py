"""`kdcompress distill` as a library call: plan from flags, run through the runner, save, summarise."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from compressor.atomic import copy_file
from compressor.data.corruptions import Corruption
from compressor.errors import UserError
from compressor.lock import check_free, file_lock, hold
from recipes.context import resolve_inputs, same_corruption
from recipes.distill_plan import DistillRequest, distill_plan, load_preset, preset_plan
from recipes.plan import Plan
from recipes.runner import RunResult, run_plan
from recipes.training import check_batch_size


def run_dir_for(output: str | Path) -> Path:
    return Path(str(output) + ".run")


def distill(
    *,
    teacher: str | None,
    student: str | None,
    output: str | Path,
    data: str | None = None,
    teacher_arch: str | None = None,
    method: str | None = None,
    scheme: str | None = None,
    chain: Sequence[str] = (),
    dgkd: bool = False,
    options: dict[str, Any] | None = None,
    preset: str | None = None,
    train: dict[str, Any] | None = None,
    seed: int = 0,
    device: str = "auto",
    resume: bool = False,
    trust: bool = False,
    corruption: Corruption | None = None,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
) -> list[str]:
    """Run one distillation and return the summary lines the CLI prints. ``corruption`` (None: clean,
    or what a --preset plan records) corrupts the training labels; the plan in OUTPUT.run records it.
    ``warn`` (default ``echo``) gets the one-line warnings about the teacher and the data."""
    if not student and not preset:
        raise UserError("give the student architecture with --student (or a --preset that names one)")
    output = Path(output)
    run_dir = run_dir_for(output)
    lock = file_lock(output)
    check_free(lock, output)  # before the data is read; taken for real once there is a plan

    def check_run_dir() -> None:
        if run_dir.exists() and any(run_dir.iterdir()) and not resume:
            raise UserError(f"{run_dir} holds an earlier run: pass --resume to continue it, or remove it")

    check_run_dir()
    overrides = {k: v for k, v in (train or {}).items() if v is not None}
    if preset:
        raw = load_preset(preset)
        teacher = teacher or raw.get("teacher")  # a saved plan names its teacher
        corruption = corruption or Corruption.from_dict(raw.get("corruption"))  # and its corruptions
    if resume and (run_dir / "plan.yaml").is_file():
        corruption = same_corruption(Plan.load(run_dir / "plan.yaml").data_corruption, corruption, f"the run in {run_dir}")
    inputs = resolve_inputs(teacher, data, arch=teacher_arch, trust=trust, load_data=True, seed=seed,
                            corruption=corruption)
    for note in inputs.notes:
        (warn or echo)(note)
    check_batch_size(overrides.get("batch_size"), inputs.source)
    if preset:
        plan = preset_plan(preset, teacher=teacher, data=inputs.data_spec, teacher_arch=teacher_arch, method=method,
                           seed=seed, train=overrides, corruption=inputs.corruption)
    else:
        plan = distill_plan(DistillRequest(
            data=inputs.data_spec, student=student, num_classes=inputs.num_classes, input_shape=inputs.input_shape,
            teacher=teacher, teacher_arch=inputs.teacher.meta.arch if inputs.teacher else None,
            # only a chain's sizes are checked against the teacher's FLOPs: no fvcore pass otherwise
            teacher_flops=inputs.teacher_cost.flops if inputs.teacher is not None and chain else None,
            scheme=scheme, method=method,
            chain=chain, dgkd=dgkd, seed=seed, options=dict(options or {}), train=overrides,
        ))
        plan.corruption = inputs.corruption.to_dict()
    with hold(lock, output):
        check_run_dir()  # another run may have written it meanwhile
        run_dir.mkdir(parents=True, exist_ok=True)
        plan.save(run_dir / "plan.yaml")
        result = run_plan(plan, inputs.source, run_dir, teacher=inputs.teacher, resume=resume, device=device,
                          echo=echo)
        copy_file(result.stages[-1].checkpoint, output)
    lines = []
    if inputs.teacher is not None:
        lines.append(f"teacher {inputs.teacher.meta.arch}: test top-1 {teacher_accuracy(inputs):.2f}%")
    lines += _stage_lines(result)
    lines.append(f"wrote {output} (stages in {run_dir})")
    return lines


def teacher_accuracy(inputs) -> float:
    from compressor.trainer import evaluate

    source = inputs.source
    batches = source.loader("test", 256, shuffle=False, augment=False)
    return evaluate(inputs.teacher.model, batches, source.num_classes).top1


def _stage_lines(result: RunResult) -> list[str]:
    lines = []
    for stage in result.stages:
        m = stage.metrics
        test = m.get("test_top1")
        val = m.get("val_top1")
        text = f"{stage.name} {stage.arch} ({stage.scheme}): test top-1 {test:.2f}%" if test is not None else \
            f"{stage.name} {stage.arch} ({stage.scheme})"
        if val is not None:
            text += f", val top-1 {val:.2f}% at epoch {m.get('best_epoch')}"
        lines.append(text)
    return lines
