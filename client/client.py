"""A small synchronous client for the overparam REST API.

Metric histories come back as :class:`MetricPoints` (iterate dicts, or ``.to_pandas()`` with
the ``pandas`` extra); live streams as :class:`ServerEvent` iterators that reconnect with
``Last-Event-ID`` and so never miss or repeat a point.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml

if TYPE_CHECKING:
    import pandas

DEFAULT_URL = "http://127.0.0.1:8000"


class OverparamError(Exception):
    """A problem+json answer from the service, or no answer at all (status 0)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        title, detail = problem.get("title", "error"), problem.get("detail", "")
        lines = [f"{title}: {detail}" if status == 0 else f"{status} {title}: {detail}"]
        lines += [
            f"  {e['field']} = {e.get('value')!r}: {e['reason']}" for e in problem.get("errors", [])
        ]
        super().__init__("\n".join(lines))


def unreachable(base_url: object, exc: Exception) -> OverparamError:
    """The error for a service that does not answer, with how to start one or point at one."""
    service = str(base_url).removesuffix("/").removesuffix("/api/v1")
    detail = (
        f"no overparam service answers at {service} ({exc}). Start one with `overparam serve` "
        "(or `python3 bootstrap.py serve`), or point --url / OVERPARAM_URL at a running one."
    )
    return OverparamError(0, {"title": "Unreachable", "detail": detail})


class SpecFileError(ValueError):
    """A sweep spec file that is not a YAML mapping; the message is one line, file:line:col."""


def load_spec(path: Path) -> dict[str, Any]:
    """A sweep spec file: YAML (or JSON, which is YAML) with the body of POST /api/v1/sweeps."""
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        raise SpecFileError(f"{where}: {what}") from None
    except yaml.YAMLError as exc:
        raise SpecFileError(f"{path}: {' '.join(str(exc).split())}") from None
    if not isinstance(spec, dict):
        raise SpecFileError(f"{path}: a sweep spec is a mapping, got {type(spec).__name__}")
    return spec


NON_FINITE = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def _pandas() -> Any:
    try:
        import pandas
    except ImportError as exc:
        raise ImportError("DataFrames need pandas: pip install 'overparam[pandas]'") from exc
    return pandas


class MetricPoints(Iterable[dict[str, Any]]):
    """Metric points as dicts ({"metric", "step", "value"}, plus "run_id" for a sweep).

    Iterating fetches the pages anew each time; ``next()`` walks one shared pass (so code that
    treated the old generator as an iterator keeps working). Values are as the API sends them:
    numbers, or "NaN" / "Infinity" / "-Infinity".
    """

    def __init__(self, pages: Callable[[], Iterator[dict[str, Any]]]) -> None:
        self._pages = pages
        self._pass: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._pages()

    def __next__(self) -> dict[str, Any]:
        if self._pass is None:
            self._pass = self._pages()
        return next(self._pass)

    def to_pandas(self, wide: bool = False) -> pandas.DataFrame:
        """Long format (columns [run_id,] metric, step, value as float64 with NaN/±inf), or
        ``wide``: one row per ([run_id,] step), one column per metric."""
        pd = _pandas()
        rows = [
            p | {"value": NON_FINITE.get(p["value"], p["value"])}
            if isinstance(p["value"], str)
            else p
            for p in self
        ]
        columns = ["run_id", "metric", "step", "value"]
        frame = pd.DataFrame(rows, columns=columns if rows and "run_id" in rows[0] else columns[1:])
        frame["value"] = frame["value"].astype("float64")
        if not wide:
            return frame
        index = ["run_id", "step"] if "run_id" in frame.columns else ["step"]
        return frame.pivot_table(index=index, columns="metric", values="value", aggfunc="first")


@dataclass(frozen=True)
class ServerEvent:
    """One Server-Sent Event: ``event`` (metrics, status, end), its JSON ``data`` and ``id``."""

    event: str
    data: Any
    id: str | None


