"""The ``overparam`` command line. Heavy imports (torch, ray, the server) stay inside the
commands that need them, so ``overparam runs`` starts in a fraction of a second."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import socket
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from . import reports
from .client import DEFAULT_URL, OverparamClient, OverparamError, load_spec, save_token
from .tables import Column, fitted_table, number

app = typer.Typer(help="overparam: over-parameterization sweeps on Ray.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
app.add_typer(db_app, name="db")
admin_app = typer.Typer(
    help="Users and tokens, on the service's database (run where the service runs).",
    no_args_is_help=True,
)
app.add_typer(admin_app, name="admin")
console = Console()

UrlOption = Annotated[str, typer.Option("--url", envvar="OVERPARAM_URL", help="service base URL")]


def _client(url: str) -> OverparamClient:
    return OverparamClient(url)


def _fail(exc: Exception) -> NoReturn:
    """Print the error (its own words, unwrapped) and exit 1."""
    Console(stderr=True).print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(1)


def _need_server() -> None:
    """Stop with a clear message where only the client is installed: serve, dispatch, db and
    admin run the server's code (the ``overparam-server`` distribution: api, services, …)."""
    if importlib.util.find_spec("services") is None or importlib.util.find_spec("api") is None:
        _fail(
            RuntimeError(
                "this command needs the overparam server, which is not installed here (only "
                "the client is): in a checkout, `python3 bootstrap.py install` or "
                "`pip install ./client .`"
            )
        )


def invocation() -> tuple[str, str]:
    """(how to call this CLI from a shell here, how to put it on the PATH): ``overparam`` when
    the PATH finds this installation's script, else that script's path (``.venv/bin/overparam``)
    and its virtualenv's ``activate``; ``python -m overparam.cli`` without a script."""
    script = Path(sys.executable).with_name("overparam")
    if not script.exists():
        return f"{sys.executable} -m overparam.cli", ""
    found = shutil.which("overparam")
    if found and Path(found).resolve() == script.resolve():
        return "overparam", ""
    where = script.relative_to(Path.cwd()) if script.is_relative_to(Path.cwd()) else script
    return str(where), f"`source {where.parent / 'activate'}` puts overparam on your PATH"


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="API processes; more than 1 needs OVERPARAM_EMBEDDED_DISPATCHER=false and a "
            "dispatcher of its own (`overparam dispatch`)",
        ),
    ] = 1,
) -> None:
    """Run the service: API + dispatcher + local Ray (unless OVERPARAM_RAY_ADDRESS is set)."""
    _need_server()
    import os

    import uvicorn

    from services import logs
    from services.settings import get_settings

    settings = get_settings()
    logs.configure(settings.log_format)
    if workers > 1 and settings.embedded_dispatcher:
        console.print(
            "[red]error:[/red] --workers above 1 needs OVERPARAM_EMBEDDED_DISPATCHER=false: "
            "each worker would be a Ray driver and a dispatcher (run `overparam dispatch` "
            "once, beside the API; docs/deploy.md)"
        )
        raise typer.Exit(1)
    sock = listening_socket(host, port)  # before the database or Ray: a taken port stops here
    if settings.auth == "auto":  # the laptop needs no token; anything reachable from outside does
        loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
        settings = settings.model_copy(update={"auth": "off" if loopback else "required"})
    console.print(banner(settings, host, port))
    log_config = logs.log_config(settings.log_format)
    if workers > 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_directory(settings.data_dir))
    if workers == 1:
        from api.main import create_app

        config = uvicorn.Config(create_app(settings), log_level="info", log_config=log_config)
        uvicorn.Server(config).run(sockets=[sock])
        return
    from uvicorn.supervisors import Multiprocess

    # The workers read their settings from the environment; the resolved "auto" goes with it.
    os.environ["OVERPARAM_AUTH"] = settings.auth
    config = uvicorn.Config(
        "api.main:create_app",
        factory=True,
        workers=workers,
        log_level="info",
        log_config=log_config,
    )
    Multiprocess(config, sockets=[sock]).run()


def metrics_directory(data_dir: Path) -> Path:
    """Where several API workers keep their Prometheus counts (``PROMETHEUS_MULTIPROC_DIR``):
    the environment's choice, else ``<data_dir>/prometheus``; emptied of an earlier service's
    files (its counts would be added to this one's)."""
    import os

    directory = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or data_dir / "prometheus")
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    return directory


def banner(settings: Any, host: str, port: int) -> str:
    """What ``serve`` says when it starts (never a password)."""
    from sqlalchemy.engine import make_url

    command, hint = invocation()
    database = make_url(settings.database_url).render_as_string(hide_password=True)
    return (
        f"[bold]overparam[/bold] listening on http://{host}:{port}  "
        f"(database {database}, Ray {settings.ray_address or 'local'}, "
        f"API tokens {settings.auth}, API docs at http://{host}:{port}/docs)\n"
        f"Submit the example from another terminal: {command} submit "
        f"examples/quickstart.yaml --url http://{host}:{port}" + (f"\n({hint})" if hint else "")
    )


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), or a clear error and exit code 1."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        console.print(f"[red]error:[/red] cannot listen on {host}:{port}: {exc.strerror}")
        console.print("(is another overparam already running? --port chooses another port)")
        raise typer.Exit(1) from exc
    return sock


