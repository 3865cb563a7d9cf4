"""The ``overparam`` command line. Heavy imports (torch, ray, the server) stay inside the
commands that need them, so ``overparam runs`` starts in a fraction of a second."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from client.client import DEFAULT_URL, OverparamClient, OverparamError, load_spec

app = typer.Typer(help="overparam: over-parameterization sweeps on Ray.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
app.add_typer(db_app, name="db")
console = Console()

UrlOption = Annotated[str, typer.Option("--url", envvar="OVERPARAM_URL", help="service base URL")]


def _client(url: str) -> OverparamClient:
    return OverparamClient(url)


def _fail(exc: Exception) -> None:
    Console(stderr=True).print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
) -> None:
    """Run the service: API + dispatcher + local Ray (unless OVERPARAM_RAY_ADDRESS is set)."""
    import logging

    import uvicorn

    from api.main import create_app
    from services.settings import get_settings

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = get_settings()
    console.print(
        f"[bold]overparam[/bold] listening on http://{host}:{port}  "
        f"(database {settings.database_url}, "
        f"Ray {settings.ray_address or 'local'}, API docs at http://{host}:{port}/docs)\n"
        f"Submit the example:  overparam submit examples/quickstart.yaml --url http://{host}:{port}"
    )
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


@app.command()
def dispatch() -> None:
    """Run a standalone dispatcher (the Ray driver) against OVERPARAM_DATABASE_URL."""
    import asyncio
    import logging
    import signal

    from services import ray_cluster
    from services.db import make_engine, make_sessionmaker
    from services.dispatcher import Dispatcher
    from services.settings import get_settings

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = get_settings()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        ray_cluster.connect(settings)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        engine = make_engine(settings.database_url)
        try:
            await Dispatcher(settings, make_sessionmaker(engine)).run(stop)
        finally:
            engine.dispose()
            ray_cluster.disconnect()

    asyncio.run(main())


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: the latest)."""
    from sqlalchemy import make_url

    from services import migrate
    from services.settings import get_settings

    url = get_settings().database_url
    migrate.upgrade(url, revision)
    console.print(
        f"database at {make_url(url).render_as_string(hide_password=True)} is at {revision}"
    )


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()] = "base") -> None:
    """Revert migrations down to REVISION (default: an empty database)."""
    from services import migrate
    from services.settings import get_settings

    migrate.downgrade(get_settings().database_url, revision)
    console.print(f"database downgraded to {revision}")


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="sweep spec YAML")],
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Submit a sweep spec file; prints the sweep id and its run ids."""
    try:
        with _client(url) as client:
            created = client.submit(load_spec(spec))
    except (OverparamError, ValueError) as exc:
        _fail(exc)
    console.print(
        f"sweep {created['id']} ({created['name']}): {created['run_count']} runs queued "
        f"(ids {created['run_ids'][0]}–{created['run_ids'][-1]})"
    )


@app.command()
def runs(
    sweep: Annotated[int | None, typer.Option(help="only this sweep's runs")] = None,
    status: Annotated[str | None, typer.Option(help="only runs in this state")] = None,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """List runs with their state and summary."""
    try:
        with _client(url) as client:
            rows = client.runs(sweep_id=sweep, status=status)
    except OverparamError as exc:
        _fail(exc)
    table = Table(
        "id", "sweep", "status", "overrides", "steps", "final loss", "λ_min(0)", "min λ_min"
    )
    for r in rows:
        s = r["summary"]
        table.add_row(
            str(r["id"]),
            _fmt(r["sweep_id"]),
            r["status"],
            " ".join(f"{k}={v}" for k, v in r["overrides"].items()),
            _fmt(s.get("steps_done")),
            _fmt(s.get("final_loss")),
            _fmt(s.get("lambda_min_initial")),
            _fmt(s.get("lambda_min_min")),
        )
    console.print(table)


@app.command()
def run(run_id: int, url: UrlOption = DEFAULT_URL) -> None:
    """Show one run as JSON."""
    try:
        with _client(url) as client:
            console.print_json(json.dumps(client.run(run_id)))
    except OverparamError as exc:
        _fail(exc)


@app.command()
def metrics(
    run_id: int,
    name: Annotated[list[str] | None, typer.Option(help="metric name (repeatable)")] = None,
    csv_out: Annotated[bool, typer.Option("--csv", help="write CSV to stdout")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Print a run's metric history as a table or as CSV."""
    try:
        with _client(url) as client:
            points = list(client.metrics(run_id, names=name))
    except OverparamError as exc:
        _fail(exc)
    if csv_out:
        writer = csv.writer(sys.stdout)
        writer.writerow(["metric", "step", "value"])
        writer.writerows((p["metric"], p["step"], p["value"]) for p in points)
        return
    table = Table("metric", "step", "value")
    for p in points:
        table.add_row(p["metric"], str(p["step"]), _fmt(p["value"]))
    console.print(table)


@app.command()
def watch(sweep: int, url: UrlOption = DEFAULT_URL) -> None:
    """Live progress bars for every run of a sweep (step, loss, λ_min, state, ETA)."""
    from client.watch import watch_sweep

    try:
        with _client(url) as client:
            counts = watch_sweep(client, sweep, console)
    except OverparamError as exc:
        _fail(exc)
    if counts.get("failed") or counts.get("diverged"):
        raise typer.Exit(1)


