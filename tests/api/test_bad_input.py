"""The bad-input battery (issue 11), on SQLite and PostgreSQL: every malformed request gets a 4xx
``application/problem+json`` that names the offending field (in ``errors[].field``, or in
``detail`` for a body that does not parse), nothing is stored or changed, and the server's
memory stays bounded.

Each class of bad input is one test per backend; a class's cases all run against one service
(an external run with a point, a queued sweep and a dataset), and every failing case of the
class is reported at once.
"""

from __future__ import annotations

import base64
import io
import json
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from numpy.lib import format as npy_format
from sqlalchemy import Engine, text

from services.db import make_engine

V1 = "/api/v1"
RSS_GROWTH_BOUND = 256 * 2**20  # bytes over the resident size at the class's start
INT32_OVER, INT64_OVER, HUGE = 2**31, 2**63, 2**70


def body(value: Any) -> bytes:
    """JSON as a client may send it: NaN/Infinity literals and \\u escapes (lone surrogates
    and NUL) as Python's json module writes them."""
    return json.dumps(value).encode()


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


@dataclass(frozen=True)
class Case:
    """One bad request; ``field`` is what the problem must name. ``path`` may hold the ids
    ``{ext}`` (an external running run), ``{done}`` (a finished one), ``{sweep}`` (whose one
    run is cancelled: a stream accepted by mistake ends instead of hanging the test) and
    ``{dataset}``."""

    label: str
    method: str
    path: str
    field: str
    content: bytes | None = None
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def post(label: str, path: str, field: str, payload: Any, **kw: Any) -> Case:
    return Case(label, "POST", path, field, body(payload), **kw)


def post_raw(label: str, path: str, field: str, raw: str | bytes, **kw: Any) -> Case:
    data = raw.encode() if isinstance(raw, str) else raw
    return Case(label, "POST", path, field, data, **kw)


def get(label: str, path: str, field: str, **params: Any) -> Case:
    return Case(label, "GET", path, field, params=params)


NAN, INF = float("nan"), float("inf")
SPEC = {"name": "bad", "base": {"data": {"n": 8, "d": 4}, "steps": 10}}


def spec_with(**base: Any) -> dict[str, Any]:
    return SPEC | {"base": SPEC["base"] | base}


def data_with(**data: Any) -> dict[str, Any]:
    return spec_with(data={"n": 8, "d": 4} | data)


NONFINITE = [
    post("width NaN", "/sweeps", "base.width", spec_with(width=NAN)),
    post("init_scale Infinity", "/sweeps", "base.init_scale", spec_with(init_scale=INF)),
    post("lr NaN", "/sweeps", "base.lr", spec_with(lr=NAN)),
    post(
        "divergence_bound Infinity",
        "/sweeps",
        "base.divergence_bound",
        spec_with(divergence_bound=INF),
    ),
    post(
        "max_wall_time_s Infinity",
        "/sweeps",
        "base.max_wall_time_s",
        spec_with(max_wall_time_s=INF),
    ),
    post(
        "loss_threshold -Infinity", "/sweeps", "base.loss_threshold", spec_with(loss_threshold=-INF)
    ),
    post("label_noise NaN", "/sweeps", "base.data.label_noise", data_with(label_noise=NAN)),
    post("grid value NaN", "/sweeps", "grid.lr[1]", SPEC | {"grid": {"lr": [0.1, NAN]}}),
    post(
        "runs value Infinity",
        "/sweeps",
        "runs[0].divergence_bound",
        SPEC | {"runs": [{"divergence_bound": INF}]},
    ),
    post("resources NaN", "/sweeps", "resources.cpus", SPEC | {"resources": {"cpus": NAN}}),
    post("dry run NaN", "/sweeps", "base.c_res", spec_with(c_res=NAN), params={"dry_run": True}),
    post("queued run config NaN", "/runs", "config.init_scale", {"config": {"init_scale": NAN}}),
    post("dataset X NaN", "/datasets", "X[0][1]", {"name": "d", "X": [[1, NAN]], "y": [1]}),
    post(
        "batch step NaN",
        "/runs/{ext}/metrics",
        "points[0].step",
        {"points": [{"metric": "m", "step": NAN, "value": 1}]},
    ),
    post_raw("lr 1e400 (parses as inf)", "/sweeps", "base.lr", '{"base": {"lr": 1e400}}'),
    post_raw("5,000-digit integer", "/sweeps", "body", '{"base": {"width": 1' + "0" * 5000 + "}}"),
    get("analysis threshold inf", "/runs/{ext}/analysis", "loss_threshold", loss_threshold="inf"),
    get("plot threshold nan", "/sweeps/{sweep}/plots/loss", "loss_threshold", loss_threshold="nan"),
]

