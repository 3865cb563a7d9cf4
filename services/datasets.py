"""Uploaded datasets: validation, compact storage, the near-parallel report, and the loader.

A dataset is X (n, d) and y (n,) or (n, k), finite float64, uploaded as JSON arrays or an
``.npz`` with arrays ``X`` and ``y``. It is stored as little-endian float64 bytes plus its
shape; its checksum is the worker's (sha256 of X's bytes then y's), so a run's manifest can be
matched to the dataset it trained on. Runs refer to one with ``config.data = {"kind":
"dataset", "dataset_id": <id>}``; a dataset that a queued or running run refers to cannot be
deleted.

The convergence theory assumes no two inputs are parallel (Du et al. 2019, Assumption 3.1) and
δ-separated inputs (Allen-Zhu et al. 2019): duplicate rows make the Gram matrix singular (and
antiparallel ones for odd activations), so every upload reports rows whose |cos| ≥
``NEAR_PARALLEL_COS`` and δ = min ‖x̂_i − x̂_j‖ over the unit-normalized rows, with the worker's
threshold and arithmetic (:mod:`worker.separation`), so the upload and its runs agree.
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib import format as npy_format
from pydantic import BaseModel, ConfigDict, Field, StrictFloat
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.errors import Conflict, FieldError, NotFound, SpecError
from services.models import Dataset, Run
from services.settings import Settings
from services.storable import StoredText
from worker.config import DataConfig, RunConfig
from worker.separation import PARALLEL_TOLERANCE, cosine_blocks, separation, unit_rows

NEAR_PARALLEL_COS = 1 - PARALLEL_TOLERANCE  # |cos| at or above: an angle under ~0.08°
REPORTED_PAIRS = 10
ACTIVE_STATUSES = ("queued", "running")

Number = StrictFloat  # JSON numbers (ints included); strings and booleans are refused


class DatasetCreate(BaseModel):
    """The JSON body of ``POST /api/v1/datasets``."""

    model_config = ConfigDict(extra="forbid")

    name: StoredText = Field(min_length=1, max_length=200)
    X: list[list[Number]] = Field(description="n rows of d inputs")
    y: list[Number] | list[list[Number]] = Field(description="n labels, or n rows of k labels")


class TooLarge(Exception):
    """An upload over the size cap (413)."""


@dataclass(frozen=True)
class Arrays:
    X: np.ndarray
    y: np.ndarray


def _byte_cap(n_values: int, settings: Settings) -> None:
    size = 8 * n_values
    if size > settings.max_dataset_bytes:
        raise TooLarge(
            f"the dataset holds {size} bytes of float64, over the cap {settings.max_dataset_bytes}"
            " (raise it with OVERPARAM_MAX_DATASET_BYTES and OVERPARAM_MAX_REQUEST_BYTES)"
        )


def _ragged(field: str, rows: Sequence[Sequence[float]]) -> FieldError | None:
    width = len(rows[0])
    if width == 0:
        return FieldError(f"{field}[0]", [], "rows need at least one value")
    for i, row in enumerate(rows):
        if len(row) != width:
            return FieldError(
                f"{field}[{i}]", f"{len(row)} values", f"every row needs {width}, like {field}[0]"
            )
    return None


def arrays_from_json(body: DatasetCreate, settings: Settings) -> Arrays:
    """X and y of a JSON upload as float64 arrays, or SpecError naming what is wrong."""
    if not body.X:
        raise SpecError([FieldError("X", [], "needs at least one row")])
    errors = [e for e in (_ragged("X", body.X),) if e]
    if body.y and isinstance(body.y[0], list):
        errors += [e for e in (_ragged("y", body.y),) if e]
    if errors:
        raise SpecError(errors)
    _byte_cap(len(body.X) * len(body.X[0]) + len(body.y) * max(1, _width(body.y)), settings)
    return validate(
        np.asarray(body.X, dtype=np.float64), np.asarray(body.y, dtype=np.float64), settings
    )


def _width(y: Sequence[Any]) -> int:
    return len(y[0]) if y and isinstance(y[0], list) else 0


NPZ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


def _declared(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The shape and dtype that member ``key`` of an .npz declares, read from its header alone
    (``numpy.load`` allocates the declared shape before it reads a byte of data)."""
    with archive.open(f"{key}.npy") as member:
        version = npy_format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(member)
        else:
            shape, _, dtype = npy_format.read_array_header_2_0(member)
    return tuple(shape), dtype


def _check_declared(
    key: str, shape: tuple[int, ...], dtype: np.dtype[Any], settings: Settings
) -> FieldError | None:
    """A FieldError for a non-numeric dtype or too many rows; TooLarge past the byte cap."""
    if dtype.hasobject or dtype.kind not in "fiub":
        return FieldError(key, str(dtype), "needs a numeric dtype (float, int or bool)")
    size = 8 * math.prod(shape)  # float64 once converted
    if size > settings.max_dataset_bytes:
        raise TooLarge(
            f"{key} declares shape {shape}: {size} bytes of float64, over the cap "
            f"{settings.max_dataset_bytes} (raise it with OVERPARAM_MAX_DATASET_BYTES)"
        )
    if shape and shape[0] > settings.max_n:
        return FieldError(
            key, f"{shape[0]} rows", f"over the cap {settings.max_n} (OVERPARAM_MAX_N)"
        )
    return None


