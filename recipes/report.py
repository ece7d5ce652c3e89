"""The run report: report.json for machines, report.md for people, PNG plots for both.

Plots: training curves per stage; every candidate's FLOPs and params with the budget line and the
chosen student marked; teacher vs student accuracy, size and latency. Everything is derived from
the one typed :class:`~recipes.results.Report` (also written as report.json), so the report never
disagrees with itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from compressor.atomic import atomic_output, write_text
from compressor.cost import FLOP_CONVENTION
from recipes.results import ModelFigures, Report, StudentFigures


def write_report(report: Report, out_dir: str | Path) -> dict[str, str]:
    """Write every report file and add them to ``report.files``; returns {kind: path}."""
    out = Path(out_dir)
    files = {"report.json": str(out / "report.json"), "report.md": str(out / "report.md")}
    files.update(write_plots(report, out / "plots"))
    report.files.update(files)
    write_text(out / "report.json", json.dumps(report.to_dict(), indent=1, default=_jsonable))
    write_text(out / "report.md", markdown(report))
    return files


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}" if isinstance(value, (int, float)) else str(value)


_NO_TEACHER = ModelFigures("-")


def summary_rows(report: Report) -> list[tuple[str, str, str]]:
    """(quantity, teacher, student) rows: the table printed at the end and put in the report."""
    t, s = report.teacher or _NO_TEACHER, report.student
    rows = [
        ("architecture", t.arch, s.arch),
        ("test top-1 (%)", _fmt(t.test_top1), _fmt(s.test_top1)),
        ("MFLOPs", _fmt(_m(t.flops)), _fmt(_m(s.flops))),
        ("params (M)", _fmt(_m(t.params), 3), _fmt(_m(s.params), 3)),
    ]
    for key, label in (("torch_ms", "latency, PyTorch eager (ms)"), ("onnx_ms", "latency, onnxruntime (ms)"),
                       ("int8_ms", "latency, onnxruntime int8 (ms)")):
        tv, sv = t.latency_ms(key), s.latency_ms(key)
        if tv is not None or sv is not None:
            rows.append((label, _fmt(tv, 3), _fmt(sv, 3)))
    for name, row in ((s.latency or {}).get("targets") or {}).items():
        rows.append((f"latency, {name} in {row.get('runtime', name)} (ms)", "-", _fmt(row.get("p50_ms"), 3)))
    return rows


def _m(value: Any) -> float | None:
    return None if value is None else value / 1e6


def markdown(report: Report) -> str:
    s = report.student
    lines = [f"# kdcompress report: {s.arch}", ""]
    lines.append(f"Budget: {', '.join(report.budgets) or '-'}; recipe: {report.recipe}; "
                 f"data: {report.data}. {FLOP_CONVENTION}.")
    lines += ["", "## Summary", "", "| | teacher | student |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(report)]
    baseline = report.baseline
    if baseline:
        lines += ["", f"Vanilla student (same epochs and seed, no distillation): test top-1 "
                      f"{_fmt(baseline.test_top1)}%; KD gain {_fmt(baseline.kd_gain, 2, ' points')}."]
    lines += ["", "## Why", ""] + [f"- {r}" for r in report.reasons]
    lines += ["", "## Stages", "", "| stage | model | scheme | learns from | test top-1 | val top-1 | best epoch |",
              "|---|---|---|---|---|---|---|"]
    for st in report.stages:
        m = st.metrics
        lines.append(f"| {st.name} | {st.arch} | {st.scheme} | {', '.join(st.teachers) or '-'} | "
                     f"{_fmt(m.get('test_top1'))} | {_fmt(m.get('val_top1'))} | {m.get('best_epoch', '-')} |")
    onnx = s.onnx
    if onnx or s.targets:
        lines += ["", "## Deployment", ""]
    if onnx:
        lines += [f"ONNX file {onnx.get('path')} (exporter: {onnx.get('exporter')}, opset {onnx.get('opset')}): "
                  f"max |logit difference| vs PyTorch {_fmt(onnx.get('max_abs_diff'), 7)} "
                  f"(tolerance {onnx.get('atol')}), top-1 agreement {_fmt(onnx.get('top1_agreement'), 4)}."]
        int8 = s.int8
        if int8:
            flag = " **ACCURACY DROP ABOVE THE MARGIN**" if int8.get("flagged") else ""
            name = f"int8 file {int8.get('path')}" if int8.get("written", True) else "int8 model (not written)"
            lines.append(f"{name}: test top-1 {_fmt(int8.get('int8_top1'))}% vs fp32 "
                         f"{_fmt(int8.get('fp32_top1'))}%, {_fmt(int8.get('int8_bytes', 0) / 1e6, 3)} MB vs "
                         f"{_fmt(int8.get('fp32_bytes', 0) / 1e6, 3)} MB.{flag}")
            control = int8.get("control")
            if control:
                floats = ", ".join(f"`{n}`" for n in control.get("float_layers") or []) or "none"
                lines.append(f"Accuracy control on {control.get('val_samples')} validation images (margin "
                             f"{_fmt(control.get('margin'))} points): fp32 {_fmt(control.get('fp32_val_accuracy'))}%, "
                             f"int8 {_fmt(control.get('val_accuracy'))}%; layers left float: {floats} "
                             f"(of {control.get('layers')}); {control.get('verdict')}.")
    lines += _target_lines(s)
    pruning = s.pruning
    if pruning:
        speedup = pruning.torch_speedup_vs_teacher
        lines += ["", "## Pruned teacher", "",
                  f"The student is the teacher with {_fmt(pruning.ratio, 3)} of each channel group removed "
                  f"({pruning.importance} importance, {pruning.scope} scope, multiples of "
                  f"{pruning.round_to}; {pruning.tool} {pruning.tool_version}). Validation top-1 "
                  f"before recovery {_fmt(pruning.val_top1_before_recovery)}%, after "
                  f"{_fmt(pruning.val_top1_after_recovery)}%; PyTorch batch-1 speed-up against the unpruned "
                  f"teacher {_fmt(speedup, 2, 'x')}" + (" (**no faster than the teacher**)." if speedup is not None
                                                        and speedup <= 1.0 else ".")]
    if report.probe:
        lines += ["", "## Probe search", "", "| candidate | round | val top-1 |", "|---|---|---|"]
        lines += [f"| {p['name']} | {p['round']} | {_fmt(p.get('score'))} |" for p in report.probe]
    cands = report.candidates
    if cands:
        lines += ["", "## Candidates", "", "Widths marked * were solved for the budget (not grid members).", "",
                  "| model | family | MFLOPs | params (M) | latency (ms) | budget use | fits |",
                  "|---|---|---|---|---|---|---|"]
        for c in cands:
            mark = "**chosen**" if c["name"] == (s.search_name or s.arch) else ("yes" if c.get("fits") else
                                                                                "no: " + "; ".join(c.get("rejected_by") or []))
            use = ", ".join(f"{v:.0%} of {k}" for k, v in (c.get("utilization") or {}).items()) or "-"
            name = c["name"] + ("*" if c.get("solved") else "")
            lines.append(f"| {name} | {c['family']} | {c['flops'] / 1e6:.2f} | {c['params'] / 1e6:.3f} | "
                         f"{_fmt(c.get('latency_ms'), 3)} | {use} | {mark} |")
    plots = [p for k, p in report.files.items() if k.startswith("plot:")]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _target_lines(s: StudentFigures) -> list[str]:
    """The deployment targets, one row each: file, size, converter, parity in its own runtime, latency."""
    targets = s.targets or {}
    if not targets:
        return []
    latency = (s.latency or {}).get("targets") or {}
    lines = ["", "| target | file | MB | converter | max abs logit diff | top-1 agreement | parity | batch-1 latency (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, t in targets.items():
        ms = s.latency_ms("onnx_ms") if name == "onnx" else (latency.get(name) or {}).get("p50_ms")
        lines.append(f"| {name} | {Path(t.get('path') or '-').name} | {_fmt((t.get('bytes') or 0) / 1e6, 3)} | "
                     f"{t.get('converter', '-')} | {_fmt(t.get('max_abs_diff'), 7)} | {_fmt(t.get('top1_agreement'), 4)} | "
                     f"{'passed' if t.get('passed') else 'FAILED'} ({t.get('provider', '-')}) | {_fmt(ms, 3)} |")
    for name, t in targets.items():
        usability = t.get("mobile_usability")
        if usability:
            verdicts = "; ".join(f"{ep}: {v.get('as_is')} as is" + (f", {v['fixed_shapes']} with fixed input shapes"
                                                                    if v.get("fixed_shapes") else "")
                                 for ep, v in (usability.get("providers") or {}).items())
            lines += ["", f"{name}: onnxruntime's mobile-usability check: {verdicts or 'no verdict'}; "
                          f"{len(t.get('required_operators') or [])} required operators "
                          f"({Path(t['files'][-1]).name})."]
    return lines


# panel title -> the key of the trainer's per-epoch record (compressor.trainer.loop: ``train_epoch``
# writes "loss", the summed training loss; ``validate`` writes "val_top1"); the JSONL log holds the same
CURVES = (("training loss", "loss"), ("validation top-1 (%)", "val_top1"))


def curve_data(report: Report) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Panel title -> stage name -> (epochs, values): the points the training-curves plot draws.

    Epochs whose record lacks the value (e.g. no validation split) are left out, not drawn as NaN.
    """
    panels: dict[str, dict[str, tuple[list[int], list[float]]]] = {title: {} for title, _ in CURVES}
    for st in report.stages:
        for title, key in CURVES:
            points = [(int(h["epoch"]), float(h[key])) for h in st.history
                      if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
            if points:
                panels[title][st.name] = ([e for e, _ in points], [v for _, v in points])
    return panels


def write_plots(report: Report, folder: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}

    def save(fig, name: str) -> None:
        path = folder / name
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        files[f"plot:{path.stem}"] = str(path)

    panels = curve_data(report)
    if any(panels.values()):
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
        for ax, (title, curves) in zip(axes, panels.items()):
            for name, (epochs, values) in curves.items():
                # markers: a one-epoch run is a single point, which a bare line does not draw
                ax.plot(epochs, values, marker="o", ms=4, label=name)
            ax.set(title=title, xlabel="epoch")
            epochs_drawn = sorted({e for epochs, _ in curves.values() for e in epochs})
            if 0 < len(epochs_drawn) <= 12:  # epochs are whole numbers: tick each one of a short run
                ax.set_xticks(epochs_drawn)
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if curves:
                ax.legend(fontsize=8)
        save(fig, "training_curves.png")

    cands = report.candidates
    if cands:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        fits = [c for c in cands if c.get("fits")]
        rest = [c for c in cands if not c.get("fits")]
        ax.scatter([c["flops"] / 1e6 for c in rest], [c["params"] / 1e6 for c in rest], s=14, c="0.7", label="does not fit")
        ax.scatter([c["flops"] / 1e6 for c in fits], [c["params"] / 1e6 for c in fits], s=16, c="tab:blue", label="fits")
        s = report.student
        chosen = [c for c in cands if c["name"] == (s.search_name or s.arch)]
        if chosen:
            ax.scatter([chosen[0]["flops"] / 1e6], [chosen[0]["params"] / 1e6], s=120, marker="*", c="tab:red",
                       label=f"chosen: {chosen[0]['name']}")
        for limit in report.budget_lines.get("mflops", []):
            ax.axvline(limit, color="tab:red", ls="--", lw=1)
        for limit in report.budget_lines.get("mparams", []):
            ax.axhline(limit, color="tab:red", ls=":", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="MFLOPs (1 multiply-add = 1 FLOP)", ylabel="params (M)",
               title="student candidates and the budget")
        ax.legend(fontsize=8)
        save(fig, "candidates.png")

    t, s = report.teacher, report.student
    if t:
        panels = [("test top-1 (%)", t.test_top1, s.test_top1),
                  ("params (M)", _m(t.params), _m(s.params)),
                  ("MFLOPs", _m(t.flops), _m(s.flops)),
                  ("onnxruntime latency (ms)", t.latency_ms("onnx_ms"), s.latency_ms("onnx_ms"))]
        panels = [p for p in panels if p[1] is not None and p[2] is not None]
        fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2))
        for ax, (title, tv, sv) in zip(axes if len(panels) > 1 else [axes], panels):
            ax.bar(["teacher", "student"], [tv, sv], color=["0.55", "tab:blue"])
            ax.set_title(title, fontsize=9)
        save(fig, "teacher_vs_student.png")
    return files
