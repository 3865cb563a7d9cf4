"""The metric store on SQLite and PostgreSQL: idempotent ingestion (re-sent, conflicting and
concurrent batches), rollups that always equal a recomputation from the stored points,
downsampling that keeps the extremes and the ends, keyset pages, and the migration backfill."""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from services import history
from services.db import make_engine, make_sessionmaker, session_scope
from services.external_runs import log_batch
from services.metrics import Columns, DeferredWriter, copy_payload, write_points
from services.migrate import upgrade
from services.models import Metric, MetricRollup, Run
from services.rollups import (
    FIRST_SHIFT,
    LEVEL_SHIFT,
    ROLLUP_LEVELS,
    Row,
    Summary,
    downsample,
    merge,
    rollup_summaries,
    settle,
)

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def new_run(sessions: sessionmaker[Session]) -> int:
    with session_scope(sessions) as db:
        run = Run(config={}, status="running", external=True)
        db.add(run)
        db.flush()
        return run.id


def stored(sessions: sessionmaker[Session], run_id: int) -> list[tuple[int, int, float | None]]:
    with session_scope(sessions) as db:
        rows = db.execute(
            select(Metric.metric_id, Metric.step, Metric.value)
            .where(Metric.run_id == run_id)
            .order_by(Metric.metric_id, Metric.step)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


def rollups(sessions: sessionmaker[Session], run_id: int) -> dict[tuple[int, int, int], list]:  # type: ignore[type-arg]
    """The run's rollups once every pending batch is merged (PostgreSQL defers them)."""
    with session_scope(sessions) as db:
        settle(db, run_id)
    with session_scope(sessions) as db:
        rows = db.scalars(select(MetricRollup).where(MetricRollup.run_id == run_id))
        return {
            (r.metric_id, r.level, r.bucket): [r.min_step, r.min_value, r.max_step, r.max_value]
            for r in rows
        }


def rollup_rows(rows: list[Row]) -> dict[tuple[int, int, int], Summary]:
    """The reference: every level summarized from the points one at a time in Python (the
    service computes level 0 with numpy and the levels above from it)."""
    out: dict[tuple[int, int, int], Summary] = {}
    for mid, step, value in rows:
        for level in range(ROLLUP_LEVELS):
            key = (mid, level, step >> (FIRST_SHIFT + LEVEL_SHIFT * level))
            if key in out:
                merge(out[key], [step, value, step, value])
            else:
                out[key] = [step, value, step, value]
    return out


def assert_rollups_match_points(sessions: sessionmaker[Session], run_id: int) -> None:
    """The rollups are exactly what a recomputation from the stored points gives."""
    assert rollups(sessions, run_id) == rollup_rows(stored(sessions, run_id))


def test_resent_and_repeated_points_are_stored_once_and_first_value_wins(sessions) -> None:  # type: ignore[no-untyped-def]
    run_id = new_run(sessions)
    batch = [("loss", s, 1.0 / (s + 1)) for s in range(100)] + [("acc", 3, 0.5)]
    with session_scope(sessions) as db:
        assert write_points(db_session=db, run_id=run_id, points=batch) == 101
    with session_scope(sessions) as db:  # a retried batch, and one that overlaps it
        assert write_points(db_session=db, run_id=run_id, points=batch) == 0
        overlap = [("loss", s, -7.0) for s in range(90, 110)] + [("loss", 110, 2.0)] * 3
        assert write_points(db_session=db, run_id=run_id, points=overlap) == 11
    rows = stored(sessions, run_id)
    assert len(rows) == 112 == len({(m, s) for m, s, _ in rows})
    with session_scope(sessions) as db:
        (loss,) = history.read_page(
            db_session=db,
            run_id=run_id,
            names=["loss"],
            start=None,
            end=None,
            after=None,
            limit=1000,
        )
    values = dict(loss.points)
    assert values[95] == pytest.approx(1 / 96) and values[100] == -7.0 and values[110] == 2.0
    assert_rollups_match_points(sessions, run_id)


def test_nan_and_infinities_round_trip(sessions) -> None:  # type: ignore[no-untyped-def]
    run_id = new_run(sessions)
    with session_scope(sessions) as db:
        write_points(
            db_session=db,
            run_id=run_id,
            points=[("loss", 0, 1.5), ("loss", 1, NAN), ("loss", 2, INF), ("loss", 3, -INF)],
        )
    with session_scope(sessions) as db:
        (series,) = history.read_page(
            db_session=db, run_id=run_id, names=None, start=None, end=None, after=None, limit=10
        )
    assert series.points[0] == (0, 1.5) and series.points[1] == (1, None)
    assert series.points[2] == (2, INF) and series.points[3] == (3, -INF)
    assert_rollups_match_points(sessions, run_id)


def test_rollups_equal_a_recomputation_after_shuffled_overlapping_batches(sessions) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(7)
    run_id = new_run(sessions)
    steps = [*range(0, 6000, 3), 10**9, 10**9 + 1]
    points = [
        (name, s, rng.choice([NAN, INF, -INF]) if rng.random() < 0.02 else rng.gauss(0, 1))
        for name in ("loss", "grad/norm")
        for s in steps
    ]
    batches = [points[i : i + 250] for i in range(0, len(points), 250)]
    batches += [rng.sample(points, 300) for _ in range(5)]  # re-sent, out of order
    batches += [[(n, s, v + 1.0) for n, s, v in rng.sample(points, 200)]]  # conflicting values
    rng.shuffle(batches)
    for batch in batches:
        with session_scope(sessions) as db:
            write_points(db_session=db, run_id=run_id, points=batch)
    assert len(stored(sessions, run_id)) == len(points)
    assert_rollups_match_points(sessions, run_id)
    assert {level for _, level, _ in rollups(sessions, run_id)} == set(range(ROLLUP_LEVELS))


@pytest.mark.postgres
def test_pending_rollups_fold_ties_and_nan_across_batches_under_concurrent_mergers(
    pg_migrated_url: str,
) -> None:
    """PostgreSQL defers rollups: 60 pending batches whose values tie, are ±inf, or NaN-only
    in whole buckets, merged by three background mergers and a settling read at once."""
    engine = make_engine(pg_migrated_url)
    sessions = make_sessionmaker(engine)
    rng = random.Random(11)
    run_id = new_run(sessions)
    steps = rng.sample(range(40_000), 6000)
    pool = [NAN, INF, -INF, 0.0, 1.0, 1.0]
    points = [(name, s, NAN if s < 500 else rng.choice(pool)) for name in ("a", "b") for s in steps]
    for i in range(0, len(points), 200):
        with session_scope(sessions) as db:
            write_points(db_session=db, run_id=run_id, points=points[i : i + 200])
    with session_scope(sessions) as db:
        pending = db.scalar(
            text("SELECT count(*) FROM metric_rollup_pending WHERE run_id = :run"), {"run": run_id}
        )
    assert pending == 60
    mergers = [DeferredWriter(engine, interval=0.01).start() for _ in range(3)]
    with session_scope(sessions) as db:
        settle(db, run_id)
    for merger in mergers:
        merger.stop()
    with session_scope(sessions) as db:
        left = text("SELECT count(*) FROM metric_rollup_pending WHERE run_id = :run")
        assert db.scalar(left, {"run": run_id}) == 0
    assert_rollups_match_points(sessions, run_id)
    engine.dispose()


def test_concurrent_overlapping_batches_store_every_point_exactly_once(sessions) -> None:  # type: ignore[no-untyped-def]
    run_id = new_run(sessions)
    points = [(name, s, float(s)) for name in ("a", "b", "c") for s in range(3000)]
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(6):
                start = rng.randrange(0, len(points) - 1500)
                with session_scope(sessions) as db:
                    write_points(db_session=db, run_id=run_id, points=points[start : start + 1500])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with session_scope(sessions) as db:  # then everything, once more
        write_points(db_session=db, run_id=run_id, points=points)
    rows = stored(sessions, run_id)
    assert len(rows) == len(points) == len({(m, s) for m, s, _ in rows})
    assert_rollups_match_points(sessions, run_id)


def brute_extremes(points: list[tuple[int, float | None]]) -> tuple[float, float]:
    values = [v for _, v in points if v is not None]
    return min(values), max(values)


@pytest.mark.parametrize("max_points", [4, 25, 1000])
def test_downsampling_keeps_the_extremes_and_both_ends_and_the_budget(sessions, max_points) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(max_points)
    run_id = new_run(sessions)
    steps = [*sorted(rng.sample(range(200_000), 40_000)), 300_000]
    points = [("loss", s, math.sin(s / 900) + rng.gauss(0, 0.1)) for s in steps]
    points[1234] = ("loss", steps[1234], NAN)
    with session_scope(sessions) as db:
        for i in range(0, len(points), 5000):
            write_points(db_session=db, run_id=run_id, points=points[i : i + 5000])
    everything = [(s, None if math.isnan(v) else v) for _, s, v in points]
    ranges = [(None, None), (0, 299_999), (777, 150_001), (1, 260), (steps[5], steps[5])]
    ranges += [tuple(sorted(rng.sample(range(310_000), 2))) for _ in range(6)]  # type: ignore[misc]
    with session_scope(sessions) as db:
        metric_id = history.run_metric_ids(db_session=db, run_id=run_id)["loss"]
        for start, end in ranges:
            inside = [(s, v) for s, v in everything if (start or 0) <= s <= (end or 10**12)]
            got = downsample(
                db_session=db,
                run_id=run_id,
                metric_id=metric_id,
                start=start,
                end=end,
                max_points=max_points,
            )
            assert len(got) <= max_points, (start, end)
            if not inside:
                assert got == []
                continue
            assert got[0] == inside[0] and got[-1] == inside[-1], (start, end)
            assert [s for s, _ in got] == sorted({s for s, _ in got})
            assert set(got) <= set(inside), "only stored points come back"
            if any(v is not None for _, v in inside):
                assert brute_extremes(got) == brute_extremes(inside), (start, end)


def test_downsampling_a_series_of_nan_only_returns_nan_points(sessions) -> None:  # type: ignore[no-untyped-def]
    run_id = new_run(sessions)
    with session_scope(sessions) as db:
        write_points(db_session=db, run_id=run_id, points=[("x", s, NAN) for s in range(5000)])
        metric_id = history.run_metric_ids(db_session=db, run_id=run_id)["x"]
        got = downsample(
            db_session=db, run_id=run_id, metric_id=metric_id, start=None, end=None, max_points=10
        )
    assert 2 <= len(got) <= 10 and got[0] == (0, None) and got[-1] == (4999, None)
    assert all(v is None for _, v in got)


def test_keyset_pages_return_every_point_once_while_points_arrive(sessions) -> None:  # type: ignore[no-untyped-def]
    run_id = new_run(sessions)
    with session_scope(sessions) as db:
        write_points(
            db_session=db,
            run_id=run_id,
            points=[(n, s, 1.0) for n in ("b", "a", "c") for s in range(0, 300, 2)],
        )

    def read(after: tuple[str, int] | None, limit: int) -> list[tuple[str, int]]:
        with session_scope(sessions) as db:
            page = history.read_page(
                db_session=db,
                run_id=run_id,
                names=["a", "c"],
                start=10,
                end=None,
                after=after,
                limit=limit,
            )
        return [(s.metric, step) for s in page for step, _ in s.points]

    before = read(None, 10**6)
    seen: list[tuple[str, int]] = []
    while batch := read(seen[-1] if seen else None, 37):
        seen += batch
        with session_scope(sessions) as db:  # a writer adds points behind and ahead of the cursor
            write_points(db_session=db, run_id=run_id, points=[("a", 1001 + len(seen), 2.0)])
    assert seen == sorted(set(seen)), "in order, no repeats"
    assert set(before) <= set(seen), "nothing that was there is skipped"
    assert len(before) == 2 * 145


def test_run_metric_ids_lists_each_metric_once(sessions) -> None:  # type: ignore[no-untyped-def]
    run_id, other = new_run(sessions), new_run(sessions)
    with session_scope(sessions) as db:
        write_points(db_session=db, run_id=run_id, points=[("b", 1, 1.0), ("a", 1, 1.0)])
        write_points(db_session=db, run_id=other, points=[("z", 1, 1.0)])
        assert history.run_metric_names(db_session=db, run_id=run_id) == ["a", "b"]
        assert history.run_metric_names(db_session=db, run_id=10**6) == []


@pytest.mark.parametrize("seed", range(5))
def test_vectorized_rollups_equal_the_one_point_at_a_time_reference(seed: int) -> None:
    """Ties, NaN next to ±inf, buckets of NaN only, several metrics, sparse steps."""
    rng = random.Random(seed)
    pool = [NAN, INF, -INF, 0.0, 1.0, -1.0, 2.5]
    keys = {
        (rng.randint(1, 3), rng.choice([rng.randint(0, 300), rng.randint(0, 10**7)]))
        for _ in range(2000)
    }
    rows = sorted((mid, step, rng.choice(pool)) for mid, step in keys)
    stored = [(mid, step, None if v != v else v) for mid, step, v in rows]
    columns = Columns.build(
        (mid, [s for m, s, _ in rows if m == mid], [v for m, _, v in rows if m == mid])
        for mid in (1, 2, 3)
    )
    assert columns.rows() == stored
    assert rollup_summaries(columns) == rollup_rows(stored)


def test_columns_keep_the_first_of_repeated_keys_in_key_order() -> None:
    columns = Columns.build([(2, [5, 1, 5], [1.0, 2.0, 3.0]), (1, [9], [NAN]), (2, [1], [4.0])])
    assert columns.rows() == [(1, 9, None), (2, 1, 2.0), (2, 5, 1.0)]


def test_copy_payload_matches_postgresql_binary_format() -> None:
    rows = [(1, 5, 0.25), (2, 2**40, None)]
    payload = copy_payload(7, Columns.from_rows(rows))
    assert payload.startswith(b"PGCOPY\n\xff\r\n\x00") and payload.endswith(b"\xff\xff")
    assert (
        len(payload)
        == 19 + (2 + 4 + 4 + 4 + 4 + 4 + 8 + 4 + 8) + (2 + 4 + 4 + 4 + 4 + 4 + 8 + 4) + 2
    )


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_migration_backfills_rollups_of_existing_points(backend, tmp_path, request) -> None:  # type: ignore[no-untyped-def]
    """0003 on a database with points: the backfill equals what ingestion maintains."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'm.db'}"
    else:
        url = request.getfixturevalue("pg_empty_url")
    rng = random.Random(3)
    points = [(s, rng.choice([None, rng.gauss(0, 1), INF])) for s in range(0, 70_000, 7)]
    upgrade(url, "0002")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                'INSERT INTO run (id, "index", config, overrides, status, attempt, summary,'
                " manifest, cancel_requested, created_at, resources) VALUES (1, 0, '{}',"
                " '{}', 'running', 1, '{}', '{}', false, '2026-01-01', '{}')"
            )
        )
        conn.execute(text("INSERT INTO metric_name (id, name) VALUES (1, 'loss')"))
        conn.execute(
            text("INSERT INTO metric VALUES (1, 1, :s, :v)"), [{"s": s, "v": v} for s, v in points]
        )
    engine.dispose()
    upgrade(url)
    engine = make_engine(url)
    assert rollups(make_sessionmaker(engine), 1) == rollup_rows([(1, s, v) for s, v in points])
    engine.dispose()


@pytest.mark.postgres
def test_rest_batches_are_queued_then_moved_in_order_and_reads_never_miss_them(
    pg_migrated_url: str,
) -> None:
    """Write-behind on PostgreSQL: a fresh batch is one queue row; an overlapping one moves the
    queue first (the first value posted wins, the stored count is exact); a read moves what is
    queued; a writer that died leaves rows the periodic DeferredWriter moves."""
    engine = make_engine(pg_migrated_url)
    sessions = make_sessionmaker(engine)
    run_id = new_run(sessions)

    def post(points: dict[str, tuple[list[int], list[float]]]) -> int:
        return log_batch(sessions=sessions, run_id=run_id, series=points)

    def count(table: str) -> int:
        with session_scope(sessions) as db:
            sql = text(f"SELECT count(*) FROM {table} WHERE run_id = :run")
            return int(db.scalar(sql, {"run": run_id}) or 0)

    assert post({"loss": ([0, 1, 2], [1.0, NAN, 3.0]), "acc": ([0], [0.5])}) == 4
    assert post({"loss": ([3, 4], [4.0, 5.0])}) == 2
    assert (count("metric_batch_queue"), count("metric")) == (2, 0)
    # Overlaps the queue: moved first, so step 2 keeps 3.0 and only step 5 is new.
    assert post({"loss": ([2, 5], [-1.0, 6.0])}) == 1
    assert count("metric_batch_queue") == 0
    assert [v for _, _, v in stored(sessions, run_id)] == [0.5, 1.0, None, 3.0, 4.0, 5.0, 6.0]
    assert post({"loss": ([6], [7.0])}) == 1
    with session_scope(sessions) as db:  # a read moves the queue of its run first
        (loss,) = history.read_page(
            db_session=db, run_id=run_id, names=["loss"], start=5, end=None, after=None, limit=10
        )
    assert loss.points == [(5, 6.0), (6, 7.0)]
    assert post({"loss": ([7, 8], [8.0, 9.0])}) == 2  # left queued, as by a process that died
    writer = DeferredWriter(engine, interval=0.05).start()
    try:
        for _ in range(200):
            if count("metric_batch_queue") == 0 and count("metric_rollup_pending") == 0:
                break
            time.sleep(0.05)
    finally:
        writer.stop()
    assert (count("metric_batch_queue"), count("metric_rollup_pending"), count("metric")) == (
        0,
        0,
        10,
    )
    assert_rollups_match_points(sessions, run_id)
    engine.dispose()


@pytest.mark.postgres
def test_a_read_that_moves_queued_batches_needs_no_second_connection_from_its_pool(
    pg_migrated_url: str,
) -> None:
    """With a pool of one connection, held by the reading session, the read still moves the
    run's queue (on the side pool) instead of waiting for a second connection forever."""
    engine = make_engine(pg_migrated_url, pool_size=1, max_overflow=0)
    sessions = make_sessionmaker(engine)
    run_id = new_run(sessions)
    assert log_batch(sessions=sessions, run_id=run_id, series={"x": ([0, 1], [1.0, 2.0])}) == 2
    with session_scope(sessions) as db:
        queued = db.scalar(
            text("SELECT count(*) FROM metric_batch_queue WHERE run_id = :r"), {"r": run_id}
        )
        assert queued == 1
        (x,) = history.read_page(
            db_session=db, run_id=run_id, names=None, start=None, end=None, after=None, limit=10
        )
    assert x.points == [(0, 1.0), (1, 2.0)]
    engine.dispose()