def _read_member(archive: zipfile.ZipFile, key: str, settings: Settings) -> np.ndarray:
    """Member ``key`` of an .npz, its header checked before its data is read."""
    if f"{key}.npy" not in archive.namelist():
        raise SpecError([FieldError(key, None, f"the .npz has no array {key!r}")])
    try:
        shape, dtype = _declared(archive, key)
        error = _check_declared(key, shape, dtype, settings)
        if error:
            raise SpecError([error])
        with archive.open(f"{key}.npy") as member:
            return np.asarray(npy_format.read_array(member, allow_pickle=False))
    except NPZ_ERRORS as exc:
        raise SpecError([FieldError(key, None, f"not a readable .npy array: {exc}")]) from exc


def arrays_from_npz(data: bytes, settings: Settings) -> Arrays:
    """X and y of an ``.npz`` upload; the sizes its zip and .npy headers declare are checked
    before anything is unpacked."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise SpecError([FieldError("body", f"{len(data)} bytes", "not an .npz file")]) from exc
    with archive:
        declared = sum(info.file_size for info in archive.infolist())
        if declared > settings.max_dataset_bytes + 4096:  # .npy headers are small
            raise TooLarge(
                f"the .npz unpacks to {declared} bytes, over the cap {settings.max_dataset_bytes}"
                " (raise it with OVERPARAM_MAX_DATASET_BYTES)"
            )
        X, y = (_read_member(archive, key, settings) for key in ("X", "y"))
    return validate(X.astype(np.float64), y.astype(np.float64), settings)


def validate(X: np.ndarray, y: np.ndarray, settings: Settings) -> Arrays:
    """Shapes, matching lengths, finiteness and the n cap; SpecError names each failure."""
    errors = []
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        errors.append(FieldError("X", list(X.shape), "needs shape (n, d) with n, d ≥ 1"))
    if y.ndim not in (1, 2) or (y.ndim == 2 and y.shape[1] == 0):
        errors.append(FieldError("y", list(y.shape), "needs shape (n,) or (n, k) with k ≥ 1"))
    if errors:
        raise SpecError(errors)
    n = X.shape[0]
    if y.shape[0] != n:
        errors.append(FieldError("y", f"{y.shape[0]} labels", f"needs one per row of X ({n})"))
    if n > settings.max_n:
        errors.append(
            FieldError("X", f"{n} rows", f"over the cap {settings.max_n} (OVERPARAM_MAX_N)")
        )
    for key, array in (("X", X), ("y", y)):
        bad = np.argwhere(~np.isfinite(array))
        if len(bad):
            index = "".join(f"[{i}]" for i in bad[0])
            errors.append(
                FieldError(
                    f"{key}{index}",
                    str(array[tuple(bad[0])]),
                    f"not finite ({len(bad)} such values): datasets must be finite",
                )
            )
    if errors:
        raise SpecError(errors)
    return Arrays(np.ascontiguousarray(X, dtype="<f8"), np.ascontiguousarray(y, dtype="<f8"))


def near_parallel_report(X: np.ndarray, block: int = 1024) -> dict[str, Any]:
    """Pairs of rows i < j with |cos(x_i, x_j)| ≥ NEAR_PARALLEL_COS, zero rows, and δ.

    Blockwise normalized Gram products: O(n² d) time, O(block · n) memory. |cos| is clamped
    to 1 (rounding can exceed it).
    """
    norms = np.linalg.norm(X, axis=1)
    zero = np.flatnonzero(norms == 0)
    unit = unit_rows(X)
    count = 0
    examples: list[list[float]] = []
    best, best_pair = 0.0, None
    for start, block_cos in cosine_blocks(unit, block):
        cos = np.minimum(np.nan_to_num(np.abs(block_cos)), 1.0)  # pairs j ≤ i: 0
        hits = np.argwhere(cos >= NEAR_PARALLEL_COS)
        count += len(hits)
        for i, j in hits[: REPORTED_PAIRS - len(examples)]:
            examples.append([int(start + i), int(j), float(cos[i, j])])
        flat = int(np.argmax(cos)) if cos.size else 0
        if cos.size and cos.flat[flat] > best:
            i, j = divmod(flat, cos.shape[1])
            best, best_pair = float(cos[i, j]), [int(start + i), int(j)]
    geometry = separation(X, block)
    return {
        "near_parallel_pairs": count,
        "near_parallel_examples": examples,
        "threshold_abs_cos": NEAR_PARALLEL_COS,
        "max_abs_cos": best,
        "max_abs_cos_pair": best_pair,
        "min_separation": None if geometry.closest is None else geometry.min_separation,
        "min_separation_pair": None if geometry.closest is None else list(geometry.closest),
        "zero_rows": [int(i) for i in zero[:REPORTED_PAIRS]],
        "zero_row_count": len(zero),
    }


def checksum(X: np.ndarray, y: np.ndarray) -> str:
    """sha256 of X's float64 bytes then y's: the worker's data checksum."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(X, dtype="<f8").tobytes())
    digest.update(np.ascontiguousarray(y, dtype="<f8").tobytes())
    return digest.hexdigest()


