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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from compressor import __version__
from compressor.atomic import copy_file
from compressor.checkpoint import load_model
from compressor.cost import FLOP_CONVENTION, measure
from compressor.data.corruptions import Corruption
from compressor.errors import UserError
from compressor.metrics import kd_gain
from recipes.budget import parse_budgets
from recipes.context import RunInputs, resolve_inputs, same_corruption
from recipes.distill_plan import load_preset, preset_plan
from recipes.distill_run import teacher_accuracy
from recipes.journal import RunJournal, enter, file_digest
from recipes.plan import Plan, Stage
from recipes.report import summary_rows, write_report
from recipes.run_folder import RunFolder
from recipes.runner import run_plan

Echo = Callable[[str], None]


@dataclass
class CompressResult:
    out_dir: Path
    plan: Plan
    report: dict[str, Any]
    files: dict[str, str]

    @property
    def summary(self) -> list[tuple[str, str, str]]:
        return summary_rows(self.report)


def default_out_dir(teacher: str | None, budgets: Sequence[str]) -> Path:
    stem = Path(teacher).stem if teacher else "cohort"
    slug = re.sub(r"[^A-Za-z0-9.]+", "", "-".join(budgets)) or "nobudget"
    return Path("runs") / f"{stem}-{slug}"


def compress(
    teacher: str | None = None,
    budget: Sequence[str] = (),
    data: str | None = None,
    out: str | Path | None = None,
    *,
    teacher_arch: str | None = None,
    recipe: str | None = None,
    method: str | None = None,
    family: str | None = None,
    candidates: str = "zoo",
    gap_threshold: float = 8.0,
    epochs: int | None = None,
    seed: int = 0,
    int8: bool = False,
    baseline: bool = False,
    search: str = "rule",
    probe_k: int = 4,
    latency_threads: int = 1,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    trust: bool = False,
    preset: str | None = None,
    corruption: Corruption | None = None,
    echo: Echo = print,
) -> CompressResult:
    """``corruption`` (None: clean, or what a resumed run or a saved plan records) corrupts the
    training labels of every stage, the baseline's too."""
    started = time.time()
    enter("plan")
    out_dir = Path(out) if out is not None else default_out_dir(teacher, budget)
    if not resume and not preset:
        parse_budgets(budget)  # a bad budget fails before anything is read or written
    folder = RunFolder(out_dir)
    if resume and not folder.has_plan() and (budget or preset):
        resume = False  # killed while planning: nothing was recorded, so the whole command starts again
        echo(f"{out_dir} holds no plan yet (the run stopped while planning): starting it")
    folder.check(resume=resume, force=force)  # before minutes of planning; again under the lock
    if resume:
        plan = Plan.load(out_dir / "plan.yaml")
        teacher = teacher or plan.teacher
        corruption = same_corruption(plan.data_corruption, corruption, f"the run in {out_dir}")
        inputs = resolve_inputs(teacher, data or plan.data, arch=teacher_arch, trust=trust, load_data=True, seed=plan.seed,
                                corruption=corruption)
        echo(f"resuming {out_dir} ({plan.recipe}: {' -> '.join(s.arch for s in plan.stages)})")
        probe_rows = None
    elif preset:
        raw = load_preset(preset)
        teacher = teacher or raw.get("teacher")  # a saved plan names its teacher
        corruption = corruption or Corruption.from_dict(raw.get("corruption"))  # and its corruptions
        inputs = resolve_inputs(teacher, data, arch=teacher_arch, trust=trust, load_data=True, seed=seed,
                                corruption=corruption)
        plan = preset_plan(preset, teacher=teacher, data=inputs.data_spec, teacher_arch=teacher_arch, method=method,
                           seed=seed, train={"epochs": epochs}, corruption=corruption)
        probe_rows = None
    else:
        plan, inputs, probe_rows = _plan(teacher, budget, data, teacher_arch, recipe, method, family, gap_threshold,
                                         epochs, seed, latency_threads, trust, search, probe_k, device, echo,
                                         corruption, candidates)
    for note in inputs.notes:
        echo(note)
    # the folder appears (or its earlier run is set aside) only once the inputs made a plan
    with folder.claim(resume=resume, force=force) as stage_done:
        journal = RunJournal(out_dir)
        if resume:  # what the first command asked for beside its plan (a bare --resume DIR gives no flags)
            options = journal.load().options(int8=int8, baseline=baseline, latency_threads=latency_threads,
                                             probe=probe_rows)
            int8, baseline, latency_threads, probe_rows = (options["int8"], options["baseline"],
                                                           options["latency_threads"], options["probe"])
        else:  # recorded before plan.yaml, which marks a resumable run
            journal.start(int8=int8, baseline=baseline, latency_threads=latency_threads, probe=probe_rows)
            plan.save(out_dir / "plan.yaml")
        for reason in plan.reasons:
            echo(f"plan: {reason}")
        run = run_plan(plan, inputs.source, out_dir, teacher=inputs.teacher, resume=resume, device=device,
                       echo=echo, on_stage_end=stage_done)
        return _deliver(plan, inputs, run, probe_rows, out_dir, teacher, started, resume=resume, baseline=baseline,
                        int8=int8, latency_threads=latency_threads, device=device, echo=echo, journal=journal)


