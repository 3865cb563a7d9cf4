"""The chunked metric store on SQLite and PostgreSQL: exactly once per (run, metric, step) with
the first value winning (retried batches, overlaps with other boundaries, concurrent writers),
NaN and ±inf bit for bit, the chunk invariants (disjoint, sorted, summaries true to the
arrays), keyset pages and downsampling in a constant number of statements, and the migration
that moves existing points into chunks."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.orm import Session, sessionmaker

from services import history
from services.chunks import CHUNK_POINTS, SMALL_CHUNK, Points
from services.db import make_engine, make_sessionmaker, session_scope
from services.external_runs import log_batch
from services.metrics import write_points, write_series
from services.migrate import downgrade, upgrade
from services.models import MetricChunk, Run

NAN, INF = float("nan"), float("inf")
Reference = dict[tuple[int, str, int], float]


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def new_run(sessions: sessionmaker[Session], external: bool = True) -> int:
    with session_scope(sessions) as db:
        run = Run(config={}, status="running", external=external)
        db.add(run)
        db.flush()
        return run.id


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def stored(sessions: sessionmaker[Session], run_id: int) -> Reference:
    """Every stored point of the run, decoded from its chunks, checking the chunk invariants:
    per metric the chunks are disjoint and sorted, hold at most CHUNK_POINTS points, and their
    summary columns are what the arrays say (recomputed here one point at a time)."""
    with session_scope(sessions) as db:
        rows = db.execute(
            select(MetricChunk)
            .where(MetricChunk.run_id == run_id)
            .order_by(MetricChunk.metric_id, MetricChunk.last_step)
        ).scalars()
        metrics = history.series_of(db_session=db, run_ids=[run_id])[run_id]
        names = {mid: name for name, mid in metrics.items()}
        out: Reference = {}
        previous: tuple[int, int] | None = None
        for chunk in rows:
            points = Points.decode(chunk.step_array, chunk.value_array)
            steps, values = points.steps.tolist(), points.values.tolist()
            assert steps == sorted(set(steps)) and 0 < len(steps) <= CHUNK_POINTS
            assert (chunk.first_step, chunk.last_step, chunk.count) == (
                steps[0],
                steps[-1],
                len(steps),
            )
            if previous is not None and previous[0] == chunk.metric_id:
                assert chunk.first_step > previous[1], "chunks of a history never overlap"
            previous = (chunk.metric_id, chunk.last_step)
            numbers = [(v, s) for s, v in zip(steps, values, strict=True) if not math.isnan(v)]
            low = min(numbers, default=(None, steps[0]))
            high = min(((-v, s) for v, s in numbers), default=(None, steps[0]))
            assert (chunk.min_value, chunk.min_step) == low
            assert (chunk.max_value, chunk.max_step) == (
                (None if high[0] is None else -high[0]),
                high[1],
            )
            assert same(NAN if chunk.first_value is None else chunk.first_value, values[0])
            assert same(NAN if chunk.last_value is None else chunk.last_value, values[-1])
            for step, value in zip(steps, values, strict=True):
                out[(run_id, names[chunk.metric_id], step)] = value
        return out


def write(
    sessions: sessionmaker[Session], run_id: int, points: list[tuple[str, int, float]]
) -> int:
    with session_scope(sessions) as db:
        return write_points(db_session=db, run_id=run_id, points=points)


def remember(reference: Reference, run_id: int, points: list[tuple[str, int, float]]) -> int:
    """The reference store: the first value of a (run, metric, step) wins; how many were new."""
    new = 0
    for name, step, value in points:
        if (run_id, name, step) not in reference:
            reference[(run_id, name, step)] = value
            new += 1
    return new


def assert_same(got: Reference, want: Reference) -> None:
    assert got.keys() == want.keys()
    assert all(same(got[k], want[k]) for k in want), [k for k in want if not same(got[k], want[k])][
        :5
    ]


def test_a_retried_batch_and_overlaps_with_other_boundaries_store_each_point_once(sessions) -> None:  # type: ignore[no-untyped-def]
    run_id = new_run(sessions)
    reference: Reference = {}
    batch = [("loss", s, 1.0 / (s + 1)) for s in range(100)] + [("acc", 3, 0.5)]
    for points in (
        batch,
        batch,  # retried after a timeout
        [("loss", s, -7.0) for s in range(90, 110)] + [("loss", 110, 2.0)] * 3,  # overlaps
        [("loss", s, -8.0) for s in range(-0, 200, 7)],  # crosses both, other boundaries
    ):
        assert write(sessions, run_id, points) == remember(reference, run_id, points)
    got = stored(sessions, run_id)
    assert_same(got, reference)
    assert got[(run_id, "loss", 95)] == pytest.approx(1 / 96) and got[(run_id, "loss", 105)] == -7.0


def test_nan_and_infinities_are_kept_bit_for_bit(sessions) -> None:  # type: ignore[no-untyped-def]
    run_id = new_run(sessions)
    points = [("loss", 0, 1.5), ("loss", 1, NAN), ("loss", 2, INF), ("loss", 3, -INF)]
    points += [("nan_only", s, NAN) for s in range(5)] + [("tiny", 0, 5e-324)]
    write(sessions, run_id, points)
    assert_same(stored(sessions, run_id), {(run_id, m, s): v for m, s, v in points})


@pytest.mark.parametrize("seed", [1, 2])
def test_shuffled_overlapping_batches_equal_a_one_point_at_a_time_reference(sessions, seed) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    run_id = new_run(sessions)
    reference: Reference = {}
    steps = [*range(0, 5000, 3), 10**9, 2**63 - 1]
    for _ in range(60):
        first = rng.choice(steps)
        span = rng.choice([1, 5, 200, 3000])
        batch = [
            (rng.choice(["a", "b", "c"]), s, rng.choice([rng.random(), NAN, INF, -INF, 0.0]))
            for s in rng.sample(steps, min(len(steps), span))
            if first <= s or rng.random() < 0.01
        ]
        assert write(sessions, run_id, batch) == remember(reference, run_id, batch)
    assert_same(stored(sessions, run_id), reference)


def test_a_writer_logging_one_step_at_a_time_builds_large_chunks(sessions) -> None:  # type: ignore[no-untyped-def]
    run_id = new_run(sessions)
    for step in range(600):
        write(sessions, run_id, [("loss", step, float(step)), ("lr", step * 10, 0.1)])
    stored(sessions, run_id)  # the invariants
    with session_scope(sessions) as db:
        counts = db.scalars(select(MetricChunk.count).where(MetricChunk.run_id == run_id)).all()
    assert sum(counts) == 1200 and len(counts) <= 2 * (600 // SMALL_CHUNK + 1)


def test_concurrent_overlapping_rest_writers_store_every_point_exactly_once(sessions) -> None:  # type: ignore[no-untyped-def]
    run_id = new_run(sessions)
    news: list[int] = []
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(8):
                first = rng.randrange(0, 400)
                steps = list(range(first, first + rng.randrange(1, 150)))
                series = {"loss": (steps, [seed + s / 1000 for s in steps])}
                with session_scope(sessions) as db:
                    news.append(log_batch(db_session=db, run_id=run_id, series=series))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    got = stored(sessions, run_id)
    assert sum(news) == len(got), "the writers' new counts add up to what is stored"
    for (_, _, step), value in got.items():  # each value is one a writer sent for that step
        assert round(value - step / 1000) in range(6)


def test_keyset_pages_return_every_point_once_while_points_arrive(sessions) -> None:  # type: ignore[no-untyped-def]
    runs = [new_run(sessions) for _ in range(3)]
    reference: Reference = {}
    for run_id in runs:
        points = [(m, s, s * 0.5) for s in range(0, 3000, 2) for m in ("loss", "acc")]
        write(sessions, run_id, points)
        remember(reference, run_id, points)
    got: Reference = {}
    after = None
    rng = random.Random(3)
    while True:
        with session_scope(sessions) as db:
            page, after = history.read_page(
                db_session=db,
                selection=history.Selection(runs),
                after=after,
                limit=rng.choice([1, 7, 500, 1500]),
            )
        for s in page:
            for step, value in s.pairs():
                assert (s.run_id, s.metric, step) not in got
                got[(s.run_id, s.metric, step)] = value
        # points arriving meanwhile, before and after the cursor (odd steps)
        write(sessions, runs[0], [("loss", rng.randrange(1, 6000, 2), 1.0)])
        if after is None:
            break
    assert set(reference) <= set(got)


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


@pytest.mark.parametrize("read", ["page", "downsampled", "names"])
def test_reads_of_many_runs_and_metrics_take_a_constant_number_of_statements(
    sessions, read
) -> None:  # type: ignore[no-untyped-def]
    runs = [new_run(sessions) for _ in range(24)]
    for run_id in runs:
        write(sessions, run_id, [(f"m{i}", s, s) for i in range(6) for s in range(300)])

    def count(run_ids: list[int]) -> int:
        engine = sessions.kw["bind"]
        with statements(engine) as seen, session_scope(sessions) as db:
            if read == "page":
                history.read_page(
                    db_session=db, selection=history.Selection(run_ids), after=None, limit=100_000
                )
            elif read == "downsampled":
                history.read_downsampled(
                    db_session=db,
                    selection=history.Selection(run_ids),
                    max_points=40,
                )
            else:
                history.series_of(db_session=db, run_ids=run_ids)
        return len([s for s in seen if s.lstrip().upper().startswith(("SELECT", "WITH"))])

    # Not one per run or per metric: a page's growing LIMIT adds a statement per doubling only.
    assert count(runs) <= 4 and count(runs[:2]) <= 4


@pytest.mark.parametrize("max_points", [4, 10, 101, 1000])
def test_downsampling_keeps_the_ends_the_extremes_and_the_budget(sessions, max_points) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(max_points)
    run_id = new_run(sessions)
    steps = np.unique(rng.integers(0, 200_000, 20_000))
    values = rng.normal(size=len(steps))
    values[rng.integers(0, len(values), 30)] = NAN
    values[len(values) // 3] = 1e9  # a spike
    values[len(values) // 2] = -INF
    for piece in Points.of(steps, values).pieces(3_000):  # several writes, chunk boundaries vary
        with session_scope(sessions) as db:
            write_series(db_session=db, run_id=run_id, series={"loss": (piece.steps, piece.values)})
    truth = dict(zip(steps.tolist(), values.tolist(), strict=True))
    for start, end in ((None, None), (10_000, 150_000), (5, 5), (40_000, 40_010)):
        with session_scope(sessions) as db:
            found, _ = history.read_downsampled(
                db_session=db,
                selection=history.Selection([run_id], None, start, end),
                max_points=max_points,
            )
        got = dict(found[0].pairs()) if found else {}
        inside = {
            s: v
            for s, v in truth.items()
            if (start or 0) <= s <= (end if end is not None else 2**62)
        }
        assert len(got) <= max(max_points, 0) or len(inside) <= max_points
        assert all(same(got[s], truth[s]) for s in got), "only stored points"
        if len(inside) <= max_points:
            assert got.keys() == inside.keys()
            continue
        first, last = min(inside), max(inside)
        assert first in got and last in got
        numbers = {s: v for s, v in inside.items() if not math.isnan(v)}
        assert min(numbers, key=lambda s: (numbers[s], s)) in got
        assert max(numbers, key=lambda s: (numbers[s], -s)) in got


def test_downsampling_a_history_of_nan_only_returns_nan_points(sessions) -> None:  # type: ignore[no-untyped-def]
    run_id = new_run(sessions)
    write(sessions, run_id, [("loss", s, NAN) for s in range(5000)])
    with session_scope(sessions) as db:
        (series,), _ = history.read_downsampled(
            db_session=db, selection=history.Selection([run_id], None, None, None), max_points=20
        )
    assert 2 <= len(series.points) <= 20 and np.isnan(series.points.values).all()
    assert series.points.steps[0] == 0 and series.points.steps[-1] == 4999


INSERT_RUN = """
    INSERT INTO run (id, "index", config, overrides, status, attempt, summary, manifest,
                     cancel_requested, external, resources, created_at)
    VALUES (:id, 0, '{}', '{}', 'succeeded', 1, '{}', '{}', false, true, '{}', CURRENT_TIMESTAMP)