ID_ROUTES = [
    ("GET", "/runs/{id}", "run_id"),
    ("POST", "/runs/{id}/cancel", "run_id"),
    ("GET", "/runs/{id}/metrics", "run_id"),
    ("GET", "/runs/{id}/metric-names", "run_id"),
    ("GET", "/runs/{id}/metrics/export", "run_id"),
    ("GET", "/runs/{id}/metrics/stream", "run_id"),
    ("GET", "/runs/{id}/analysis", "run_id"),
    ("GET", "/runs/{id}/plots/loss", "run_id"),
    ("GET", "/sweeps/{id}", "sweep_id"),
    ("GET", "/sweeps/{id}/metrics", "sweep_id"),
    ("GET", "/sweeps/{id}/metrics/export", "sweep_id"),
    ("GET", "/sweeps/{id}/stream", "sweep_id"),
    ("GET", "/sweeps/{id}/analysis", "sweep_id"),
    ("GET", "/sweeps/{id}/plots/loss", "sweep_id"),
    ("GET", "/datasets/{id}", "dataset_id"),
    ("GET", "/datasets/{id}/arrays", "dataset_id"),
    ("DELETE", "/datasets/{id}", "dataset_id"),
]
BIG_IDS = [
    Case(f"{method} {path} id {big}", method, path.replace("{id}", str(big)), name)
    for method, path, name in ID_ROUTES
    for big in (INT32_OVER, INT64_OVER, HUGE)
] + [
    post("finish id 2^63", f"/runs/{INT64_OVER}/finish", "run_id", {"status": "failed"}),
    post(
        "log id 2^31",
        f"/runs/{INT32_OVER}/metrics",
        "run_id",
        {"points": [{"metric": "m", "step": 1, "value": 1}]},
    ),
    get("runs sweep_id 2^31", "/runs", "sweep_id", sweep_id=INT32_OVER),
    get("runs sweep_id 2^63", "/runs", "sweep_id", sweep_id=INT64_OVER),
    get("run id 0", "/runs/0", "run_id"),
    get("sweep id -1", "/sweeps/-1", "sweep_id"),
]

OFFSETS = [
    get(f"{path} {name}={value}", path, name, **{name: value})
    for path in ("/runs", "/sweeps", "/datasets")
    for name, value in (("offset", INT64_OVER), ("offset", HUGE), ("limit", INT64_OVER))
] + [
    get("metrics start 2^70", "/runs/{ext}/metrics", "start", start=HUGE),
    get("metrics end 2^64", "/runs/{ext}/metrics", "end", end=2**64),
    get("metrics limit 2^63", "/runs/{ext}/metrics", "limit", limit=INT64_OVER),
    get("stream after 2^63", "/runs/{done}/metrics/stream", "after", after=INT64_OVER),
]


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


def cursor(*parts: Any) -> str:
    return b64(json.dumps(parts).encode())