def _deliver(plan: Plan, inputs: RunInputs, run: Any, probe_rows: list | None, out_dir: Path, teacher: str | None,
             started: float, *, resume: bool, baseline: bool, int8: bool, latency_threads: int, device: str,
             echo: Echo, journal: RunJournal) -> CompressResult:
    """After the stages: the student file, the baseline, ONNX (+ int8), latency and the report.

    Export and latency are recorded in ``journal`` once finished; a resumed run reuses them."""
    enter("student")
    student_path = out_dir / "student.pt"
    copy_file(run.stages[-1].checkpoint, student_path)
    student = load_model(student_path)

    baseline_row = None
    if baseline:
        baseline_row = _baseline(plan, inputs, out_dir, resume, device, echo, run.metrics.get("test_top1"))

    echo("exporting the student to ONNX (parity against PyTorch on test images)")
    from recipes.deploy import Deployment, export_with_data, latency_of

    int8_path = out_dir / "student.int8.onnx" if int8 else None
    key = {"student": file_digest(student_path), "int8": int8, "seed": plan.seed}
    deployment = Deployment(**journal.once("export", key, lambda: vars(export_with_data(
        student.model, student.meta, out_dir / "student.onnx", inputs.source, int8_path=int8_path, seed=plan.seed,
        source_checkpoint=str(student_path), log=None)), files=[out_dir / "student.onnx", *filter(None, [int8_path])]))
    for line in deployment.lines:
        echo(line)
    shape = tuple(inputs.input_shape)
    echo(f"timing teacher and student at batch 1, {latency_threads} thread(s)")
    latency = journal.once("latency", {**key, "threads": latency_threads}, lambda: {
        "student": latency_of(student.model, shape, threads=latency_threads, onnx_path=out_dir / "student.onnx",
                              int8_path=int8_path),
        "teacher": None if inputs.teacher is None else
        latency_of(inputs.teacher.model, shape, threads=latency_threads)})
    student_latency = latency["student"]
    student_cost = measure(student.model, shape)
    report: dict[str, Any] = {
        "kdcompress_version": __version__, "flop_convention": FLOP_CONVENTION, "data": inputs.data_spec,
        "budgets": list(plan.budgets), "recipe": plan.recipe, "reasons": list(plan.reasons),
        "plan": plan.to_dict(), "candidates": plan.candidates, "probe": probe_rows,
        "budget_lines": _budget_lines(plan, inputs),
        "stages": [{"name": s.name, "arch": s.arch, "scheme": s.scheme, "teachers": st.teachers,
                    "checkpoint": s.checkpoint, "metrics": _plain(s.metrics), "history": s.history}
                   for s, st in zip(run.stages, plan.stages)],
        "student": {
            "arch": student.meta.arch, "search_name": _search_name(plan), "checkpoint": str(student_path),
            "flops": student_cost.flops, "params": student_cost.params, "test_top1": run.metrics.get("test_top1"),
            "val_top1": run.metrics.get("val_top1"), "latency": student_latency,
            "onnx": _onnx_summary(deployment.onnx), "int8": _int8_summary(deployment.int8),
        },
        "baseline": baseline_row,
        "files": {"student.pt": str(student_path), "student.onnx": str(out_dir / "student.onnx"),
                  "plan.yaml": str(out_dir / "plan.yaml"),
                  **({"student.int8.onnx": str(int8_path)} if int8_path else {})},
    }
    if inputs.teacher is not None:
        teacher_latency = latency["teacher"]
        report["teacher"] = {
            "path": teacher, "arch": inputs.teacher.meta.arch, "flops": inputs.teacher_cost.flops,
            "params": inputs.teacher_cost.params, "test_top1": teacher_accuracy(inputs), "latency": teacher_latency,
        }
    if student.meta.pruning:
        report["student"]["pruning"] = _pruning_summary(student, run, report)
    report["seconds"] = round(time.time() - started, 1)
    enter("report")
    files = write_report(report, out_dir)
    report["files"].update(files)
    return CompressResult(out_dir, plan, report, report["files"])


