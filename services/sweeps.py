"""Sweep specs: validation against the run contract and the caps, and expansion into runs.

A spec is ``base`` (a partial :class:`worker.config.RunConfig`) plus ``grid`` (dotted field
path → list of values, expanded as a cartesian product) plus optional ``runs`` (a list of
explicit override sets, each combined with every grid point). Errors name the field where the
user wrote the bad value: ``grid.width[2]``, ``runs[0].lr`` or ``base.data.n``; an unknown
field says which known one it resembles. Every error of a spec is reported at once: unknown
keys and empty value lists are set aside and the rest is still expanded and validated (up to
the run cap), so an error in ``base`` never hides behind one in ``grid``.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.orm import Session

from services.cluster import cluster_nodes
from services.datasets import DatasetCheck
from services.errors import FieldError, SpecError
from services.manifest import base_manifest
from services.models import Run, Sweep
from services.resources import (
    MIB,
    ResourceSpec,
    largest_factor,
    memory_terms,
    resolve,
    why_it_cannot_fit,
)
from services.settings import Settings
from services.storable import StoredText, check_depth
from worker.config import RunConfig


class SweepSpec(BaseModel):
    """The body of ``POST /api/v1/sweeps`` and the content of a sweep YAML file. Unknown keys
    are refused by :func:`expand` (with a "did you mean") together with every other error."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

    name: StoredText = Field("sweep", min_length=1, max_length=200, description="a label")
    base: Annotated[dict[str, Any], AfterValidator(check_depth)] = Field(
        default_factory=dict, description="partial run config"
    )
    grid: Annotated[dict[str, list[Any]], AfterValidator(check_depth)] = Field(
        default_factory=dict, description="dotted field path -> values (cartesian product)"
    )
    runs: Annotated[list[dict[str, Any]], AfterValidator(check_depth)] = Field(
        default_factory=list, description="explicit override sets, each crossed with the grid"
    )
    resources: ResourceSpec = Field(
        default_factory=ResourceSpec,
        description="per-run CPUs, GPUs (fractions share a GPU) and memory; unset: estimated",
    )
    priority: int = Field(
        0, ge=-1000, le=1000, description="among its owner's queued runs, higher starts first"
    )


RunCheck = Callable[[RunConfig], list[tuple[str, Any, str]]]


@dataclass(frozen=True)
class ExpandedRun:
    config: RunConfig
    overrides: dict[str, Any]


def _field_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    paths = set()
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.add(path)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths |= _field_paths(annotation, f"{path}.")
    return paths


RUN_FIELDS = frozenset(_field_paths(RunConfig))


