"""The product: teacher + budget + data -> a verified, timed, explained student.

    recipes.compress(teacher="resnet110.pt", budget=["2MFLOPs"], data="digits")

walks the whole flow once: plan (student search, recipe) -> stages through the trainer ->
baseline (optional) -> ONNX export with parity (+ int8) -> latency of teacher and student ->
report.json, report.md and plots in the output directory. The CLI's main command is a shell
over this function.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from compressor import __version__
from compressor.atomic import copy_file
from compressor.checkpoint import LoadedModel, load_model
from compressor.cost import FLOP_CONVENTION, measure
from compressor.metrics import kd_gain
from recipes.api import main_request, plan_with
from recipes.budget import Budget, cost_limits
from recipes.context import RunInputs, inputs_for, resolve_inputs, same_corruption
from recipes.journal import RunJournal, enter, file_digest
from recipes.plan import Plan, Stage
from recipes.request import PlanRequest, RunSettings, split_run
from recipes.report import summary_rows, write_report
from recipes.results import BaselineFigures, PruningSummary, Report, StageFigures, StudentFigures, TeacherFigures
from recipes.run_folder import RunFolder
from recipes.runner import RunResult, run_plan

Echo = Callable[[str], None]


@dataclass
class CompressResult:
    out_dir: Path
    plan: Plan
    report: Report
    files: dict[str, str]

    @property
    def summary(self) -> list[tuple[str, str, str]]:
        return summary_rows(self.report)


def default_out_dir(teacher: str | None, budgets: Sequence[str | Budget]) -> Path:
    stem = Path(teacher).stem if teacher else "cohort"
    texts = [b if isinstance(b, str) else b.text for b in budgets]
    slug = re.sub(r"[^A-Za-z0-9.]+", "", "-".join(texts)) or "nobudget"
    return Path("runs") / f"{stem}-{slug}"


def compress(teacher: str | None = None, budget: Sequence[str | Budget] = (), data: str | None = None,
             out: str | Path | None = None, *, echo: Echo = print, **settings: Any) -> CompressResult:
    """The whole flow as one call. ``settings`` are the request's fields as a user gives them
    (:class:`recipes.request.PlanRequest`: teacher_arch, recipe, method, family, candidates, epochs,
    seed, preset, corruption, ...) and the run's (:class:`recipes.request.RunSettings`: int8, baseline,
    int8_margin, keep_int8_anyway, targets, search, probe_k, resume, force, device). ``corruption``
    (None: clean, or what a resumed run or a saved plan records) corrupts the training labels of every
    stage, the baseline's too. ``int8_margin``: top-1 points the int8 file may lose on the validation
    split (None: export.quantize.DEFAULT_MARGIN_POINTS); one that cannot fit is not written unless
    ``keep_int8_anyway`` (report["student"]["int8"]["missed_margin"]). ``targets``: the export targets
    the student is written to (export/targets), each verified in its own runtime."""
    values, run = split_run({"teacher": teacher, "budgets": budget, "data": data, "out": out, **settings})
    out_dir = run.out if run.out is not None else default_out_dir(teacher, budget)
    if run.resume and not RunFolder(out_dir).has_plan() and (budget or values.get("preset")):
        run = replace(run, resume=False)  # killed while planning: nothing was recorded, so the command starts again
        echo(f"{out_dir} holds no plan yet (the run stopped while planning): starting it")
    # a bad budget or method fails here, before anything is read or written; a resumed run has its plan
    request = PlanRequest.from_user(**values) if run.resume else main_request(**values)
    return compress_request(request, run, echo=echo)


def compress_request(request: PlanRequest, run: RunSettings, *, echo: Echo = print) -> CompressResult:
    """The whole flow for a parsed request, as named steps: check the targets and the folder, plan (or
    read the plan to resume), train the stages, keep the student, train the baseline, deploy, report."""
    from recipes.deploy import check_targets

    started = time.time()
    enter("plan")
    # an unknown or missing target fails before any training
    run = replace(run, targets=tuple(check_targets(run.targets, int8=run.int8)))
    out_dir = run.out if run.out is not None else default_out_dir(request.teacher, request.budgets)
    folder = RunFolder(out_dir)
    folder.check(resume=run.resume, force=run.force)  # before minutes of planning; again under the lock
    plan, inputs, probe_rows = _resumed(request, out_dir, echo) if run.resume else _plan(request, run, echo)
    for note in inputs.notes:
        echo(note)
    # the folder appears (or its earlier run is set aside) only once the inputs made a plan
    with folder.claim(resume=run.resume, force=run.force) as stage_done:
        journal = RunJournal(out_dir)
        threads = request.latency_threads
        if run.resume:  # what the first command asked for beside its plan (a bare --resume DIR gives no flags)
            run, threads, probe_rows = _recorded_options(journal.load(), run, threads, probe_rows)
        else:  # recorded before plan.yaml, which marks a resumable run
            journal.start(**_journal_options(run, threads, probe_rows))
            plan.save(out_dir / "plan.yaml")
        for reason in plan.reasons:
            echo(f"plan: {reason}")
        trained = run_plan(plan, inputs.source, out_dir, teacher=inputs.teacher, resume=run.resume, device=run.device,
                           echo=echo, on_stage_end=stage_done)
        student_path, student = _keep_student(trained, out_dir)
        baseline = _baseline(plan, inputs, out_dir, run, echo, trained.metrics.get("test_top1")) if run.baseline else None
        deployed = _deploy(student, student_path, inputs, plan, out_dir, run, threads=threads, echo=echo,
                           journal=journal)
        report = _report(plan, inputs, trained, student, student_path, deployed, probe_rows, baseline,
                         request.teacher or plan.teacher)
        report.seconds = round(time.time() - started, 1)
        enter("report")
        write_report(report, out_dir)
        return CompressResult(out_dir, plan, report, report.files)


def _journal_options(run: RunSettings, threads: int, probe_rows: list | None) -> dict[str, Any]:
    """What ``run.json`` records of the command beside its plan: what to deliver after the stages."""
    return {"int8": run.int8, "baseline": run.baseline, "latency_threads": threads, "probe": probe_rows,
            "int8_margin": run.int8_margin, "keep_int8_anyway": run.keep_int8_anyway, "targets": list(run.targets)}


def _recorded_options(journal: RunJournal, run: RunSettings, threads: int,
                      probe_rows: list | None) -> tuple[RunSettings, int, list | None]:
    """A resumed run delivers what its first command asked for (flags given now may add --int8 or
    --baseline): the run settings, the latency threads and the probe's rows."""
    options = journal.options(**_journal_options(run, threads, probe_rows))
    run = replace(run, int8=options["int8"], baseline=options["baseline"],
                  int8_margin=options.get("int8_margin", run.int8_margin),
                  keep_int8_anyway=options.get("keep_int8_anyway", run.keep_int8_anyway),
                  targets=tuple(options.get("targets") or run.targets))
    return run, options["latency_threads"], options["probe"]