"""


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_the_migration_moves_every_point_into_chunks_and_back(backend, tmp_path, request) -> None:  # type: ignore[no-untyped-def]
    url = (
        f"sqlite:///{tmp_path / 'm.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_empty_url")
    )
    upgrade(url, "0004")
    engine = make_engine(url)
    rng = random.Random(5)
    truth: dict[tuple[int, int, int], float] = {}
    with engine.begin() as conn:
        for run_id in (1, 2):
            conn.execute(text(INSERT_RUN), {"id": run_id})
        conn.execute(text("INSERT INTO metric_name (id, name) VALUES (1, 'loss'), (2, 'acc')"))
        rows = []
        for run_id in (1, 2):
            for metric_id in (1, 2):
                for step in sorted(rng.sample(range(10**6), 2500)):
                    value = rng.choice([rng.random(), NAN, INF, -INF])
                    truth[(run_id, metric_id, step)] = value
                    rows.append(
                        {
                            "r": run_id,
                            "m": metric_id,
                            "s": step,
                            "v": None if math.isnan(value) else value,
                        }
                    )
        conn.execute(
            text("INSERT INTO metric (run_id, metric_id, step, value) VALUES (:r, :m, :s, :v)"),
            rows,
        )
    upgrade(url)
    sessions = make_sessionmaker(engine)
    got = {}
    for run_id in (1, 2):
        for (_, name, step), value in stored(sessions, run_id).items():
            got[(run_id, {"loss": 1, "acc": 2}[name], step)] = value
    assert got.keys() == truth.keys() and all(same(got[k], truth[k]) for k in truth)
    downgrade(url, "0004")
    with engine.connect() as conn:
        back = {
            (r, m, s): NAN if v is None else v
            for r, m, s, v in conn.execute(
                text("SELECT run_id, metric_id, step, value FROM metric")
            )
        }
        levels = conn.execute(text("SELECT count(DISTINCT level) FROM metric_rollup")).scalar()
    assert back.keys() == truth.keys() and all(same(back[k], truth[k]) for k in truth)
    assert levels == 12, "the rollups are rebuilt"
    engine.dispose()
