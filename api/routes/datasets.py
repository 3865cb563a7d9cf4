"""Datasets: upload (JSON arrays or an .npz), list, get, download, delete.

POST /datasets {"name": ..., "X": [[...]], "y": [...]}             (application/json)
POST /datasets?name=... with the bytes of an .npz holding X and y  (application/x-npz)
"""

from __future__ import annotations

import io
import json
from datetime import datetime
from functools import partial
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import CurrentUser, limited
from api.deps import DatasetId, IdempotencyKeyHeader, Offset, SessionDep, SettingsDep, once
from api.problems import problem, problem_responses
from services import datasets as dataset_service
from services.errors import FieldError, SpecError
from services.settings import Settings
from services.storable import StoredText
from services.users import Caller, audit, check_owner

router = APIRouter(prefix="/datasets", tags=["datasets"])

NPZ_TYPES = ("application/x-npz", "application/octet-stream", "application/zip")


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    owner: str | None = None
    name: str
    n: int
    d: int
    label_dim: int
    checksum: str
    size_bytes: int
    report: dict[str, Any]
    created_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


def _create(
    db: Session, settings: Settings, user: Caller, media_type: str, name: str | None, body: bytes
) -> DatasetPublic:
    if media_type in NPZ_TYPES:
        if not name:
            raise SpecError([FieldError("name", name, "an .npz upload needs ?name=")])
        arrays = dataset_service.arrays_from_npz(body, settings)
    else:
        try:
            spec = dataset_service.DatasetCreate.model_validate(json.loads(body))
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested too deep
            reason = f"not UTF-8 JSON: {exc}" if isinstance(exc, ValueError) else "nested too deep"
            raise SpecError([FieldError("body", None, reason)]) from exc
        name, arrays = spec.name, dataset_service.arrays_from_json(spec, settings)
    dataset = dataset_service.create_dataset(
        db_session=db, name=name, arrays=arrays, owner_id=user.id
    )
    limited(db, user, "max_dataset_bytes", dataset.size_bytes, settings)
    audit(db_session=db, user=user, action="upload_dataset", target=f"dataset:{dataset.id}")
    return DatasetPublic.model_validate(dataset)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {
                    "schema": dataset_service.DatasetCreate.model_json_schema(
                        ref_template="#/components/schemas/{model}"
                    )
                },
                "application/x-npz": {"schema": {"type": "string", "format": "binary"}},
            },
            "required": True,
        }
    },
)
async def create(
    request: Request,
    db: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
    name: Annotated[
        StoredText | None, Query(min_length=1, max_length=200, description="for .npz uploads")
    ] = None,
    key: IdempotencyKeyHeader = None,
) -> Response:
    """Upload X and y; they are validated, and near-parallel rows are reported."""
    body = await request.body()
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    content = f"{media_type}\n{name}\n".encode() + body
    create = partial(_create, db, settings, user, media_type, name, body)
    try:
        created = await run_in_threadpool(once, db, request, user.id, key, content, create)
    except dataset_service.TooLarge as exc:
        return problem(413, "Request too large", str(exc))
    return Response(created.model_dump_json(), status_code=201, media_type="application/json")


@router.get("", response_model=DatasetsPublic)
def list_(
    db: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> DatasetsPublic:
    """Datasets in id order (metadata and reports, not the arrays)."""
    rows, count = dataset_service.list_datasets(db_session=db, limit=limit, offset=offset)
    return DatasetsPublic(data=[DatasetPublic.model_validate(r) for r in rows], count=count)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get(dataset_id: DatasetId, db: SessionDep) -> DatasetPublic:
    """A dataset's shape, checksum and near-parallel report."""
    dataset = dataset_service.get_dataset(db_session=db, dataset_id=dataset_id)
    return DatasetPublic.model_validate(dataset)


@router.get(
    "/{dataset_id}/arrays",
    response_class=Response,
    responses={
        200: {
            "description": "X and y as an .npz file",
            "content": {"application/x-npz": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
def arrays(dataset_id: DatasetId, db: SessionDep) -> Response:
    """X and y as an .npz file."""
    X, y = dataset_service.load_arrays(db_session=db, dataset_id=dataset_id)
    buffer = io.BytesIO()
    np.savez(buffer, X=X, y=y)
    headers = {"Content-Disposition": f'attachment; filename="dataset-{dataset_id}.npz"'}
    return Response(buffer.getvalue(), media_type="application/x-npz", headers=headers)


@router.delete(
    "/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses=problem_responses(409)
)
def delete(dataset_id: DatasetId, db: SessionDep, user: CurrentUser) -> Response:
    """Delete a dataset, unless a queued or running run uses it (409)."""
    owner = dataset_service.get_dataset(db_session=db, dataset_id=dataset_id).owner_id
    check_owner(user, owner, f"dataset {dataset_id}")
    dataset_service.delete_dataset(db_session=db, dataset_id=dataset_id)
    audit(db_session=db, user=user, action="delete_dataset", target=f"dataset:{dataset_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
