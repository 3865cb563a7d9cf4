"""The OpenAPI document, made to tell the truth.

FastAPI's own document declares its ``{"detail": [...]}`` 422 for every route and knows the run
configuration inside a sweep spec only as an object. Here every error a route can answer is
declared as ``application/problem+json`` (the ``Problem`` schema): 422 where it takes
parameters or a body, 400 and 413 where it takes a body, 404 where its path names a resource,
500 everywhere, 400/401/403/429 under ``/api/v1`` (Host, token, owner or quota, rate limit)
and 415 there where it takes a body, and route-specific ones (409, 501, 503) from the routes'
own ``responses``. The run configuration is :class:`worker.config.RunConfig`'s schema (every
field with its bounds and description, this deployment's caps as maximums): ``base`` of a
sweep spec, each of its ``runs`` (also by dotted path), the values of its ``grid``, and the
``config`` of ``POST /runs``. Validation itself stays with the services.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from api.problems import Problem, problem_responses
from services.settings import Settings
from services.sweeps import RUN_FIELDS
from worker.config import RunConfig

REF = "#/components/schemas/{model}"
FASTAPI_ONLY = ("HTTPValidationError", "ValidationError")


def install(app: FastAPI, *bodies: type[BaseModel]) -> None:
    """Serve :func:`document` as the app's OpenAPI document (built once); ``bodies`` are request
    bodies that routes validate themselves from the raw bytes (and reference in
    ``openapi_extra``): they go into its components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, bodies)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document(app: FastAPI, bodies: tuple[type[BaseModel], ...] = ()) -> dict[str, Any]:
    """The OpenAPI document of ``app`` (see the module docstring)."""
    schema = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        description=app.description,
        routes=app.routes,
        separate_input_output_schemas=app.separate_input_output_schemas,
    )
    components: dict[str, Any] = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in FASTAPI_ONLY:
        components.pop(name, None)
    components |= problem_schemas() | run_config_schemas(app.state.settings)
    for model in bodies:
        body = model.model_json_schema(ref_template=REF)
        components |= body.pop("$defs", {}) | {model.__name__: body}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            declare_errors(path, operation)
    document_run_configs(components)
    return schema


def problem_schemas() -> dict[str, Any]:
    """``Problem`` and the schemas it refers to, as components."""
    schema = Problem.model_json_schema(ref_template=REF)
    return schema.pop("$defs", {}) | {"Problem": schema}


def declare_errors(path: str, operation: dict[str, Any]) -> None:
    """Declare the problems every route of its kind can answer (replacing FastAPI's 422)."""
    statuses = [500]
    if operation.get("parameters") or "requestBody" in operation:
        statuses.append(422)
    if "requestBody" in operation:
        statuses += [400, 413]
    if "{" in path:
        statuses.append(404)
    if path.startswith("/api/v1"):  # api/auth.py: a Host, a token, an owner or quota, a rate
        statuses += [400, 401, 403, 429]
        if "requestBody" in operation:
            statuses.append(415)
    responses = operation.setdefault("responses", {})
    responses |= {str(status): spec for status, spec in problem_responses(*statuses).items()}


CAPS = {  # (schema, property): (setting, environment variable)
    ("RunConfig", "width"): ("max_width", "OVERPARAM_MAX_WIDTH"),
    ("RunConfig", "depth"): ("max_depth", "OVERPARAM_MAX_DEPTH"),
    ("RunConfig", "steps"): ("max_steps", "OVERPARAM_MAX_STEPS"),
    ("DataConfig", "n"): ("max_n", "OVERPARAM_MAX_N"),
    ("DataConfig", "teacher_width"): ("max_width", "OVERPARAM_MAX_WIDTH"),
}


def run_config_schemas(settings: Settings) -> dict[str, Any]:
    """``RunConfig`` and ``DataConfig`` with this deployment's caps as maximums, and the
    ``RunOverrides`` and ``SweepGrid`` of sweep specs, as components."""
    schema = RunConfig.model_json_schema(ref_template=REF)
    schemas: dict[str, Any] = schema.pop("$defs", {}) | {"RunConfig": schema}
    schema["description"] += (
        " Every field is optional (the defaults are shown); past the caps, and for combinations "
        "the fields' descriptions rule out, the request is a 422 naming the field."
    )
    for (model, name), (setting, env) in CAPS.items():
        field = schemas[model]["properties"][name]
        field["maximum"] = getattr(settings, setting)
        field["description"] += f" (capped here at {field['maximum']}: {env})"
    schemas["RunOverrides"] = overrides_schema(schemas)
    schemas["SweepGrid"] = grid_schema(schemas)
    return schemas


def field_schema(schemas: dict[str, Any], path: str) -> dict[str, Any]:
    """The schema of the run config field at dotted ``path``, without its default."""
    model, parts = "RunConfig", path.split(".")
    for part in parts[:-1]:
        ref = schemas[model]["properties"][part]["$ref"]
        model = ref.rsplit("/", 1)[1]
    field = copy.deepcopy(schemas[model]["properties"][parts[-1]])
    field.pop("default", None)
    return dict(field)


def overrides_schema(schemas: dict[str, Any]) -> dict[str, Any]:
    """One entry of a spec's ``runs``: run config fields, nested or by dotted path."""
    return {
        "type": "object",
        "title": "RunOverrides",
        "description": "Run config fields that override the base for one set of runs, nested "
        '({"data": {"n": 64}}) or by dotted path ({"data.n": 64}); crossed with the grid.',
        "properties": {path: field_schema(schemas, path) for path in sorted(RUN_FIELDS)},
        "additionalProperties": False,
    }


def grid_schema(schemas: dict[str, Any]) -> dict[str, Any]:
    """A spec's ``grid``: dotted run config path -> the values it takes."""
    properties = {
        path: {"type": "array", "minItems": 1, "items": field_schema(schemas, path)}
        for path in sorted(RUN_FIELDS)
    }
    return {
        "type": "object",
        "title": "SweepGrid",
        "description": "Dotted run config path -> its values; the runs are the cartesian "
        "product of all of them.",
        "properties": properties,
        "additionalProperties": False,
    }


def _ref(name: str, description: str) -> dict[str, Any]:
    return {"$ref": REF.format(model=name), "description": description}


def document_run_configs(components: dict[str, Any]) -> None:
    """Point the free-form run configs of request bodies at the schemas above."""
    spec = components["SweepSpec"]["properties"]
    spec["base"] = _ref("RunConfig", "the run config every run starts from (partial)")
    spec["grid"] = _ref("SweepGrid", "dotted field path -> values (cartesian product)")
    spec["runs"] = {
        "type": "array",
        "items": {"$ref": REF.format(model="RunOverrides")},
        "description": "explicit override sets, each crossed with the grid",
    }
    config = components["RunCreate"]["properties"]["config"]
    config.pop("additionalProperties", None)
    config.pop("type", None)
    config["anyOf"] = [
        {"$ref": REF.format(model="RunConfig")},
        {"type": "object", "title": "External run config", "description": "any JSON object"},
    ]
