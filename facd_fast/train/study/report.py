"""The report of a study: statistics over its rows, ``study.json``, ``study.md`` and the plots.

A row is one run's current evaluation on one evaluation set (:func:`facd_fast.train.study.runner.collect_rows`).
Per method and sweep point: n / mean / std / 95% CI of the seeds' Y-PSNR; paired
differences, seed by seed, of each method against the baseline and between the
other methods, and of each sweep value against the key's first value, method by method
(:mod:`facd_fast.train.study.stats`). ``study.md`` holds the same
as tables, ``study_<eval>.png`` the seeds, means and intervals,
``study_diagnostics.png`` the gradient diagnostics of one seed per group.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .grid import applies, point_label, sweep_points
from .records import write_json
from .stats import paired_difference, summarize, verdict


def summarize_study(rows: Sequence[Dict[str, Any]], runs: int, methods: Sequence[str], seeds: Sequence[int],
                    sweeps: Sequence[Tuple[str, List[str]]], evals: Dict[str, Dict[str, Any]],
                    baseline: str) -> Dict[str, Any]:
    """The study: ``rows`` and, per evaluation set, per-group statistics and paired differences.

    ``runs`` is the number of runs in the grid; ``evals`` maps each evaluation set's name to what its folder
    held (``{"dir", "folder_sha256", "files"}``, :func:`facd_fast.train.study.records.folder_key`).
    """
    points = sweep_points(sweeps)
    sets = {}
    for name in evals:
        groups, comparisons = [], []
        for point in points:
            by_method: Dict[str, Dict[int, float]] = {}
            for method in methods:
                own = {k: v for k, v in point.items() if applies(method, k)}
                members = [r for r in rows if r["eval"] == name and r["method"] == method and r["point"] == own]
                if not members:
                    continue
                values = {r["seed"]: r["mean_psnr_y"] for r in members}
                by_method[method] = values
                stats = summarize([values[s] for s in sorted(values)])
                logged = [r["diagnostics"] for r in members if r["diagnostics"]]
                diagnostics = {key: sum(d[key] for d in logged) / len(logged) for key in logged[0]} if logged else {}
                groups.append({"method": method, "point": point, "own_point": own, "psnr_y": stats, "values": values,
                               "ssim_y_mean": sum(r["mean_ssim_y"] for r in members) / len(members),
                               "diagnostics": diagnostics,
                               "train_s_mean": sum(r["train_s"] for r in members) / len(values)})
            others = [m for m in methods if m != baseline]
            pairs = [(m, baseline) for m in others] + list(itertools.combinations(others[::-1], 2))[::-1]
            for a, b in pairs:
                if a in by_method and b in by_method:
                    stats = paired_difference(by_method[a], by_method[b])
                    if stats is not None:
                        comparisons.append({"a": a, "b": b, "point": point, "psnr_y_diff": stats, "verdict": verdict(stats)})
        sets[name] = {**evals[name], "groups": groups, "comparisons": comparisons,
                      "sweep_comparisons": sweep_comparisons([r for r in rows if r["eval"] == name], methods, sweeps)}
    return {
        "methods": list(methods), "seeds": list(seeds), "sweeps": {k: v for k, v in sweeps}, "baseline": baseline,
        "runs": runs, "finished": len({r["run_dir"] for r in rows}), "rows": list(rows), "evals": sets,
    }


def sweep_comparisons(rows: Sequence[Dict[str, Any]], methods: Sequence[str],
                      sweeps: Sequence[Tuple[str, List[str]]]) -> List[Dict[str, Any]]:
    """Each sweep value against the key's first value, per method, paired by seed (the other keys held equal):
    what a setting (a precision, a lambda) changes, with the same initial weights and patches."""
    found = []
    for method in methods:
        for key, values in sweeps:
            if not applies(method, key):
                continue
            others = [(k, v) for k, v in sweeps if k != key and applies(method, k)]
            for fixed in sweep_points(others):
                def seeds_at(value):
                    point = {**fixed, key: value}
                    return {r["seed"]: r["mean_psnr_y"] for r in rows if r["method"] == method and r["point"] == point}
                first = seeds_at(values[0])
                for value in values[1:]:
                    stats = paired_difference(seeds_at(value), first)
                    if stats is not None:
                        found.append({"method": method, "key": key, "a": value, "b": values[0], "fixed": fixed,
                                      "psnr_y_diff": stats, "verdict": verdict(stats)})
    return found


def diagnostics_table(study: Dict[str, Any], name: str) -> str:
    """Per group, the run-mean gradient diagnostics (empty when no run logged them)."""
    groups = [g for g in study["evals"][name]["groups"] if g.get("diagnostics")]
    if not groups:
        return ""
    lines = ["| method | sweep | grad pixel | grad output | grad feature | feature/pixel | cos(output, pixel) | "
             "cos(feature, pixel) | distilled fraction |", "|---|---|---|---|---|---|---|---|---|"]
    for group in groups:
        d = group["diagnostics"]
        cell = lambda key, f="{:.4f}": f.format(d[key]) if key in d else "-"  # noqa: E731
        lines.append(f"| {group['method']} | {point_label(group['point'])} | {cell('grad_pixel')} | {cell('grad_output')} | "
                     f"{cell('grad_feature')} | {cell('feature_over_pixel', '{:.3f}')} | {cell('cos_output_pixel', '{:.3f}')} | "
                     f"{cell('cos_feature_pixel', '{:.3f}')} | {cell('distilled_fraction', '{:.3f}')} |")
    return "\n".join(lines) + "\n"


def _fmt(stats: Dict[str, float], digits: int = 3) -> str:
    if math.isnan(stats["ci_half"]):
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['ci_half']:.{digits}f}"


def study_tables(study: Dict[str, Any]) -> str:
    """The study as Markdown tables (one pair of tables per evaluation set)."""
    lines = []
    for name, data in study["evals"].items():
        lines += [f"### {name} ({data['dir']}: {data['files']} files, sha256 {data['folder_sha256'][:12]})", "",
                  "| method | sweep | n | Y-PSNR mean ± 95% CI (dB) | std | SSIM |", "|---|---|---|---|---|---|"]
        listed = set()
        for group in data["groups"]:
            key = (group["method"], tuple(group.get("own_point", group["point"]).items()))
            if key in listed:  # a "none" run shared by several sweep points: one row
                continue
            listed.add(key)
            stats = group["psnr_y"]
            lines.append(f"| {group['method']} | {point_label(group.get('own_point', group['point']))} | {stats['n']} | {_fmt(stats)} | "
                         f"{stats['std']:.3f} | {group['ssim_y_mean']:.4f} |")
        lines += ["", "| paired difference | sweep | n | mean ± 95% CI (dB) | wins/losses | verdict |", "|---|---|---|---|---|---|"]
        for comparison in data["comparisons"]:
            stats = comparison["psnr_y_diff"]
            lines.append(f"| {comparison['a']} − {comparison['b']} | {point_label(comparison['point'])} | {stats['n']} | "
                         f"{_fmt(stats)} | {stats['wins']}/{stats['losses']} | {comparison['verdict']} |")
        if data.get("sweep_comparisons"):
            lines += ["", "| method | sweep value − first value | others | n | mean ± 95% CI (dB) | wins/losses | verdict |",
                      "|---|---|---|---|---|---|---|"]
            for comparison in data["sweep_comparisons"]:
                stats = comparison["psnr_y_diff"]
                lines.append(f"| {comparison['method']} | {comparison['key']}: {comparison['a']} − {comparison['b']} | "
                             f"{point_label(comparison['fixed'])} | {stats['n']} | {_fmt(stats)} | "
                             f"{stats['wins']}/{stats['losses']} | {comparison['verdict']} |")
        lines.append("")
    return "\n".join(lines)


def write_study(out: Path, study: Dict[str, Any]) -> None:
    """``out/study.json``, ``out/study.md`` and, once a run has finished, the plots."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "study.json", study)
    header = (f"# Study: {study['finished']}/{study['runs']} runs, methods {', '.join(study['methods'])}, "
              f"seeds {', '.join(map(str, study['seeds']))}\n\nY-PSNR by the exact protocol (`facd eval`); "
              f"95% confidence intervals are t-based over seeds; paired differences are per seed.\n\n")
    diagnostics = ""
    first = next(iter(study["evals"]), None)
    if first is not None and diagnostics_table(study, first):
        diagnostics = ("\n### Gradient diagnostics (means over each run's logged steps, then over seeds)\n\n"
                       + diagnostics_table(study, first))
    (out / "study.md").write_text(header + study_tables(study) + diagnostics)
    if study["rows"]:
        for name in study["evals"]:
            plot_study(study, name, out / f"study_{name}.png")
        plot_diagnostics(study, out, out / "study_diagnostics.png")