def _resumed(request: PlanRequest, out_dir: Path, echo: Echo) -> tuple[Plan, RunInputs, None]:
    """The plan a run folder holds, and its inputs (its corruptions are the run's: flags that say
    otherwise are a mistake)."""
    plan = Plan.load(out_dir / "plan.yaml")
    corruption = same_corruption(plan.data_corruption, request.corruption, f"the run in {out_dir}")
    inputs = resolve_inputs(request.teacher or plan.teacher, request.data or plan.data, arch=request.teacher_arch,
                            trust=request.trust, load_data=True, seed=plan.seed, corruption=corruption)
    echo(f"resuming {out_dir} ({plan.recipe}: {' -> '.join(s.arch for s in plan.stages)})")
    return plan, inputs, None


def _plan(request: PlanRequest, run: RunSettings, echo: Echo) -> tuple[Plan, RunInputs, list | None]:
    """The plan (a preset filled, or searched), and for ``--search probe`` the probe's table."""
    inputs = inputs_for(request, load_data=True)
    plan = plan_with(request, inputs)
    if run.search != "probe" or request.preset is not None:
        return plan, inputs, None
    from recipes.probe import probe_search

    winner, rows = probe_search(plan, inputs, k=run.probe_k, device=run.device, echo=echo)
    if winner != _search_name(plan):
        plan = plan_with(replace(request, student=winner), inputs)  # the same inputs: nothing is read again
    plan.reasons.append(f"--search probe: {winner} scored best on the validation split after successive halving "
                        f"over {len({r['name'] for r in rows})} candidates")
    return plan, inputs, rows