CURSORS = [
    get("garbage", "/runs/{ext}/metrics", "cursor", cursor="not-a-cursor!"),
    get("not base64 JSON", "/runs/{ext}/metrics", "cursor", cursor=b64(b"\xff\xfe\x00")),
    get("object", "/runs/{ext}/metrics", "cursor", cursor=b64(b'{"a": 1}')),
    get("two parts", "/runs/{ext}/metrics", "cursor", cursor=cursor(1, 1)),
    get("floats", "/runs/{ext}/metrics", "cursor", cursor=cursor(1.5, 1, 1)),
    get("booleans", "/runs/{ext}/metrics", "cursor", cursor=cursor(True, True, True)),
    get("NaN", "/runs/{ext}/metrics", "cursor", cursor=b64(b"[NaN, 1, 1]")),
    get("run 2^31", "/runs/{ext}/metrics", "cursor", cursor=cursor(INT32_OVER, 1, 1)),
    get("metric 2^63", "/runs/{ext}/metrics", "cursor", cursor=cursor(1, INT64_OVER, 1)),
    get("step 2^70", "/runs/{ext}/metrics", "cursor", cursor=cursor(1, 1, HUGE)),
    get("negative step", "/runs/{ext}/metrics", "cursor", cursor=cursor(1, 1, -5)),
    get("another run's", "/runs/{ext}/metrics", "cursor", cursor=cursor(999, 1, 1)),
    get("nested deep", "/runs/{ext}/metrics", "cursor", cursor=b64(nested(140).encode())),
    get("sweep: another run's", "/sweeps/{sweep}/metrics", "cursor", cursor=cursor(999, 1, 1)),
    get("too long", "/runs/{ext}/metrics", "cursor", cursor="A" * 10_000),
    Case(
        "run event id",
        "GET",
        "/runs/{done}/metrics/stream",
        "Last-Event-ID",
        headers={"Last-Event-ID": "12x"},
    ),
    Case(
        "run event id 2^63",
        "GET",
        "/runs/{done}/metrics/stream",
        "Last-Event-ID",
        headers={"Last-Event-ID": str(INT64_OVER)},
    ),
    Case(
        "sweep event id",
        "GET",
        "/sweeps/{sweep}/stream",
        "Last-Event-ID",
        headers={"Last-Event-ID": "garbage"},
    ),
    Case(
        "sweep event id: a compressed bomb",
        "GET",
        "/sweeps/{sweep}/stream",
        "Last-Event-ID",
        headers={"Last-Event-ID": b64(zlib.compress(b"1:1," * 6_000_000, 9))},
    ),
    Case(
        "sweep event id: run 2^63",
        "GET",
        "/sweeps/{sweep}/stream",
        "Last-Event-ID",
        headers={"Last-Event-ID": b64(zlib.compress(f"{INT64_OVER}:1".encode()))},
    ),
]


def deep_cases(depth: int) -> list[Case]:
    deep = nested(depth)
    return [
        post_raw(f"base {depth}", "/sweeps", "base", f'{{"base": {{"width": {deep}}}}}'),
        post_raw(
            f"base value {depth}",
            "/sweeps",
            "base",
            f'{{"base": {{"data": {{"classes": {deep}}}}}}}',
        ),
        post_raw(f"grid {depth}", "/sweeps", "grid", f'{{"grid": {{"width": [{deep}]}}}}'),
        post_raw(f"runs {depth}", "/sweeps", "runs", f'{{"runs": [{{"lr": {deep}}}]}}'),
        post_raw(
            f"external config {depth}",
            "/runs",
            "config",
            f'{{"external": true, "config": {{"a": {deep}}}}}',
        ),
        post_raw(f"queued config {depth}", "/runs", "config", f'{{"config": {{"a": {deep}}}}}'),
        post_raw(
            f"summary {depth}",
            "/runs/{ext}/finish",
            "summary",
            f'{{"status": "failed", "summary": {{"a": {deep}}}}}',
        ),
        post_raw(f"dataset X {depth}", "/datasets", "X", f'{{"name": "d", "X": {deep}, "y": [1]}}'),
        post_raw(  # parsed by pydantic-core, whose JSON parser stops at its recursion limit
            f"batch {depth}",
            "/runs/{ext}/metrics",
            "body",
            f'{{"points": [{{"metric": "m", "step": 1, "value": {deep}}}]}}',
        ),
    ]


DEEP_JSON = (
    deep_cases(500)
    + deep_cases(900)
    + [
        post_raw("sweep body 5000", "/sweeps", "body", nested(5000)),
        post_raw("run body 5000", "/runs", "body", '{"config": ' + nested(5000) + "}"),
        post_raw("dataset body 5000", "/datasets", "body", nested(5000)),
    ]
)


def query(text: str) -> str:
    """``text`` percent-encoded as UTF-8, a lone surrogate as its three bytes (as a careless
    client sends it; httpx refuses to)."""
    return quote(text, errors="surrogatepass")