@app.command()
def dispatch() -> None:
    """Run a standalone dispatcher (the Ray driver) against OVERPARAM_DATABASE_URL."""
    _need_server()
    import asyncio
    import signal

    from services import logs, ray_cluster
    from services.db import make_engine, make_sessionmaker
    from services.dispatcher import Dispatcher
    from services.settings import get_settings

    settings = get_settings()
    logs.configure(settings.log_format)

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


@app.command()
def login(
    url: UrlOption = DEFAULT_URL,
    token: Annotated[
        str | None, typer.Option(help="the API token (default: asked, not echoed)")
    ] = None,
) -> None:
    """Check an API token against the service at --url and keep it for later commands (in
    ~/.config/overparam/credentials.json, readable by you only)."""
    token = token or typer.prompt("API token", hide_input=True)
    try:
        with OverparamClient(url, token=token) as client:
            who = client.me()
    except OverparamError as exc:
        _fail(exc)
    path = save_token(url, token)
    console.print(
        f"logged in to {url} as [bold]{who['name']}[/bold] ({who['role']}); token in {path}"
    )


@admin_app.command("create-user")
def admin_create_user(
    name: Annotated[str, typer.Argument(help="lower-case letters, digits, _ . -")],
    admin: Annotated[
        bool, typer.Option("--admin", help="an admin (manages users, quotas)")
    ] = False,
) -> None:
    """Make a user and print a first API token (shown once: keep it)."""
    token = _on_database(lambda db: _create_user(db, name, "admin" if admin else "member"))
    console.print(f"user {name} ({'admin' if admin else 'member'}); API token (shown once):")
    console.print(token, soft_wrap=True)


@admin_app.command("create-token")
def admin_create_token(
    name: Annotated[str, typer.Argument(help="the user's name")],
    label: Annotated[str, typer.Option(help="what the token is for")] = "cli",
) -> None:
    """Print a new API token for a user (shown once: keep it)."""
    _need_server()
    from services import users

    def make(db: Any) -> str:
        return users.create_token(
            db_session=db, user=users.get_user(db_session=db, name=name), name=label
        )

    console.print(_on_database(make), soft_wrap=True)


def _create_user(db: Any, name: str, role: str) -> str:
    from services import users

    return users.create_user(db_session=db, name=name, role=role)[1]


def _on_database(work: Any) -> Any:
    """``work(session)`` in one committed transaction on OVERPARAM_DATABASE_URL (migrated)."""
    _need_server()
    from services import migrate
    from services.db import make_engine, make_sessionmaker, session_scope
    from services.errors import Conflict, NotFound, SpecError
    from services.settings import get_settings

    url = get_settings().database_url
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        with session_scope(make_sessionmaker(engine)) as db:
            return work(db)
    except (SpecError, Conflict, NotFound) as exc:
        _fail(exc)
    finally:
        engine.dispose()


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: the latest)."""
    _need_server()
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
    _need_server()
    from services import migrate
    from services.settings import get_settings

    migrate.downgrade(get_settings().database_url, revision)
    console.print(f"database downgraded to {revision}")


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="sweep spec YAML")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="validate and show the expanded runs; submit nothing")
    ] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Submit a sweep spec file; prints the sweep id and its run ids."""
    try:
        body = load_spec(spec)
        with _client(url) as client:
            if dry_run:
                reports.print_plan(console, client.plan(body))
                return
            created = client.submit(body)
    except (OverparamError, ValueError) as exc:
        _fail(exc)
    console.print(
        f"sweep {created['id']} ({created['name']}): {created['run_count']} runs queued "
        f"(ids {created['run_ids'][0]}–{created['run_ids'][-1]})"
    )