def _set_path(target: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        node = target.get(key)
        if not isinstance(node, dict):
            node = target[key] = {}
        target = node
    target[leaf] = value


def _flatten(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"data": {"n": 3}} -> {"data.n": 3}; dotted keys pass through."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and f"{prefix}{key}" in RUN_FIELDS:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _loc_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if not isinstance(part, int))


def unknown_field(key: str, known: Iterable[str], what: str = "run config field") -> str:
    """The reason for an unknown key, with the closest known one when there is one."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"unknown {what}" + (f"; did you mean {close[0]!r}?" if close else "")


def _check_keys(spec: SweepSpec) -> list[FieldError]:
    errors = [
        FieldError(key, value, unknown_field(key, SweepSpec.model_fields, "sweep spec field"))
        for key, value in (spec.model_extra or {}).items()
    ]
    for key, values in spec.grid.items():
        if key not in RUN_FIELDS:
            errors.append(FieldError(f"grid.{key}", key, unknown_field(key, RUN_FIELDS)))
        if not values:
            errors.append(FieldError(f"grid.{key}", values, "needs at least one value"))
    for i, override in enumerate(spec.runs):
        for key in _flatten(override):
            if key not in RUN_FIELDS:
                errors.append(FieldError(f"runs[{i}].{key}", key, unknown_field(key, RUN_FIELDS)))
    return errors


def count_runs(spec: SweepSpec) -> int:
    return math.prod(len(v) for v in spec.grid.values()) * max(1, len(spec.runs))


def _caps(cfg: RunConfig, settings: Settings) -> list[tuple[str, Any, str]]:
    """(field, value, reason) for each cap the config exceeds."""
    caps = [
        ("width", cfg.width, settings.max_width, "OVERPARAM_MAX_WIDTH"),
        ("depth", cfg.depth, settings.max_depth, "OVERPARAM_MAX_DEPTH"),
        ("data.n", cfg.data.n, settings.max_n, "OVERPARAM_MAX_N"),
        ("steps", cfg.steps, settings.max_steps, "OVERPARAM_MAX_STEPS"),
        ("data.teacher_width", cfg.data.teacher_width, settings.max_width, "OVERPARAM_MAX_WIDTH"),
    ]
    out = [
        (field, value, f"exceeds the cap {cap} (raise it with {env})")
        for field, value, cap, env in caps
        if value > cap
    ]
    params = cfg.weight_count()  # fixed layers (train_layers) take memory too
    if params > settings.max_parameters:
        field = largest_factor(cfg)
        reason = (
            f"gives {params} parameters (trained or fixed), over the cap "
            f"{settings.max_parameters} (raise it with OVERPARAM_MAX_PARAMETERS)"
        )
        out.append((field, _value(cfg, field), reason))
    return out + _memory_cap(cfg, settings)


def _value(cfg: RunConfig, path: str) -> Any:
    """The value of the dotted field ``path`` of ``cfg``."""
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _memory_cap(cfg: RunConfig, settings: Settings) -> list[tuple[str, Any, str]]:
    """The run's estimated memory over ``max_run_memory_mb``, blamed on its largest term."""
    terms = memory_terms(cfg)
    total_mb = sum(terms.values()) // MIB
    if total_mb <= settings.max_run_memory_mb:
        return []
    field = max(terms, key=lambda name: terms[name])
    reason = (
        f"needs an estimated {total_mb} MiB, over the cap {settings.max_run_memory_mb} MiB "
        "per run (raise it with OVERPARAM_MAX_RUN_MEMORY_MB)"
    )
    return [(field, _value(cfg, field), reason)]


def _where(path: str, grid_index: dict[str, int], explicit: dict[str, Any], j: int) -> str:
    """The place in the spec where the user wrote the value of run-config field ``path``."""
    if path in explicit:
        return f"runs[{j}].{path}"
    if path in grid_index:
        return f"grid.{path}[{grid_index[path]}]"
    return f"base.{path}" if path else "base"


def _validate(
    base: dict[str, Any], overrides: dict[str, Any], settings: Settings, check: RunCheck
) -> tuple[RunConfig | None, list[tuple[str, Any, str]]]:
    """``base`` with ``overrides`` (dotted paths) as a RunConfig, or the (path, value, reason)
    of each problem: pydantic's errors (an unknown key worded with its closest field), the
    caps the config exceeds or what ``check`` finds."""
    merged = copy.deepcopy(base)
    for path, value in overrides.items():
        _set_path(merged, path, value)
    try:
        cfg = RunConfig.model_validate(merged)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            path = _loc_path(e["loc"])
            reason = unknown_field(path, RUN_FIELDS) if e["type"] == "extra_forbidden" else e["msg"]
            problems.append((path, e.get("input"), reason))
        return None, problems
    return cfg, _caps(cfg, settings) + check(cfg)


def _unique(errors: Iterable[FieldError]) -> list[FieldError]:
    """The first error of each field."""
    seen: dict[str, FieldError] = {}
    for error in errors:
        seen.setdefault(error.field, error)
    return list(seen.values())


def _combinations(spec: SweepSpec) -> Iterator[tuple[dict[str, int], int, dict[str, Any]]]:
    """(grid index, explicit run index, explicit overrides) of every run of the spec, leaving
    out unknown keys and grid keys without values (reported by :func:`_check_keys`)."""
    grid = {k: v for k, v in spec.grid.items() if k in RUN_FIELDS and v}
    explicit = [
        {k: v for k, v in _flatten(override).items() if k in RUN_FIELDS}
        for override in spec.runs or [{}]
    ]
    for combo in itertools.product(*(range(len(values)) for values in grid.values())):
        for j, overrides in enumerate(explicit):
            yield dict(zip(grid, combo, strict=True)), j, overrides


def _no_check(cfg: RunConfig) -> list[tuple[str, Any, str]]:
    return []


def expand(spec: SweepSpec, settings: Settings, check: RunCheck = _no_check) -> list[ExpandedRun]:
    """Validate ``spec`` and expand it into run configs, or raise SpecError naming every bad
    field (past the run cap, only the first cap's worth of runs is validated). ``check`` adds
    the (path, value, reason) of problems a valid config can still have (its dataset)."""
    errors = _check_keys(spec)
    total = count_runs(spec)
    if total > settings.max_runs_per_sweep:
        errors.append(
            FieldError(
                "grid",
                total,
                f"expands to {total} runs, over the cap {settings.max_runs_per_sweep} "
                "(raise it with OVERPARAM_MAX_RUNS_PER_SWEEP)",
            )
        )
    runs: list[ExpandedRun] = []
    combinations = itertools.islice(_combinations(spec), settings.max_runs_per_sweep)
    for grid_index, j, explicit in combinations:
        overrides = {k: spec.grid[k][i] for k, i in grid_index.items()} | explicit
        cfg, problems = _validate(spec.base, overrides, settings, check)
        if cfg is not None and not problems:
            runs.append(ExpandedRun(config=cfg, overrides=overrides))
        for path, value, reason in problems:
            errors.append(FieldError(_where(path, grid_index, explicit, j), value, reason))
    if errors:
        raise SpecError(_unique(errors))
    return runs


@dataclass(frozen=True)
class PlannedRun:
    """An expanded run with the resources it will request."""

    config: RunConfig
    overrides: dict[str, Any]
    resources: dict[str, Any]


def plan_sweep(*, db_session: Session, spec: SweepSpec, settings: Settings) -> list[PlannedRun]:
    """Validate and expand ``spec``, and check that every run fits on a node the dispatcher
    last saw, and that its uploaded dataset exists and has the shape its config says; stores
    nothing (``POST /sweeps?dry_run=true`` answers with this)."""
    expanded = expand(spec, settings, DatasetCheck(db_session))
    requests = [resolve(spec.resources, item.config, settings) for item in expanded]
    nodes = cluster_nodes(db_session=db_session)
    for item, request in zip(expanded, requests, strict=True):
        reason = why_it_cannot_fit(request, nodes)
        if reason:
            overrides = " ".join(f"{k}={v}" for k, v in item.overrides.items()) or "base"
            raise SpecError(
                [FieldError("resources", request.as_dict(), f"the run {overrides} {reason}")]
            )
    return [
        PlannedRun(item.config, item.overrides, request.as_dict())
        for item, request in zip(expanded, requests, strict=True)
    ]


def create_sweep(
    *, db_session: Session, spec: SweepSpec, settings: Settings, owner_id: int | None = None
) -> Sweep:
    """Store the sweep and all its runs (``queued``, owned by ``owner_id``) in the caller's
    transaction."""
    planned = plan_sweep(db_session=db_session, spec=spec, settings=settings)
    sweep = Sweep(
        name=spec.name,
        spec=spec.model_dump(),
        run_count=len(planned),
        owner_id=owner_id,
        priority=spec.priority,
    )
    db_session.add(sweep)
    db_session.flush()
    manifest = base_manifest()
    for index, item in enumerate(planned):
        config = item.config.model_dump(mode="json")
        db_session.add(
            Run(
                sweep_id=sweep.id,
                index=index,
                config=config,
                overrides=item.overrides,
                status="queued",
                attempt=0,
                summary={},
                manifest=manifest
                | {"config": config, "seed": item.config.seed, "data_seed": item.config.data_seed},
                cancel_requested=False,
                resources=item.resources,
                owner_id=owner_id,
                priority=spec.priority,
            )
        )
    db_session.flush()
    return sweep