def create_dataset(
    *, db_session: Session, name: str, arrays: Arrays, owner_id: int | None = None
) -> Dataset:
    X, y = arrays.X, arrays.y
    dataset = Dataset(
        owner_id=owner_id,
        name=name,
        n=X.shape[0],
        d=X.shape[1],
        label_dim=0 if y.ndim == 1 else y.shape[1],
        x_data=X.tobytes(),
        y_data=y.tobytes(),
        checksum=checksum(X, y),
        size_bytes=X.nbytes + y.nbytes,
        report=near_parallel_report(X),
    )
    db_session.add(dataset)
    db_session.flush()
    return dataset


def get_dataset(*, db_session: Session, dataset_id: int) -> Dataset:
    dataset = db_session.get(Dataset, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} does not exist")
    return dataset


def list_datasets(*, db_session: Session, limit: int, offset: int) -> tuple[Sequence[Dataset], int]:
    total = db_session.scalar(select(func.count()).select_from(Dataset)) or 0
    rows = db_session.scalars(select(Dataset).order_by(Dataset.id).limit(limit).offset(offset))
    return rows.all(), total


def load_arrays(*, db_session: Session, dataset_id: int) -> tuple[np.ndarray, np.ndarray]:
    """X (n, d) and y (n,) or (n, k) as writable float64 arrays (the dispatcher's seam)."""
    dataset = get_dataset(db_session=db_session, dataset_id=dataset_id)
    X = np.frombuffer(dataset.x_data, dtype="<f8").reshape(dataset.n, dataset.d)
    y = np.frombuffer(dataset.y_data, dtype="<f8")
    if dataset.label_dim:
        y = y.reshape(dataset.n, dataset.label_dim)
    return X.astype(np.float64), y.astype(np.float64)


class DatasetCheck:
    """Checks a run config against the dataset it names, before the run is queued (the worker
    would find a missing dataset or a wrong shape only when the run starts): called with a
    RunConfig, it returns the (field, value, reason) of each disagreement. Datasets and label
    checks are looked up once per sweep."""

    def __init__(self, db_session: Session) -> None:
        self.db_session = db_session
        self.class_checks: dict[tuple[int, int], bool] = {}

    def __call__(self, cfg: RunConfig) -> list[tuple[str, Any, str]]:
        data = cfg.data
        if data.kind != "dataset" or data.dataset_id is None:
            return []
        dataset = self.db_session.get(Dataset, data.dataset_id)
        if dataset is None:
            reason = "no dataset has this id (upload one with POST /api/v1/datasets)"
            return [("data.dataset_id", data.dataset_id, reason)]
        label_dim = max(1, dataset.label_dim)
        shown = f"dataset {dataset.id} ({dataset.n} × {dataset.d}, y with {label_dim} columns)"
        problems = [
            (f"data.{name}", mine, f"disagrees with {shown}")
            for name, mine, theirs in (
                ("n", data.n, dataset.n),
                ("d", data.d, dataset.d),
                ("label_dim", data.label_dim, label_dim),
            )
            if mine != theirs
        ]
        if cfg.loss == "cross_entropy" and data.num_classes and not self._classes(dataset, data):
            reason = f"y of dataset {dataset.id} holds values other than 0..{data.num_classes - 1}"
            problems.append(("data.num_classes", data.num_classes, reason))
        return problems

    def _classes(self, dataset: Dataset, data: DataConfig) -> bool:
        """Whether every label of ``dataset`` is a class index below ``data.num_classes``."""
        assert data.num_classes is not None
        key = (dataset.id, data.num_classes)
        if key not in self.class_checks:
            y = np.frombuffer(dataset.y_data, dtype="<f8")
            self.class_checks[key] = bool(
                np.all((y == np.round(y)) & (y >= 0) & (y < data.num_classes))
            )
        return self.class_checks[key]


def referenced_by(config: dict[str, Any], dataset_id: int) -> bool:
    data = config.get("data")
    return (
        isinstance(data, dict)
        and data.get("kind") == "dataset"
        and data.get("dataset_id") == dataset_id
    )


def delete_dataset(*, db_session: Session, dataset_id: int) -> None:
    """Delete a dataset no queued or running run refers to (Conflict naming them otherwise)."""
    dataset = get_dataset(db_session=db_session, dataset_id=dataset_id)
    active = db_session.execute(
        select(Run.id, Run.config).where(Run.status.in_(ACTIVE_STATUSES)).order_by(Run.id)
    )
    users = [run_id for run_id, config in active if referenced_by(config, dataset_id)]
    if users:
        shown = ", ".join(map(str, users[:20])) + (" …" if len(users) > 20 else "")
        raise Conflict(f"dataset {dataset_id} is used by queued or running runs: {shown}")
    db_session.delete(dataset)
    db_session.flush()
