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
from services.numbers import number_texts

PARQUET_MISSING = "Parquet export needs pyarrow: pip install 'overparam[parquet]'"


class ParquetUnavailable(Exception):
    """pyarrow is not installed."""


def csv_chunks(series: Iterable[Series]) -> Iterator[str]:
    """The CSV text, one piece per series part (the header first)."""
    yield "run_id,metric,step,value\n"
    for s in series:
        # Metric names match [A-Za-z0-9_.\-/]+: never quoted.
        prefix = f"{s.run_id},{s.metric},"
        texts = number_texts(s.points.values, quote=False)
        steps = s.points.steps.tolist()
        yield "".join(f"{prefix}{step},{text}\n" for step, text in zip(steps, texts, strict=True))


def parquet_file(series: Iterable[Series]) -> IO[bytes]:
    """A Parquet file of the points (a row group per series part), rewound; raises if no
    pyarrow."""
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
        with pq.ParquetWriter(out, schema) as writer:
            for s in series:
                n = len(s.points)
                columns = {
                    "run_id": pa.array([s.run_id] * n, pa.int64()),
                    "metric": pa.array([s.metric] * n, pa.string()).dictionary_encode(),
                    "step": pa.array(s.points.steps, pa.int64()),
                    "value": pa.array(s.points.values, pa.float64()),
                }
                writer.write_table(pa.table(columns, schema=schema))
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out