# A metric batch is parsed by pydantic-core, which refuses a lone surrogate's escape as invalid
# JSON (the problem names the body and the column); NUL reaches the field's own check.
BATCH_TEXT_FIELD = {"\ud800": "body"}


def text_cases(bad: str, what: str) -> list[Case]:
    return [
        post(f"sweep name {what}", "/sweeps", "name", SPEC | {"name": f"a{bad}"}),
        post(
            f"sweep dry run name {what}",
            "/sweeps",
            "name",
            SPEC | {"name": bad},
            params={"dry_run": True},
        ),
        post(f"config value {what}", "/sweeps", "base.arch", spec_with(arch=bad)),
        post(f"config key {what}", "/sweeps", "base", spec_with(**{bad: 1})),
        post(f"grid key {what}", "/sweeps", "grid", SPEC | {"grid": {bad: [1]}}),
        # pydantic refuses a surrogate in the keys of a model's extra fields as a bad body
        post(f"spec key {what}", "/sweeps", "body" if bad != "\x00" else bad, SPEC | {bad: 1}),
        post(f"queued run name {what}", "/runs", "name", {"config": {}, "name": bad}),
        post(
            f"external config value {what}",
            "/runs",
            "config",
            {"config": {"note": f"x{bad}"}, "external": True},
        ),
        post(
            f"external config key {what}",
            "/runs",
            "config",
            {"config": {"nested": [{bad: 1}]}, "external": True},
        ),
        post(
            f"finish error {what}",
            "/runs/{ext}/finish",
            "error",
            {"status": "failed", "error": f"boom{bad}"},
        ),
        post(
            f"finish summary {what}",
            "/runs/{ext}/finish",
            "summary",
            {"status": "succeeded", "summary": {"best": [bad]}},
        ),
        post(f"dataset name {what}", "/datasets", "name", {"name": bad, "X": [[1]], "y": [1]}),
        post(
            f"metric name {what}",
            "/runs/{ext}/metrics",
            BATCH_TEXT_FIELD.get(bad, "points[0].metric"),
            {"points": [{"metric": f"m{bad}", "step": 1, "value": 1}]},
        ),
        post(
            f"series metric {what}",
            "/runs/{ext}/metrics",
            BATCH_TEXT_FIELD.get(bad, "series[0].metric"),
            {"series": [{"metric": bad, "steps": [1], "values": [1]}]},
        ),
        get(f"metric query {what}", f"/runs/{{ext}}/metrics?name={query(bad)}", "name[0]"),
        get(
            f"plot color_by {what}",
            f"/sweeps/{{sweep}}/plots/loss?color_by={query(bad)}",
            "color_by",
        ),
    ]


def npz_upload(name: str = "upload") -> dict[str, Any]:
    return {"params": {"name": name}, "headers": {"content-type": "application/x-npz"}}


TEXT = (
    text_cases("\ud800", "lone surrogate")
    + text_cases("\x00", "NUL")
    + [
        Case(
            "npz ?name= NUL",
            "POST",
            "/datasets?name=a%00b",
            "name",
            b"",
            headers={"content-type": "application/x-npz"},
        ),
    ]
)

NON_UTF8 = [
    post_raw("dataset JSON", "/datasets", "body", b'{"name": "\xff\xfe", "X": [[1]], "y": [1]}'),
    post_raw("dataset latin-1", "/datasets", "body", '{"name": "café"}'.encode("latin-1")),
    post_raw("sweep", "/sweeps", "body", b'{"name": "\xc3\x28"}'),
    # json.loads reads this encoded surrogate (surrogatepass): it is a lone surrogate in config
    post_raw("run", "/runs", "config", b'{"config": {"\xed\xa0\x80": 1}, "external": true}'),
    post_raw("batch", "/runs/{ext}/metrics", "body", b'{"points": [{"metric": "\xff"}]}'),
    post_raw("finish", "/runs/{ext}/finish", "body", b'{"status": "\x80"}'),
]


def npy(shape: tuple[int, ...], descr: str = "<f8", payload: bytes = b"\0" * 64) -> bytes:
    """An .npy file whose header declares ``shape`` (its data need not match)."""
    out = io.BytesIO()
    npy_format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": shape})
    return out.getvalue() + payload