def _keep_student(trained: RunResult, out_dir: Path) -> tuple[Path, LoadedModel]:
    """The last stage's model as the run's student.pt, read back as it was saved."""
    enter("student")
    student_path = out_dir / "student.pt"
    copy_file(trained.stages[-1].checkpoint, student_path)
    return student_path, load_model(student_path)


def _baseline(plan: Plan, inputs: RunInputs, out_dir: Path, run: RunSettings, echo: Echo,
              kd_top1: float | None) -> BaselineFigures:
    """The chosen student without distillation: same architecture, epochs, schedule and seed."""
    final = plan.final
    stage = Stage("baseline", "vanilla", final.arch, [], None, {}, final.train,
                  "the same student trained on labels only, for the KD gain")
    base_plan = Plan(data=plan.data, stages=[stage], seed=plan.seed, corruption=plan.corruption)
    echo("baseline: the same student without distillation")
    result = run_plan(base_plan, inputs.source, out_dir, resume=run.resume, device=run.device, echo=echo)
    top1 = result.metrics.get("test_top1")
    gain = None if top1 is None or kd_top1 is None else kd_gain(kd_top1, top1)
    return BaselineFigures(final.arch, top1, result.metrics.get("val_top1"), gain, result.stages[-1].checkpoint)


@dataclass
class _Deployed:
    """What the deployment step made: the files and their checks, and the measured latencies."""

    deployment: Any  # recipes.deploy.Deployment
    files: dict[str, str]
    student_latency: dict[str, Any]
    teacher_latency: dict[str, Any] | None


def _deploy(student: LoadedModel, student_path: Path, inputs: RunInputs, plan: Plan, out_dir: Path,
            run: RunSettings, *, threads: int, echo: Echo, journal: RunJournal) -> _Deployed:
    """Export to every target with parity (+ int8), then batch-1 latency of the student and the teacher.
    Both phases are recorded in ``journal`` once finished, keyed by the student's bytes and settings:
    a resumed run reuses them (the same figures), and redoes them when anything they read changed."""
    echo(f"exporting the student to {', '.join('ONNX' if t == 'onnx' else t for t in run.targets)} "
         "(parity against PyTorch on test images)")
    from recipes.deploy import Deployment, export_with_data, latency_of

    int8_path = out_dir / "student.int8.onnx" if run.int8 else None
    key = {"student": file_digest(student_path), "int8": run.int8, "seed": plan.seed, "targets": list(run.targets),
           "int8_margin": run.int8_margin, "keep_int8_anyway": run.keep_int8_anyway}

    def export() -> dict[str, Any]:
        return vars(export_with_data(student.model, student.meta, out_dir / "student.onnx", inputs.source,
                                     targets=run.targets, int8_path=int8_path, seed=plan.seed,
                                     source_checkpoint=str(student_path), log=None, int8_margin=run.int8_margin,
                                     keep_int8_anyway=run.keep_int8_anyway))

    recorded = journal.finished("export", key)
    if recorded is None:  # the files it writes are known only once it ran: record their digests then
        enter("export")
        done = export()
        recorded = journal.finish("export", key, done, files=list(done["files"].values()))
    deployment = Deployment(**recorded)
    if deployment.int8 is not None and not deployment.int8.get("written"):
        int8_path = None  # it missed the margin: nothing to time or list
    for line in deployment.lines:
        echo(line)
    shape = tuple(inputs.input_shape)
    echo(f"timing teacher and student at batch 1, {threads} thread(s)")
    latency = journal.once("latency", {**key, "threads": threads}, lambda: {
        "student": latency_of(student.model, shape, threads=threads,
                              onnx_path=out_dir / "student.onnx" if deployment.onnx else None, int8_path=int8_path,
                              targets={name: row["path"] for name, row in deployment.targets.items()}),
        "teacher": latency_of(inputs.teacher.model, shape, threads=threads) if inputs.teacher is not None else None})
    files = {"student.pt": str(student_path), "plan.yaml": str(out_dir / "plan.yaml"), **deployment.files}
    return _Deployed(deployment, files, latency["student"], latency["teacher"])