def _plan(teacher, budget, data, teacher_arch, recipe, method, family, gap_threshold, epochs, seed, latency_threads,
          trust, search, probe_k, device, echo, corruption, candidates="zoo") -> tuple[Plan, RunInputs, list | None]:
    from recipes.api import plan_compression

    plan, inputs = plan_compression(
        teacher=teacher, budgets=budget, data=data, teacher_arch=teacher_arch, recipe=recipe, method=method,
        family=family, gap_threshold=gap_threshold, epochs=epochs, seed=seed, latency_threads=latency_threads,
        trust=trust, load_data=True, corruption=corruption, candidates=candidates,
    )
    if search != "probe":
        return plan, inputs, None
    from recipes.probe import probe_search

    winner, rows = probe_search(plan, inputs, k=probe_k, device=device, echo=echo)
    if winner != _search_name(plan):
        plan, _ = plan_compression(
            teacher=teacher, budgets=budget, data=data, teacher_arch=teacher_arch, recipe=recipe, method=method,
            family=family, gap_threshold=gap_threshold, epochs=epochs, seed=seed, latency_threads=latency_threads,
            trust=trust, load_data=False, student=winner, corruption=corruption, candidates=candidates,
        )
    plan.reasons.append(f"--search probe: {winner} scored best on the validation split after successive halving "
                        f"over {len({r['name'] for r in rows})} candidates")
    return plan, inputs, rows


def _baseline(plan: Plan, inputs: RunInputs, out_dir: Path, resume: bool, device: str, echo: Echo,
              kd_top1: float | None) -> dict[str, Any]:
    """The chosen student without distillation: same architecture, epochs, schedule and seed."""
    final = plan.final
    stage = Stage("baseline", "vanilla", final.arch, [], None, {}, dict(final.train),
                  "the same student trained on labels only, for the KD gain")
    base_plan = Plan(data=plan.data, stages=[stage], seed=plan.seed, recipe="vanilla", corruption=plan.corruption)
    echo("baseline: the same student without distillation")
    result = run_plan(base_plan, inputs.source, out_dir, resume=resume, device=device, echo=echo)
    top1 = result.metrics.get("test_top1")
    gain = None if top1 is None or kd_top1 is None else kd_gain(kd_top1, top1)
    return {"arch": final.arch, "test_top1": top1, "val_top1": result.metrics.get("val_top1"), "kd_gain": gain,
            "checkpoint": result.stages[-1].checkpoint}


def _budget_lines(plan: Plan, inputs: RunInputs) -> dict[str, list[float]]:
    lines: dict[str, list[float]] = {"mflops": [], "mparams": []}
    teacher_flops = inputs.teacher_cost.flops if inputs.teacher_cost else None
    for b in parse_budgets(plan.budgets) if plan.budgets else []:
        if b.kind in ("flops", "factor"):
            lines["mflops"].append(b.flops_limit(teacher_flops) / 1e6)
        elif b.kind == "params":
            lines["mparams"].append(b.value / 1e6)
    return lines


def _search_name(plan: Plan) -> str:
    """The candidate the search chose: a pruned teacher is listed as ``<arch>-pruned``."""
    from recipes.pruned import pruned_name

    return pruned_name(plan.final.arch) if plan.final.options.get("prune") else plan.final.arch


def _pruning_summary(student: Any, run: Any, report: dict[str, Any]) -> dict[str, Any]:
    """A pruned teacher: how it was pruned, its accuracy before and after recovery, the speed-up it measured."""
    record = student.meta.pruning
    teacher_ms = ((report.get("teacher") or {}).get("latency") or {}).get("torch_ms")
    student_ms = (report["student"].get("latency") or {}).get("torch_ms")
    return {
        **{k: record.get(k) for k in ("tool", "tool_version", "ratio", "importance", "scope", "round_to")},
        "val_top1_before_recovery": student.extra.get("val_top1_before_recovery"),
        "val_top1_after_recovery": run.metrics.get("val_top1"),
        "torch_speedup_vs_teacher": teacher_ms / student_ms if teacher_ms and student_ms else None,
    }


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
            "margin": int8.get("margin"), "agreement": int8.get("agreement")}


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "test_per_class"}