def _diagnostic_logs(study: Dict[str, Any], out: Path) -> Dict[str, Path]:
    """{group label: log.jsonl of its lowest seed's run} for the groups whose runs logged gradient norms."""
    logs: Dict[str, Path] = {}
    for row in sorted(study["rows"], key=lambda r: r["seed"]):
        label = row["method"] + ("" if not row["point"] else " " + point_label(row["point"]))
        path = out / row["run_dir"] / row["method"] / "log.jsonl"
        if label not in logs and path.is_file() and '"grad_pixel"' in path.read_text():
            logs[label] = path
    return logs


def plot_diagnostics(study: Dict[str, Any], out: Path, out_png: Path) -> Optional[Path]:
    """Gradient norm of each objective term into the student, its cosine with the pixel term's, and the
    distilled fraction, against steps (one seed per group); None when no run logged them."""
    from ..plots import _pyplot
    from ..run_log import read_log

    logs = _diagnostic_logs(study, out)
    if not logs:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, 4, figsize=(18, 4))
    styles = {"pixel": "-", "output": "--", "feature": ":"}
    for index, (label, path) in enumerate(logs.items()):
        records = [r for r in read_log(path, "train") if "grad_pixel" in r]
        steps = [r["step"] for r in records]
        color = f"C{index % 10}"
        for term, style in styles.items():
            if f"grad_{term}" in records[0]:
                axes[0].plot(steps, [r[f"grad_{term}"] for r in records], style, color=color,
                             label=f"{label}: {term}", lw=1)
        if "grad_feature" in records[0]:
            ratio = [r["grad_feature"] / max(r["grad_pixel"], 1e-12) for r in records]
            axes[1].plot(steps, ratio, color=color, label=label, lw=1)
            axes[2].plot(steps, [r["cos_feature_pixel"] for r in records], color=color, label=label, lw=1)
        if "distilled_fraction" in records[0]:
            axes[3].plot(steps, [r["distilled_fraction"] for r in records], color=color, label=label, lw=1)
    axes[0].set(yscale="log", xlabel="step", title="gradient norm into the student, per term")
    axes[1].set(yscale="log", xlabel="step", title="feature term / pixel term (gradient norms)")
    axes[2].set(xlabel="step", title="cosine(feature gradient, pixel gradient)")
    axes[2].axhline(0.0, color="k", lw=0.6)
    axes[3].set(xlabel="step", title="distilled fraction (mask)", ylim=(-0.05, 1.05))
    for axis in axes:
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png