def parse_sse(lines: Iterable[str]) -> Iterator[ServerEvent]:
    """Events of a text/event-stream, line by line (comments and ``retry`` are skipped)."""
    event, event_id = "message", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    payload: Any = json.loads(text)
                except ValueError:
                    payload = text
                yield ServerEvent(event, payload, event_id)
            event, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value


def credentials_file() -> Path:
    """Where ``overparam login`` keeps tokens, one per service URL (mode 0600)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "overparam" / "credentials.json"


def saved_token(base_url: str) -> str | None:
    """The token ``overparam login`` saved for ``base_url``, if any."""
    try:
        saved = json.loads(credentials_file().read_text())
    except (OSError, ValueError):
        return None
    token = saved.get(base_url.rstrip("/"))
    return token if isinstance(token, str) else None


def save_token(base_url: str, token: str) -> Path:
    """Keep ``token`` for ``base_url``, readable by this user only."""
    path = credentials_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    saved[base_url.rstrip("/")] = token
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(saved, out, indent=2)
    os.chmod(path, 0o600)
    return path


class OverparamClient:
    """``token``: an API token (default: ``OVERPARAM_TOKEN``, else the one ``overparam login``
    saved for ``base_url``; none is needed by a service on a laptop)."""

    def __init__(
        self, base_url: str = DEFAULT_URL, timeout: float = 30.0, token: str | None = None
    ) -> None:
        token = token or os.environ.get("OVERPARAM_TOKEN") or saved_token(base_url)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=base_url.rstrip("/") + "/api/v1", timeout=timeout, headers=headers
        )

    def __enter__(self) -> OverparamClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise unreachable(self.http.base_url, exc) from exc
        if response.is_error:
            self._raise(response)
        return response.json()

    def me(self) -> dict[str, Any]:
        """The user this client's token belongs to (the local user on a laptop)."""
        return self._call("GET", "/me")

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/sweeps", json=spec)

    def plan(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Validate and expand a spec without submitting it: ``{"name", "run_count", "runs"}``,
        each run with its ``overrides``, full ``config`` and ``resources``."""
        return self._call("POST", "/sweeps", json=spec, params={"dry_run": True})

    def sweep(self, sweep_id: int) -> dict[str, Any]:
        return self._call("GET", f"/sweeps/{sweep_id}")

    def sweeps(self, limit: int = 100, owner: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit} | ({"owner": owner} if owner else {})
        return self._call("GET", "/sweeps", params=params)["data"]

    def run(self, run_id: int) -> dict[str, Any]:
        return self._call("GET", f"/runs/{run_id}")

    def runs(
        self,
        sweep_id: int | None = None,
        status: str | None = None,
        limit: int = 1000,
        fields: Sequence[str] = (),
        owner: str | None = None,
    ) -> list[dict[str, Any]]:
        """Runs in id order; ``fields`` ("config", "manifest") adds what lists leave out."""
        params: dict[str, Any] = {"limit": limit, "fields": list(fields)}
        if owner is not None:
            params["owner"] = owner
        if sweep_id is not None:
            params["sweep_id"] = sweep_id
        if status is not None:
            params["status"] = status
        return self._call("GET", "/runs", params=params)["data"]

    def cancel(self, run_id: int) -> dict[str, Any]:
        return self._call("POST", f"/runs/{run_id}/cancel")

    def create_run(
        self, config: dict[str, Any], external: bool = True, name: str = "run"
    ) -> dict[str, Any]:
        """A run logged to by this client (``external``), or one queued for the cluster."""
        body = {"config": config, "external": external, "name": name}
        return self._call("POST", "/runs", json=body)

    def start_run(
        self,
        name: str = "run",
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        experiment: str | None = None,
        source: bool | Mapping[str, Any] = True,
    ) -> ExternalRun:
        """An external run this script logs to (MLflow's ``start_run``): ``params`` its
        hyper-parameters (stored as the run's config), ``tags`` short strings, ``experiment``
        the named group it joins (created on first use). ``source``: the calling script's path,
        git commit and python/torch versions (:func:`script_source`), stored in the run's
        manifest under ``client``; False sends none. As a context manager the handle finishes
        the run: succeeded, or failed with the exception that left the block."""
        body: dict[str, Any] = {"config": dict(params or {}), "external": True, "name": name}
        if tags:
            body["tags"] = dict(tags)
        if experiment is not None:
            body["experiment"] = experiment
        if source:
            body["source"] = dict(source) if isinstance(source, Mapping) else script_source()
        return ExternalRun(self, self._call("POST", "/runs", json=body))

    def log_ntk(
        self,
        run_id: int,
        model: Any,
        X: Any,
        step: int,
        method: str = "auto",
        outputs: str = "mean",
    ) -> tuple[float, float]:
        """Log λ_min and λ_max of ``model``'s empirical NTK Gram at the samples ``X`` (a torch
        module and tensor; see :mod:`overparam.ntk`) as ``ntk_lambda_min`` / ``ntk_lambda_max``
        at ``step``; answers (λ_min, λ_max). Imports torch on first use only."""
        from .ntk import LAMBDA_MAX, LAMBDA_MIN, extremes

        low, high = extremes(model, X, method=method, outputs=outputs)  # type: ignore[arg-type]
        self.log_metrics(run_id, {LAMBDA_MIN: low, LAMBDA_MAX: high}, step)
        return low, high

    def log_metrics(self, run_id: int, metrics: dict[str, float], step: int) -> dict[str, Any]:
        """One step of several metrics (MLflow's ``log_metrics``); batch with :meth:`log_series`."""
        series = {name: ([step], [value]) for name, value in metrics.items()}
        return self.log_series(run_id, series)

    def log_series(
        self, run_id: int, series: Mapping[str, tuple[Sequence[int], Sequence[float]]]
    ) -> dict[str, Any]:
        """Many steps of many metrics in one request: ``{name: (steps, values)}``. NaN and ±inf
        are sent as "NaN"/"Infinity"/"-Infinity"; re-sent points are ignored by the server.
        Answers ``{"received", "stored"}``."""
        body = [
            {"metric": name, "steps": list(steps), "values": [_json_float(v) for v in values]}
            for name, (steps, values) in series.items()
        ]
        return self._call("POST", f"/runs/{run_id}/metrics", json={"series": body})

    def finish(
        self,
        run_id: int,
        status: str = "succeeded",
        summary: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        """End an external run (once): succeeded, diverged, failed or cancelled."""
        body = {"status": status, "summary": summary or {}, "error": error}
        return self._call("POST", f"/runs/{run_id}/finish", json=body)

    def metric_names(self, run_id: int) -> list[str]:
        return self._call("GET", f"/runs/{run_id}/metric-names")["data"]

    def metrics(
        self,
        run_id: int,
        names: list[str] | None = None,
        start: int | None = None,
        end: int | None = None,
        page_size: int = 10_000,
    ) -> MetricPoints:
        """Every point (following the keyset cursor), ordered by (metric, step)."""
        params = _query(names, start, end) | {"limit": page_size}
        return MetricPoints(lambda: self._pages(f"/runs/{run_id}/metrics", params))

    def sweep_metrics(
        self,
        sweep_id: int,
        names: list[str] | None = None,
        start: int | None = None,
        end: int | None = None,
        page_size: int = 10_000,
    ) -> MetricPoints:
        """Every point of every run of a sweep, ordered by (run, metric, step)."""
        params = _query(names, start, end) | {"limit": page_size}
        return MetricPoints(lambda: self._pages(f"/sweeps/{sweep_id}/metrics", params))

    def metrics_frame(
        self, run_id: int, names: list[str] | None = None, wide: bool = False
    ) -> pandas.DataFrame:
        """A run's metrics as a pandas DataFrame (see :meth:`MetricPoints.to_pandas`)."""
        return self.metrics(run_id, names=names).to_pandas(wide=wide)

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        params = dict(params)
        while True:
            page = self._call("GET", path, params=params)
            yield from page["data"]
            if not page["next_cursor"]:
                return
            params["cursor"] = page["next_cursor"]

    def run_analysis(
        self, run_id: int, loss_threshold: float | None = None, recompute: bool = False
    ) -> dict[str, Any]:
        """Fitted rate vs theory, steps to threshold, λ_min, movement, regime checks."""
        params = _analysis_params(loss_threshold, recompute)
        return self._call("GET", f"/runs/{run_id}/analysis", params=params)

    def sweep_analysis(
        self, sweep_id: int, loss_threshold: float | None = None, recompute: bool = False
    ) -> dict[str, Any]:
        """Groups over seeds, scaling-law fits with intervals, smallest widths, labels."""
        params = _analysis_params(loss_threshold, recompute)
        return self._call("GET", f"/sweeps/{sweep_id}/analysis", params=params)

    def fits_frame(self, sweep_id: int) -> pandas.DataFrame:
        """A sweep's scaling-law fits, one row per fit (ci split into ci_low, ci_high)."""
        fits = self.sweep_analysis(sweep_id)["fits"]
        rows = [
            {k: v for k, v in f.items() if k not in ("ci", "run_ids")}
            | {"ci_low": (f["ci"] or [None])[0], "ci_high": (f["ci"] or [None, None])[1]}
            for f in fits
        ]
        return _pandas().DataFrame(rows)

    def plot(self, sweep_id: int, kind: str, **params: Any) -> bytes:
        """A sweep plot as PNG bytes (kind: loss, lambda_min, lambda0_ratio, scaling,
        movement; params: color_by, x, y, loss_threshold)."""
        return self._bytes(f"/sweeps/{sweep_id}/plots/{kind}", params)

    def run_plot(self, run_id: int, kind: str) -> bytes:
        """A run plot as PNG bytes (kind: loss, lambda_min, lambda0_ratio, movement)."""
        return self._bytes(f"/runs/{run_id}/plots/{kind}", {})

    def _bytes(self, path: str, params: dict[str, Any]) -> bytes:
        params = {k: v for k, v in params.items() if v is not None}
        try:
            response = self.http.get(path, params=params)
        except httpx.TransportError as exc:
            raise unreachable(self.http.base_url, exc) from exc
        if response.is_error:
            self._raise(response)
        return response.content

    def export(
        self,
        out: Path,
        *,
        run_id: int | None = None,
        sweep_id: int | None = None,
        format: str = "csv",
        names: list[str] | None = None,
    ) -> int:
        """Download a run's or a sweep's points as CSV or Parquet into ``out``; bytes written."""
        if (run_id is None) == (sweep_id is None):
            raise ValueError("export needs exactly one of run_id and sweep_id")
        path = f"/runs/{run_id}" if run_id is not None else f"/sweeps/{sweep_id}"
        params = _query(names, None, None) | {"format": format}
        written = 0
        try:
            with self.http.stream("GET", f"{path}/metrics/export", params=params) as response:
                if response.is_error:
                    response.read()
                    self._raise(response)
                with out.open("wb") as sink:
                    for chunk in response.iter_bytes():
                        written += sink.write(chunk)
        except httpx.TransportError as exc:
            raise unreachable(self.http.base_url, exc) from exc
        return written

    def stream_run(self, run_id: int, names: list[str] | None = None) -> Iterator[ServerEvent]:
        """Live events of a run (SSE): ``metrics``, ``status``, finally ``end``."""
        return self._events(f"/runs/{run_id}/metrics/stream", _query(names, None, None))

    def stream_sweep(self, sweep_id: int, names: list[str] | None = None) -> Iterator[ServerEvent]:
        """Live events of every run of a sweep (SSE): ``metrics``, ``status``, then ``end``."""
        return self._events(f"/sweeps/{sweep_id}/stream", _query(names, None, None))

    def _events(self, path: str, params: dict[str, Any], retries: int = 5) -> Iterator[ServerEvent]:
        """Follow a stream until ``end``, reconnecting with Last-Event-ID when it drops."""
        last_id: str | None = None
        failures = 0
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with self.http.stream(
                    "GET", path, params=params, headers=headers, timeout=httpx.Timeout(60.0)
                ) as response:
                    if response.is_error:
                        response.read()
                        self._raise(response)
                    for event in parse_sse(response.iter_lines()):
                        failures = 0
                        if event.id:
                            last_id = event.id
                        yield event
                        if event.event == "end":
                            return
            except httpx.TransportError as exc:
                failures += 1
                if failures > retries:
                    raise OverparamError(
                        0, {"title": "Stream lost", "detail": f"{path}: {exc}"}
                    ) from exc
                time.sleep(min(2.0, 0.2 * 2**failures))

    def _raise(self, response: httpx.Response) -> None:
        try:
            problem = response.json()
        except ValueError:
            problem = {"title": response.reason_phrase, "detail": response.text[:500]}
        raise OverparamError(response.status_code, problem)


class ExternalRun:
    """A handle on an external run (from :meth:`OverparamClient.start_run`): ``id``, ``info``
    (the run as created), ``log``, ``log_ntk`` and ``finish``."""

    def __init__(self, client: OverparamClient, info: dict[str, Any]) -> None:
        self.client = client
        self.info = info
        self.id: int = info["id"]

    def __enter__(self) -> ExternalRun:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: Any) -> None:
        if self.info.get("status") != "running":
            return
        if exc is None:
            self.finish()
        else:
            self.finish("failed", error=f"{kind.__name__ if kind else 'error'}: {exc}")

    def log(self, metrics: dict[str, float], step: int) -> dict[str, Any]:
        """One step of several metrics."""
        return self.client.log_metrics(self.id, metrics, step)

    def log_ntk(
        self, model: Any, X: Any, step: int, method: str = "auto", outputs: str = "mean"
    ) -> tuple[float, float]:
        """λ_min and λ_max of ``model``'s NTK Gram at ``X``, logged at ``step``."""
        return self.client.log_ntk(self.id, model, X, step, method=method, outputs=outputs)

    def finish(
        self,
        status: str = "succeeded",
        summary: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        """End the run (once)."""
        self.info = self.client.finish(self.id, status, summary=summary, error=error)
        return self.info


def script_source(script: str | None = None) -> dict[str, Any]:
    """What ran: the script's path (default ``sys.argv[0]``), the git commit of the repository
    it lies in (``git rev-parse HEAD`` there; left out outside a repository), whether that
    checkout had uncommitted changes, and the python and torch versions (torch only if the
    script imported it)."""
    import platform
    import subprocess
    import sys

    path = Path(script if script is not None else (sys.argv[0] or ".")).resolve()
    source: dict[str, Any] = {"script": str(path), "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None:
        source["torch"] = str(getattr(torch, "__version__", "unknown"))
    where = path.parent if path.is_file() else path
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0 and commit.stdout.strip():
            source["git_commit"] = commit.stdout.strip()
            status = subprocess.run(
                ["git", "status", "--porcelain"],
                cwd=where,
                capture_output=True,
                text=True,
                timeout=10,
            )
            source["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return source


def _json_float(value: float) -> float | str:
    value = float(value)
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _query(names: list[str] | None, start: int | None, end: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if names:
        params["name"] = names
    if start is not None:
        params["start"] = start
    if end is not None:
        params["end"] = end
    return params


def _analysis_params(loss_threshold: float | None, recompute: bool) -> dict[str, Any]:
    params: dict[str, Any] = {"recompute": recompute}
    if loss_threshold is not None:
        params["loss_threshold"] = loss_threshold
    return params