def _mean_std(stats: dict[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return ""
    if stats.get("std") is None:
        return _fmt(stats["mean"])
    return f"{_fmt(stats['mean'])} ± {stats['std']:.2g}"


def _group(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items()) or "all runs"


def _print_analysis(analysis: dict[str, Any]) -> None:
    console.print(
        f"sweep {analysis['sweep_id']} ({analysis['name']}): swept "
        f"{', '.join(analysis['swept']) or 'nothing'}; runs per state {analysis['status_counts']}"
    )
    runs = Table(
        "group", "runs", "final loss", "fitted rate", "theory rate", "steps to thr.",
        "min λ_min/λ_min(0)", title="runs grouped over seeds (mean ± std)",
    )  # fmt: skip
    for group in analysis["groups"]:
        stats = group["stats"]
        runs.add_row(
            _group(group["params"]),
            str(len(group["run_ids"])),
            _mean_std(stats.get("final_loss")),
            _mean_std(stats.get("fitted_rate")),
            _mean_std(stats.get("theory_rate")),
            _mean_std(stats.get("steps_to_threshold")),
            _mean_std(stats.get("lambda_min_min_ratio")),
        )
    console.print(runs)
    fits = Table(
        "x", "y", "group", "kind", "slope", "95% CI", "n", "r²", "theory",
        title="scaling laws (OLS on log–log axes; exponential: ln y against x)",
    )  # fmt: skip
    for fit in analysis["fits"]:
        ci = fit.get("ci")
        fits.add_row(
            fit["x"],
            fit["y"],
            _group(fit["group"]),
            fit["kind"],
            f"{fit['slope']:.3f}",
            f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "",
            str(fit["n_points"]),
            f"{fit['r2']:.3f}",
            _fmt(fit.get("reference_slope")),
        )
    console.print(fits)
    for entry in analysis.get("smallest_width") or []:
        reached = ", ".join(f"m={w['width']}: {w['reached']}/{w['runs']}" for w in entry["widths"])
        console.print(
            f"loss threshold reached ({_group(entry['group'])}): {reached}; smallest width "
            f"where all runs did: {entry['smallest_width_all']}"
        )
    labels = analysis.get("labels")
    if labels:
        table = Table(
            labels["param"], "group", "yᵀ(H^∞)⁻¹y", "fitted rate", "steps to thr.",
            title="true vs random labels",
        )  # fmt: skip
        for comparison in labels["comparisons"]:
            for row in comparison["rows"]:
                table.add_row(
                    str(row["value"]),
                    _group(comparison["group"]),
                    _mean_std(row["y_Hinv_y"]),
                    _mean_std(row["fitted_rate"]),
                    _mean_std(row["steps_to_threshold"]),
                )
        console.print(table)


@app.command()
def analyze(
    sweep: int,
    threshold: Annotated[
        float | None, typer.Option(help="loss threshold (default: config, else 1e-3·L(0))")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the analysis as JSON")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Print a sweep's analysis: runs over seeds, scaling-law fits, smallest widths, labels."""
    try:
        with _client(url) as client:
            analysis = client.sweep_analysis(sweep, loss_threshold=threshold)
    except OverparamError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(analysis))
    else:
        _print_analysis(analysis)


@app.command()
def plot(
    sweep: int,
    kind: Annotated[str, typer.Argument(help="loss, lambda_min, scaling or movement")],
    out: Annotated[Path, typer.Option("-o", "--out", help="PNG file to write")],
    color_by: Annotated[str | None, typer.Option(help="swept parameter to colour by")] = None,
    x: Annotated[str, typer.Option(help="scaling: swept parameter on the x axis")] = "width",
    threshold: Annotated[
        float | None, typer.Option(help="scaling: loss threshold for steps to threshold")
    ] = None,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Write a sweep plot (rendered by the service) to a PNG file."""
    try:
        with _client(url) as client:
            png = client.plot(sweep, kind, color_by=color_by, x=x, loss_threshold=threshold)
    except OverparamError as exc:
        _fail(exc)
    out.write_bytes(png)
    console.print(f"wrote {out} ({len(png)} bytes)")


@app.command()
def export(
    out: Annotated[Path, typer.Option("-o", "--out", help="file to write")],
    sweep: Annotated[int | None, typer.Option(help="every run of this sweep")] = None,
    run_id: Annotated[int | None, typer.Option("--run", help="this run")] = None,
    format: Annotated[
        str | None, typer.Option(help="csv or parquet (default: from the file suffix)")
    ] = None,
    name: Annotated[list[str] | None, typer.Option(help="metric name (repeatable)")] = None,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Export metrics (columns run_id, metric, step, value) as CSV or Parquet."""
    if (sweep is None) == (run_id is None):
        _fail(ValueError("give exactly one of --sweep and --run"))
    kind = format or ("parquet" if out.suffix.lower() in (".parquet", ".pq") else "csv")
    try:
        with _client(url) as client:
            size = client.export(out, run_id=run_id, sweep_id=sweep, format=kind, names=name)
    except OverparamError as exc:
        out.unlink(missing_ok=True)
        _fail(exc)
    console.print(f"wrote {out} ({size} bytes, {kind})")
