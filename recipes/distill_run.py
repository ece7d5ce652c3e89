"""`kdcompress distill` as a library call: its flags become the one request, the one planner plans it,
the one runner trains it; the student is saved and summarised.

``kdcompress distill`` names its student (no search) and says how it learns with its own words:
``--scheme`` (offline, dgkd, modreduce, cohort, osakd, tcn), ``--chain`` (teacher assistants,
TAKD) and ``--dgkd``; :func:`distill_request` turns them into the planner's recipe, here, once.
Its method defaults to the scheme's (``hinton``), not the main command's ``hinton+crd``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from compressor.atomic import copy_file
from compressor.errors import UserError
from compressor.lock import check_free, file_lock, hold
from recipes.api import plan_with
from recipes.context import inputs_for, same_corruption
from recipes.plan import Plan
from recipes.request import DISTILL_SCHEMES, PlanRequest, csv
from recipes.runner import RunResult, run_plan
from recipes.training import check_batch_size

_ONLINE = ("cohort", "osakd")


def run_dir_for(output: str | Path) -> Path:
    return Path(str(output) + ".run")


def distill_request(*, teacher: str | None = None, student: str | None = None, scheme: str | None = None,
                    chain: str | Sequence[str] | None = None, dgkd: bool = False,
                    options: Mapping[str, Any] | None = None, preset: str | None = None, **values: Any) -> PlanRequest:
    """Distill's flags -> the request: the scheme, chain and DGKD flags become the planner's recipe."""
    if not student and not preset:
        raise UserError("give the student architecture with --student (or a --preset that names one)")
    options = dict(options or {})
    chain = csv(chain) if chain else None
    recipe = None
    if not preset:
        recipe = _recipe(scheme, chain, dgkd, teacher, options)
    return PlanRequest.from_user(teacher=teacher, student=student, recipe=recipe, chain=chain, options=options,
                                 preset=preset, **values)


def _recipe(scheme: str | None, chain: tuple[str, ...] | None, dgkd: bool, teacher: str | None,
            options: Mapping[str, Any]) -> str:
    if scheme is not None and scheme not in DISTILL_SCHEMES:
        raise UserError(f"unknown scheme {scheme!r}; known: {', '.join(DISTILL_SCHEMES)}")
    scheme = scheme or ("offline" if teacher else ("cohort" if options.get("cohort") else None))
    if scheme is None:
        raise UserError("without --teacher, choose an online scheme: --cohort N (or --scheme cohort) or --scheme osakd")
    if teacher is None and scheme not in _ONLINE:
        raise UserError(f"scheme {scheme!r} distils from a teacher: give --teacher T.pt")
    if teacher is not None and scheme in _ONLINE:
        raise UserError(f"scheme {scheme!r} trains without a teacher: drop --teacher")
    if dgkd or scheme == "dgkd":
        return "dgkd"
    if chain is not None:
        if scheme != "offline":
            raise UserError(f"--chain lays out offline (or --dgkd) stages, not the {scheme} scheme: drop one")
        return "takd"
    return "single" if scheme == "offline" else scheme


def distill(
    *,
    output: str | Path,
    device: str = "auto",
    resume: bool = False,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
    **flags: Any,
) -> list[str]:
    """Run one distillation and return the summary lines the CLI prints. ``flags`` are distill's
    (:func:`distill_request`: teacher, student, scheme, chain, dgkd, options, preset) and any
    request field (data, method, seed, corruption, train={"epochs": ...}, ...). ``corruption``
    (None: clean, or what a --preset plan records) corrupts the training labels; the plan in
    OUTPUT.run records it. ``warn`` (default ``echo``) gets the one-line warnings about the teacher
    and the data."""
    request = distill_request(**flags)
    output = Path(output)
    run_dir = run_dir_for(output)
    lock = file_lock(output)
    check_free(lock, output)  # before the data is read; taken for real once there is a plan

    def check_run_dir() -> None:
        if run_dir.exists() and any(run_dir.iterdir()) and not resume:
            raise UserError(f"{run_dir} holds an earlier run: pass --resume to continue it, or remove it")

    check_run_dir()
    if resume and (run_dir / "plan.yaml").is_file():
        recorded = Plan.load(run_dir / "plan.yaml").data_corruption
        request = replace(request, corruption=same_corruption(recorded, request.corruption, f"the run in {run_dir}"))
    inputs = inputs_for(request, load_data=True)
    for note in inputs.notes:
        (warn or echo)(note)
    check_batch_size(request.train.batch_size, inputs.source)
    plan = plan_with(replace(request, corruption=inputs.corruption), inputs)
    with hold(lock, output):
        check_run_dir()  # another run may have written it meanwhile
        run_dir.mkdir(parents=True, exist_ok=True)
        plan.save(run_dir / "plan.yaml")
        result = run_plan(plan, inputs.source, run_dir, teacher=inputs.teacher, resume=resume, device=device,
                          echo=echo)
        copy_file(result.stages[-1].checkpoint, output)
    lines = []
    if inputs.teacher is not None:
        lines.append(f"teacher {inputs.teacher.meta.arch}: test top-1 {inputs.teacher_top1():.2f}%")
    lines += _stage_lines(result)
    lines.append(f"wrote {output} (stages in {run_dir})")
    return lines


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