def archive(**members: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zipped:
        for name, data in members.items():
            zipped.writestr(f"{name}.npy", data)
    return out.getvalue()


def npz_case(label: str, field: str, data: bytes) -> Case:
    return Case(label, "POST", "/datasets", field, data, **npz_upload())


NPZ = [
    npz_case("10^10 rows", "X", archive(X=npy((10**10, 4)), y=npy((10**10,)))),
    npz_case("10^10 labels", "y", archive(X=npy((4, 2)), y=npy((10**10,)))),
    npz_case("shape overflows int64", "X", archive(X=npy((2**40, 2**40)), y=npy((4,)))),
    npz_case("more rows than max_n", "X", archive(X=npy((100_000, 1)), y=npy((100_000,)))),
    npz_case("object dtype", "X", archive(X=npy((2, 2), "|O"), y=npy((2,)))),
    npz_case("structured dtype", "X", archive(X=npy((2,), "|V16"), y=npy((2,)))),
    npz_case("truncated data", "X", archive(X=npy((8, 8), payload=b"\0" * 8), y=npy((8,)))),
    npz_case(
        "corrupt header", "X", archive(X=b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}   \n", y=npy((2,)))
    ),
    npz_case("not an npy", "y", archive(X=npy((2, 2)), y=b"hello")),
    npz_case("no y", "y", archive(X=npy((2, 2)))),
    npz_case("not a zip", "body", b"PK\x03\x04 nothing else"),
    npz_case("empty", "body", b""),
]


def points(count: int) -> list[dict[str, Any]]:
    return [{"metric": f"m{i}", "step": 1, "value": 1.0} for i in range(count)]


MANY_METRICS = [
    post("70,000 names as points", "/runs/{ext}/metrics", "points", {"points": points(70_000)}),
    post("1,001 names as points", "/runs/{ext}/metrics", "points", {"points": points(1001)}),
    post(
        "5,000 names as series",
        "/runs/{ext}/metrics",
        "series",
        {"series": [{"metric": f"m{i}", "steps": [1], "values": [1.0]} for i in range(5000)]},
    ),
    post(
        "over max_batch_points",
        "/runs/{ext}/metrics",
        "series",
        {"series": [{"metric": "m", "steps": list(range(100_001)), "values": [1.0] * 100_001}]},
    ),
    get(
        "1,001 names in a query", "/runs/{ext}/metrics", "name", name=[f"m{i}" for i in range(1001)]
    ),
    get(
        "1,001 names in a stream",
        "/runs/{done}/metrics/stream",
        "name",
        name=[f"m{i}" for i in range(1001)],
    ),
]

BOUNDS = [
    post(
        "teacher_width 10^9",
        "/sweeps",
        "base.data.teacher_width",
        data_with(labels="teacher", teacher_width=10**9),
    ),
    post("seed 2^70", "/sweeps", "base.seed", spec_with(seed=HUGE)),
    post("data seed 2^64", "/sweeps", "base.data.seed", data_with(seed=2**64)),
    post("grid seed 2^70", "/sweeps", "grid.seed[1]", SPEC | {"grid": {"seed": [0, HUGE]}}),
    post("d 10^9", "/sweeps", "base.data.d", data_with(d=10**9)),
    post("n past the memory cap", "/sweeps", "base.data.n", data_with(n=10**6)),
    post("theory 0.0 (a flag)", "/sweeps", "grid.theory[0]", SPEC | {"grid": {"theory": [0.0]}}),
    post("normalize 'yes'", "/sweeps", "base.data.normalize", data_with(normalize="yes")),
    post("gram_every 2^70", "/sweeps", "base.gram_every", spec_with(gram_every=HUGE)),
    post("emit_every 2^63", "/sweeps", "base.emit_every", spec_with(emit_every=INT64_OVER)),
    post(
        "checkpoint_every 2^63",
        "/sweeps",
        "base.checkpoint_every",
        spec_with(checkpoint_every=INT64_OVER),
    ),
    post(
        "eig_dense_max_n 2^70", "/sweeps", "base.eig_dense_max_n", spec_with(eig_dense_max_n=HUGE)
    ),
    post("spectrum step 2^70", "/sweeps", "base.spectrum_steps", spec_with(spectrum_steps=[HUGE])),
    post(
        "kernel_size 2^70",
        "/sweeps",
        "base.kernel_size",
        spec_with(arch="conv_resnet", depth=2, kernel_size=HUGE + 1),
    ),
    post(
        "num_classes 2^40",
        "/sweeps",
        "base.data.num_classes",
        {
            "base": {
                "loss": "cross_entropy",
                "data": {"kind": "dataset", "dataset_id": 1, "n": 3, "d": 2, "num_classes": 2**40},
            }
        },
    ),
    post(
        "memory_mb 2^70",
        "/sweeps",
        "resources.memory_mb",
        SPEC | {"resources": {"memory_mb": HUGE}},
    ),
    post("queued run seed 2^70", "/runs", "config.seed", {"config": {"seed": HUGE}}),
    post(
        "dataset_id missing",
        "/sweeps",
        "base.data.dataset_id",
        data_with(kind="dataset", dataset_id=999, n=3, d=2),
    ),
    post(
        "dataset_id 2^40",
        "/sweeps",
        "base.data.dataset_id",
        data_with(kind="dataset", dataset_id=2**40, n=3, d=2),
    ),
    post(
        "dataset n disagrees",
        "/sweeps",
        "base.data.n",
        data_with(kind="dataset", dataset_id="{dataset}", n=4, d=2),
    ),
    post(
        "dataset d disagrees",
        "/sweeps",
        "base.data.d",
        data_with(kind="dataset", dataset_id="{dataset}", n=3, d=5),
    ),
    post(
        "dataset label_dim disagrees",
        "/sweeps",
        "base.data.label_dim",
        data_with(kind="dataset", dataset_id="{dataset}", n=3, d=2, label_dim=2),
    ),
    post(
        "dataset classes disagree",
        "/sweeps",
        "base.data.num_classes",
        {
            "base": {
                "loss": "cross_entropy",
                "data": {
                    "kind": "dataset",
                    "dataset_id": "{dataset}",
                    "n": 3,
                    "d": 2,
                    "num_classes": 2,
                },
            }
        },
    ),
    post(
        "grid dataset_id missing",
        "/sweeps",
        "grid.data.dataset_id[1]",
        SPEC
        | {
            "base": {"data": {"kind": "dataset", "n": 3, "d": 2}},
            "grid": {"data.dataset_id": ["{dataset}", 999]},
        },
    ),
    post(
        "queued run dataset missing",
        "/runs",
        "config.data.dataset_id",
        {"config": {"data": {"kind": "dataset", "dataset_id": 999, "n": 3, "d": 2}}},
    ),
    post(
        "dry run dataset missing",
        "/sweeps",
        "base.data.dataset_id",
        data_with(kind="dataset", dataset_id=999, n=3, d=2),
        params={"dry_run": True},
    ),
]

SIZES = [
    post_raw(
        "sweep body over max_request_bytes",
        "/sweeps",
        "request body",
        b'{"name": "' + b"x" * (9 * 2**20) + b'"}',
    ),
    post(
        "external config over max_config_bytes",
        "/runs",
        "config",
        {"config": {"blob": "x" * 70_000}, "external": True},
    ),
    post(
        "summary over max_config_bytes",
        "/runs/{ext}/finish",
        "summary",
        {"status": "succeeded", "summary": {"blob": "x" * 70_000}},
    ),
    post(
        "dataset over max_dataset_bytes",
        "/datasets",
        "X",
        {"name": "d", "X": [[0.5] * 1000] * 1100, "y": [1.0] * 1100},
    ),
]

BATTERY: dict[str, list[Case]] = {
    "non-finite numbers": NONFINITE,
    "ids past the column": BIG_IDS,
    "offsets and limits": OFFSETS,
    "forged cursors and event ids": CURSORS,
    "deeply nested JSON": DEEP_JSON,
    "NUL bytes and lone surrogates": TEXT,
    "non-UTF-8 bodies": NON_UTF8,
    ".npz headers": NPZ,
    "many metric names": MANY_METRICS,
    "unbounded config fields and datasets": BOUNDS,
    "sizes": SIZES,
}

TABLES = ("sweep", "run", "dataset", "metric_chunk", "metric_name")


def snapshot(engine: Engine) -> dict[str, Any]:
    """Row counts of every table a request may write, and every run's mutable state."""
    with engine.connect() as conn:
        counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in TABLES}
        runs = conn.execute(
            text("SELECT id, status, error, cancel_requested FROM run ORDER BY id")
        ).all()
    return counts | {"runs": [tuple(r) for r in runs]}