def _report(plan: Plan, inputs: RunInputs, trained: RunResult, student: LoadedModel, student_path: Path,
            deployed: _Deployed, probe_rows: list | None, baseline: BaselineFigures | None,
            teacher_path: str | None) -> Report:
    """Everything the run found, typed, for report.json, report.md and the plots."""
    student_cost = measure(student.model, tuple(inputs.input_shape))
    figures = StudentFigures(
        student.meta.arch, student_cost.flops, student_cost.params, trained.metrics.get("test_top1"),
        deployed.student_latency, search_name=_search_name(plan), checkpoint=str(student_path),
        val_top1=trained.metrics.get("val_top1"),
        onnx=_onnx_summary(deployed.deployment.onnx) if deployed.deployment.onnx else None,
        int8=_int8_summary(deployed.deployment.int8), targets=deployed.deployment.targets,
    )
    teacher = None
    if inputs.teacher is not None:
        teacher = TeacherFigures(inputs.teacher.meta.arch, inputs.teacher_flops, inputs.teacher_params,
                                 inputs.teacher_top1(), deployed.teacher_latency, path=teacher_path)
    if student.meta.pruning:
        figures.pruning = _pruning_summary(student, trained, teacher, figures)
    return Report(
        student=figures, teacher=teacher, kdcompress_version=__version__, flop_convention=FLOP_CONVENTION,
        data=inputs.data_spec, budgets=plan.budget_texts, recipe=plan.recipe, reasons=list(plan.reasons),
        plan=plan.to_dict(), candidates=plan.candidates, probe=probe_rows, budget_lines=_budget_lines(plan, inputs),
        stages=[StageFigures(s.name, s.arch, s.scheme, st.teachers, s.checkpoint, _plain(s.metrics), s.history)
                for s, st in zip(trained.stages, plan.stages)],
        baseline=baseline, files=dict(deployed.files),
    )


def _budget_lines(plan: Plan, inputs: RunInputs) -> dict[str, list[float]]:
    lines: dict[str, list[float]] = {"mflops": [], "mparams": []}
    for _, metric, limit in cost_limits(plan.budgets, inputs.teacher_flops):
        lines.setdefault(f"m{metric}", []).append(limit / 1e6)
    return lines


def _search_name(plan: Plan) -> str:
    """The candidate the search chose: a pruned teacher is listed as ``<arch>-pruned``."""
    from recipes.pruned import pruned_name

    return pruned_name(plan.final.arch) if plan.final.options.get("prune") else plan.final.arch


def _pruning_summary(student: LoadedModel, trained: RunResult, teacher: TeacherFigures | None,
                     figures: StudentFigures) -> PruningSummary:
    """A pruned teacher: how it was pruned, its accuracy before and after recovery, the speed-up it measured."""
    record = student.meta.pruning
    teacher_ms = teacher.latency_ms("torch_ms") if teacher is not None else None
    student_ms = figures.latency_ms("torch_ms")
    return PruningSummary(
        **{k: record.get(k) for k in ("tool", "tool_version", "ratio", "importance", "scope", "round_to")},
        val_top1_before_recovery=student.extra.get("val_top1_before_recovery"),
        val_top1_after_recovery=trained.metrics.get("val_top1"),
        torch_speedup_vs_teacher=teacher_ms / student_ms if teacher_ms and student_ms else None,
    )


def _onnx_summary(onnx: dict[str, Any]) -> dict[str, Any]:
    parity = onnx.get("parity") or {}
    export = onnx.get("export") or {}
    return {"path": onnx.get("path"), "bytes": onnx.get("bytes"), "exporter": export.get("exporter"),
            "opset": export.get("opset"), **{k: parity.get(k) for k in ("max_abs_diff", "atol", "top1_agreement", "samples", "passed")}}


def _int8_summary(int8: dict[str, Any] | None) -> dict[str, Any] | None:
    if not int8:
        return None
    return {"path": int8.get("path"), "fp32_top1": int8.get("fp32_accuracy"), "int8_top1": int8.get("int8_accuracy"),
            "fp32_bytes": int8.get("fp32_bytes"), "int8_bytes": int8.get("int8_bytes"), "flagged": int8.get("flagged"),
            "margin": int8.get("margin"), "agreement": int8.get("agreement"), "written": int8.get("written"),
            "missed_margin": int8.get("missed_margin"), "control": int8.get("control")}


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "test_per_class"}