def plot_study(study: Dict[str, Any], name: str, out_png: Path) -> Path:
    """Left: each seed's Y-PSNR per method and sweep point (paired seeds joined), mean and 95% CI.
    Right: the paired differences with their 95% CI, zero marked."""
    from ..plots import _pyplot

    plt = _pyplot()
    data = study["evals"][name]
    groups, comparisons = data["groups"], data["comparisons"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.2 * (len(groups) + len(comparisons)) + 3), 4.5))
    labels = [g["method"] + ("" if not g["point"] else "\n" + point_label(g["point"])) for g in groups]
    seeds = sorted({s for g in groups for s in g["values"]})
    for seed in seeds:
        xs = [i for i, g in enumerate(groups) if seed in g["values"]]
        left.plot(xs, [groups[i]["values"][seed] for i in xs], color="0.8", lw=0.8, zorder=1)
    for i, group in enumerate(groups):
        values = [group["values"][s] for s in sorted(group["values"])]
        left.scatter([i] * len(values), values, s=14, color="C0", zorder=2)
        stats = group["psnr_y"]
        half = 0.0 if math.isnan(stats["ci_half"]) else stats["ci_half"]
        left.errorbar(i + 0.15, stats["mean"], yerr=half, fmt="s", color="C3", capsize=4, zorder=3)
    left.set_xticks(range(len(groups)), labels, fontsize=7)
    left.set_ylabel("Y-PSNR (dB)")
    left.set_title(f"{name}: seeds (grey: same seed), mean ± 95% CI", fontsize=9)
    for i, comparison in enumerate(comparisons):
        stats = comparison["psnr_y_diff"]
        half = 0.0 if math.isnan(stats["ci_half"]) else stats["ci_half"]
        right.errorbar(i, stats["mean"], yerr=half, fmt="o", color="C2", capsize=4)
    right.axhline(0.0, color="k", lw=0.8)
    right.set_xticks(range(len(comparisons)), [f"{c['a']} − {c['b']}" + ("" if not c["point"] else "\n" + point_label(c["point"]))
                                                for c in comparisons], fontsize=7)
    right.set_ylabel("paired Y-PSNR difference (dB)")
    right.set_title("paired differences, mean ± 95% CI", fontsize=9)
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    plt.close(figure)
    return out_png

