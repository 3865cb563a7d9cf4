"""What the CLI prints: runs, sweeps, a sweep's analysis and a dry run, as tables that fit the
terminal (:mod:`client.tables`). Column headers are the service's labels of the quantities
(``services/quantities.py``; a test keeps them equal: the client talks HTTP only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console

from .tables import Column, fitted_table, number

LABELS = {
    "final_loss": "final loss L(K)",
    "lambda_min_initial": "λ_min(H(0))",
    "lambda_min_min": "min_k λ_min(H(k))",
    "fitted_rate": "fitted rate (ln L per step)",
    "theory_rate": "theory rate 2·ln max|1 − ηλ(H(0))|",
    "late_theory_rate": "theory rate on late H(k)",
    "du_rate_bound": "Du bound ln(1 − ηλ₀/2)",
    "steps_to_threshold": "steps to threshold",
    "lambda_min_min_ratio": "min_k λ_min(H(k)) / λ_min(H(0))",
    "y_Hinv_y": "yᵀ(H^∞)⁻¹y",
}
GROUP_COLUMNS = (  # (quantity, priority): the lowest priority is left out first
    ("final_loss", 0),
    ("fitted_rate", 0),
    ("theory_rate", 6),
    ("steps_to_threshold", 5),
    ("lambda_min_min_ratio", 4),
    ("late_theory_rate", 3),
    ("du_rate_bound", 2),
)


def overrides_text(overrides: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items())


def group_text(params: Mapping[str, Any]) -> str:
    return overrides_text(params) or "all runs"


def stats_text(stats: Mapping[str, Any] | None) -> str:
    """mean ± std; for positive values spanning decades, geometric mean ×/÷ geometric std."""
    if not stats or stats.get("mean") is None:
        return ""
    if stats.get("spans_decades") and stats.get("geomean") is not None:
        spread = stats.get("geostd")
        return f"{number(stats['geomean'])} ×/÷ {number(spread)}" if spread else ""
    if stats.get("std") is None:
        return number(stats["mean"])
    return f"{number(stats['mean'])} ± {number(stats['std'])}"


def print_runs(console: Console, runs: Sequence[Mapping[str, Any]]) -> None:
    """Runs with their state and summary."""
    columns = [
        Column("id", numeric=True),
        Column("sweep", numeric=True, priority=2),
        Column("status"),
        Column("overrides"),
        Column("steps", numeric=True, priority=5),
        Column(LABELS["final_loss"], numeric=True),
        Column(LABELS["lambda_min_initial"], numeric=True, priority=3),
        Column(LABELS["lambda_min_min"], numeric=True, priority=4),
        Column("owner", priority=1),  # the first left out: one user's laptop has one owner
    ]
    rows = [
        [
            str(r["id"]),
            number(r["sweep_id"]) if r["sweep_id"] is not None else "external",
            r["status"],
            overrides_text(r["overrides"]),
            number(r["summary"].get("steps_done")),
            number(r["summary"].get("final_loss")),
            number(r["summary"].get("lambda_min_initial")),
            number(r["summary"].get("lambda_min_min")),
            r.get("owner") or "",
        ]
        for r in runs
    ]
    console.print(fitted_table(console, columns, rows))


def print_sweeps(console: Console, sweeps: Sequence[Mapping[str, Any]]) -> None:
    """Sweeps, newest first, with their runs per state."""
    columns = [
        Column("id", numeric=True),
        Column("name"),
        Column("runs", numeric=True),
        Column("runs per state"),
        Column("created", priority=2),
        Column("owner", priority=1),
    ]
    rows = [
        [
            str(s["id"]),
            f"{s['name']} (experiment)" if s.get("kind") == "experiment" else s["name"],
            str(s["run_count"]),
            ", ".join(f"{n} {state}" for state, n in sorted(s["status_counts"].items())),
            s["created_at"][:19].replace("T", " "),
            s.get("owner") or "",
        ]
        for s in sweeps
    ]
    console.print(fitted_table(console, columns, rows))


def print_plan(console: Console, plan: Mapping[str, Any]) -> None:
    """A dry run: the runs a spec expands to, with the resources each will ask for."""
    columns = [
        Column("#", numeric=True),
        Column("overrides"),
        Column("cpus", numeric=True, priority=2),
        Column("gpus", numeric=True, priority=1),
        Column("memory MB", numeric=True, priority=3),
    ]
    rows = [
        [
            str(run["index"]),
            overrides_text(run["overrides"]) or "base",
            number(run["resources"].get("cpus")),
            number(run["resources"].get("gpus")),
            number(run["resources"].get("memory_mb")),
        ]
        for run in plan["runs"]
    ]
    console.print(fitted_table(console, columns, rows, title=f"sweep {plan['name']!r}"))
    console.print(f"{plan['run_count']} runs are valid; nothing was submitted (--dry-run).")


def _groups_table(console: Console, analysis: Mapping[str, Any]) -> None:
    columns = [Column("group"), Column("final runs", numeric=True)]
    columns += [Column(LABELS[q], numeric=True, priority=p) for q, p in GROUP_COLUMNS]
    rows = []
    for group in analysis["groups"]:
        total = len(group["run_ids"])
        final = total - group.get("pending", 0)
        row = [group_text(group["params"]), str(total) if final == total else f"{final}/{total}"]
        rows.append(row + [stats_text(group["stats"].get(q)) for q, _ in GROUP_COLUMNS])
    title = "runs grouped over seeds (final runs: mean ± std; ×/÷ geometric, spanning decades)"
    console.print(fitted_table(console, columns, rows, title=title))


def _fits_table(console: Console, fits: Sequence[Mapping[str, Any]]) -> None:
    if not fits:
        console.print("no scaling-law fits (they need ≥ 2 values of a swept number)")
        return
    columns = [
        Column("x", priority=3),
        Column("y"),
        Column("group"),
        Column("kind", priority=4),
        Column("slope", numeric=True),
        Column("95% CI", numeric=True, priority=6),
        Column("n", numeric=True, priority=2),
        Column("r²", numeric=True, priority=5),
        Column("theory", numeric=True, priority=1),
    ]
    rows = [
        [
            fit["x"],
            fit["y"],
            group_text(fit["group"]),
            fit["kind"],
            number(fit["slope"]),
            f"[{number(fit['ci'][0])}, {number(fit['ci'][1])}]" if fit.get("ci") else "",
            str(fit["n_points"]),
            number(fit["r2"]),
            number(fit.get("reference_slope")),
        ]
        for fit in fits
    ]
    title = "scaling laws (OLS on log–log axes; exponential: ln y against x)"
    console.print(fitted_table(console, columns, rows, title=title))


def _labels_table(console: Console, labels: Mapping[str, Any]) -> None:
    columns = [
        Column(labels["param"]),
        Column("group"),
        Column(LABELS["y_Hinv_y"], numeric=True),
        Column(LABELS["fitted_rate"], numeric=True),
        Column(LABELS["steps_to_threshold"], numeric=True, priority=2),
        Column(LABELS["final_loss"], numeric=True, priority=1),
    ]
    rows = [
        [
            str(row["value"]),
            group_text(comparison["group"]),
            stats_text(row["y_Hinv_y"]),
            stats_text(row["fitted_rate"]),
            stats_text(row["steps_to_threshold"]),
            stats_text(row["final_loss"]),
        ]
        for comparison in labels["comparisons"]
        for row in comparison["rows"]
    ]
    console.print(fitted_table(console, columns, rows, title="true vs random labels"))


def print_flags(console: Console, runs: Sequence[Mapping[str, Any]]) -> None:
    """One line per run that raised a flag: its overrides and each flag's message."""
    flagged = [r for r in runs if r.get("flags")]
    if not flagged:
        return
    console.print(f"[bold]flags[/bold] ({len(flagged)} of {len(runs)} runs):")
    for run in flagged:
        messages = "; ".join(f"{f['name']}: {f['message']}" for f in run["flags"])
        console.print(f"  run {run['id']} ({overrides_text(run['overrides'])}): {messages}")


def print_analysis(console: Console, analysis: Mapping[str, Any]) -> None:
    """A sweep's analysis: groups over seeds, scaling laws, smallest widths, labels, flags."""
    console.print(
        f"sweep {analysis['sweep_id']} ({analysis['name']}): swept "
        f"{', '.join(analysis['swept']) or 'nothing'}; runs per state {analysis['status_counts']}"
    )
    _groups_table(console, analysis)
    _fits_table(console, analysis["fits"])
    for entry in analysis.get("smallest_width") or []:
        reached = ", ".join(f"m={w['width']}: {w['reached']}/{w['runs']}" for w in entry["widths"])
        console.print(
            f"loss threshold reached ({group_text(entry['group'])}): {reached}; smallest width "
            f"where all runs did: {entry['smallest_width_all']}"
        )
    if analysis.get("labels"):
        _labels_table(console, analysis["labels"])
    print_flags(console, analysis["runs"])