def resident_kib(key: str) -> int | None:
    """VmRSS / VmHWM of this process (the in-process server's) in KiB; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def external_run(client: TestClient) -> int:
    """An external running run with one point."""
    run_id: int = client.post(f"{V1}/runs", json={"config": {}, "external": True}).json()["id"]
    point = {"points": [{"metric": "loss", "step": 0, "value": 1.0}]}
    assert client.post(f"{V1}/runs/{run_id}/metrics", json=point).status_code == 200
    return run_id


@pytest.fixture
def world(client: TestClient) -> dict[str, int]:
    """The ids the cases refer to (see :class:`Case`)."""
    ext, done = external_run(client), external_run(client)
    assert client.post(f"{V1}/runs/{done}/finish", json={"status": "succeeded"}).is_success
    sweep = client.post(f"{V1}/sweeps", json=SPEC).json()
    assert client.post(f"{V1}/runs/{sweep['run_ids'][0]}/cancel").is_success
    arrays = {"name": "d", "X": [[1, 0], [0, 1], [1, 1]], "y": [0.5, 1, 2.5]}
    dataset = client.post(f"{V1}/datasets", json=arrays).json()["id"]
    return {"ext": ext, "done": done, "sweep": sweep["id"], "dataset": dataset}


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def send(client: TestClient, case: Case, ids: dict[str, int]) -> Any:
    content = case.content
    for key, value in ids.items():
        content = content and content.replace(f'"{{{key}}}"'.encode(), str(value).encode())
    headers = (
        {"content-type": "application/json"} | case.headers
        if content is not None
        else (case.headers)
    )
    return client.request(
        case.method,
        V1 + case.path.format(**ids),
        content=content,
        params=case.params or None,
        headers=headers,
    )


def names(expected: str, given: str) -> bool:
    """``given`` is the field ``expected`` or a part of it (``base`` names ``base.width``)."""
    return given == expected or given.startswith((expected + ".", expected + "["))


def what_is_wrong(response: Any, case: Case) -> str | None:
    """Why ``response`` is not a proper refusal of ``case``; None when it is."""
    if not 400 <= response.status_code < 500:
        return f"status {response.status_code}: {response.text[:200]}"
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        return f"content-type {response.headers.get('content-type')}"
    problem = response.json()
    if problem.get("status") != response.status_code or not problem.get("title"):
        return f"not a problem: {problem}"
    named = [e["field"] for e in problem.get("errors", [])]
    if any(names(case.field, given) for given in named):
        return None
    if not named and case.field in problem.get("detail", ""):
        return None
    return f"{response.status_code} names {named or problem.get('detail')!r}, not {case.field!r}"


@pytest.mark.parametrize("kind", list(BATTERY))
def test_bad_input_is_refused_naming_the_field_and_stores_nothing(
    client: TestClient, engine: Engine, world: dict[str, int], kind: str
) -> None:
    failures = []
    reset_peak()
    start_kib = resident_kib("VmRSS")
    for case in BATTERY[kind]:
        before = snapshot(engine)
        response = send(client, case, world)
        problem = what_is_wrong(response, case)
        if problem:
            failures.append(f"{case.label}: {problem}")
        elif snapshot(engine) != before:
            failures.append(f"{case.label}: stored or changed something")
    assert not failures, f"{len(failures)} of {len(BATTERY[kind])}:\n" + "\n".join(failures)
    peak_kib = resident_kib("VmHWM")
    if start_kib is not None and peak_kib is not None and os.path.exists("/proc/self/clear_refs"):
        assert (peak_kib - start_kib) * 1024 < RSS_GROWTH_BOUND, (
            f"{kind}: RSS peaked at {peak_kib} KiB"
        )
