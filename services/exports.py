"""Metric exports: CSV (streamed as it is read) and Parquet (pyarrow, the ``parquet`` extra).

Both have the columns run_id, metric, step, value. CSV writes non-finite values as ``NaN``,
``Infinity`` and ``-Infinity`` (what JSON responses use, unquoted); Parquet stores float64
NaN and ±inf as they are.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

from services.history import Series

PARQUET_MISSING = "Parquet export needs pyarrow: pip install 'overparam[parquet]'"


class ParquetUnavailable(Exception):
    """pyarrow is not installed."""


def csv_value(value: float | None) -> str:
    if value is None or value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def csv_chunks(chunks: Iterable[Series]) -> Iterator[str]:
    """The CSV text, one piece per chunk of points (the header first)."""
    yield "run_id,metric,step,value\n"
    for s in chunks:
        # Metric names match [A-Za-z0-9_.\-/]+: never quoted.
        prefix = f"{s.run_id},{s.metric},"
        yield "".join(f"{prefix}{step},{csv_value(value)}\n" for step, value in s.points)


def parquet_file(chunks: Iterable[Series]) -> IO[bytes]:
    """A Parquet file of the points (one row group per chunk), rewound; raises if no pyarrow."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ParquetUnavailable(PARQUET_MISSING) from exc
    schema = pa.schema(
        [
            ("run_id", pa.int64()),
            ("metric", pa.dictionary(pa.int32(), pa.string())),
            ("step", pa.int64()),
            ("value", pa.float64()),
        ]
    )
    # Returned open (the caller streams and closes it); closed here only on failure.
    out: Any = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)  # noqa: SIM115
    try:
        _write_parquet(pa, pq, out, schema, chunks)
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out


def _write_parquet(pa: Any, pq: Any, out: IO[bytes], schema: Any, chunks: Iterable[Series]) -> None:
    with pq.ParquetWriter(out, schema) as writer:
        for s in chunks:
            n = len(s.points)
            steps, values = zip(*s.points, strict=True) if n else ((), ())
            table = pa.table(
                {
                    "run_id": pa.array([s.run_id] * n, pa.int64()),
                    "metric": pa.array([s.metric] * n, pa.string()).dictionary_encode(),
                    "step": pa.array(steps, pa.int64()),
                    "value": pa.array(
                        [float("nan") if v is None else v for v in values], pa.float64()
                    ),
                },
                schema=schema,
            )
            writer.write_table(table)