@app.command()
def sweeps(
    limit: Annotated[int, typer.Option(help="how many, newest first")] = 100,
    owner: Annotated[str | None, typer.Option(help="only this user's sweeps")] = None,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """List sweeps, newest first, with their runs per state and owner."""
    try:
        with _client(url) as client:
            rows = client.sweeps(limit=limit, owner=owner)
    except OverparamError as exc:
        _fail(exc)
    reports.print_sweeps(console, rows)


@app.command()
def runs(
    sweep: Annotated[int | None, typer.Option(help="only this sweep's runs")] = None,
    status: Annotated[str | None, typer.Option(help="only runs in this state")] = None,
    owner: Annotated[str | None, typer.Option(help="only this user's runs")] = None,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """List runs with their state, summary and owner."""
    try:
        with _client(url) as client:
            rows = client.runs(sweep_id=sweep, status=status, owner=owner)
    except OverparamError as exc:
        _fail(exc)
    reports.print_runs(console, rows)


@app.command()
def run(run_id: int, url: UrlOption = DEFAULT_URL) -> None:
    """Show one run as JSON."""
    try:
        with _client(url) as client:
            console.print_json(json.dumps(client.run(run_id)))
    except OverparamError as exc:
        _fail(exc)


def _cancel_one(client: OverparamClient, run_id: int) -> bool:
    """Cancel one run and say what happened; False when the service refused."""
    try:
        run = client.cancel(run_id)
    except OverparamError as exc:
        Console(stderr=True).print(f"[red]run {run_id}:[/red] {exc}")
        return False
    state = run["status"]
    if state == "running":
        console.print(f"run {run_id}: cancel requested (the dispatcher stops it)")
    else:
        console.print(f"run {run_id}: {state}")
    return True


@app.command()
def cancel(
    run_ids: Annotated[list[int] | None, typer.Argument(help="run ids")] = None,
    sweep: Annotated[
        int | None, typer.Option(help="every queued or running run of this sweep")
    ] = None,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Cancel runs: queued ones at once, running ones by the dispatcher."""
    ids = list(run_ids or [])
    try:
        with _client(url) as client:
            if sweep is not None:
                active = client.runs(sweep_id=sweep)
                ids += [r["id"] for r in active if r["status"] in ("queued", "running")]
            if not ids:
                _fail(ValueError("nothing to cancel: give run ids or a --sweep with active runs"))
            ok = [_cancel_one(client, run_id) for run_id in ids]
    except OverparamError as exc:
        _fail(exc)
    if not all(ok):
        raise typer.Exit(1)


@app.command()
def metrics(
    run_id: int,
    name: Annotated[list[str] | None, typer.Option(help="metric name (repeatable)")] = None,
    csv_out: Annotated[
        bool, typer.Option("--csv", help="write CSV to stdout (the columns of `export`)")
    ] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Print a run's metric history as a table or as CSV."""
    try:
        with _client(url) as client:
            points = list(client.metrics(run_id, names=name))
    except OverparamError as exc:
        _fail(exc)
    if csv_out:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["run_id", "metric", "step", "value"])
        writer.writerows((run_id, p["metric"], p["step"], p["value"]) for p in points)
        return
    columns = [Column("metric"), Column("step", numeric=True), Column("value", numeric=True)]
    rows = [[p["metric"], str(p["step"]), number(p["value"])] for p in points]
    console.print(fitted_table(console, columns, rows))


@app.command()
def watch(sweep: int, url: UrlOption = DEFAULT_URL) -> None:
    """Live progress bars for every run of a sweep (step, loss, λ_min, state, ETA)."""
    from .watch import watch_sweep

    try:
        with _client(url) as client:
            counts = watch_sweep(client, sweep, console)
    except OverparamError as exc:
        _fail(exc)
    if counts.get("failed") or counts.get("diverged"):
        raise typer.Exit(1)


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
        reports.print_analysis(console, analysis)


def _plot_target(arguments: list[str], run_id: int | None) -> tuple[int | None, str]:
    """(sweep id or None, kind) from ``plot``'s positional arguments: SWEEP KIND, or KIND with
    --run."""
    expected = 1 if run_id is not None else 2
    if len(arguments) != expected:
        usage = "--run ID KIND" if run_id is not None else "SWEEP KIND"
        raise typer.BadParameter(f"usage: overparam plot {usage} -o FILE.png")
    if run_id is not None:
        return None, arguments[0]
    if not arguments[0].isdigit():
        raise typer.BadParameter(f"{arguments[0]!r} is not a sweep id", param_hint="SWEEP")
    return int(arguments[0]), arguments[1]


@app.command()
def plot(
    arguments: Annotated[
        list[str],
        typer.Argument(
            metavar="[SWEEP] KIND",
            help="a sweep id and a kind (loss, lambda_min, lambda0_ratio, scaling, movement); "
            "with --run, the kind only",
        ),
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="PNG file to write")],
    run_id: Annotated[int | None, typer.Option("--run", help="plot this run instead")] = None,
    color_by: Annotated[str | None, typer.Option(help="swept parameter to colour by")] = None,
    x: Annotated[str, typer.Option(help="scaling: swept parameter on the x axis")] = "width",
    y: Annotated[
        list[str] | None,
        typer.Option(help="scaling: a fitted quantity to draw (repeatable; see `analyze`)"),
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="scaling: loss threshold for steps to threshold")
    ] = None,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Write a sweep's (or with --run, one run's) plot, rendered by the service, to a PNG."""
    sweep, kind = _plot_target(arguments, run_id)
    try:
        with _client(url) as client:
            if sweep is None:
                assert run_id is not None
                png = client.run_plot(run_id, kind)
            else:
                png = client.plot(
                    sweep, kind, color_by=color_by, x=x, y=y, loss_threshold=threshold
                )
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


if __name__ == "__main__":  # `python -m overparam.cli` (`python -m client.cli` in a checkout)
    app()
