"""The OpenAPI document tells the truth: every error is declared as problem+json, the run
configuration is documented field by field, every ``$ref`` resolves; and Schemathesis, fuzzing
every operation against the live app on SQLite, finds no 5xx and no response that the document
does not describe (status code, content type, headers, body), and sees every request that
breaks the schema refused."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi import checks

from api.main import create_app
from services.settings import Settings
from services.sweeps import RUN_FIELDS
from tests.conftest import make_settings

PROBLEM_REF = "#/components/schemas/Problem"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    """The document as served (it needs no database)."""
    client = TestClient(create_app(make_settings("sqlite://")))  # no lifespan: no database
    return client.get("/api/v1/openapi.json").json()  # type: ignore[no-any-return]


def operations(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield f"{method.upper()} {path}", operation


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def test_every_ref_resolves(document: dict[str, Any]) -> None:
    for ref in set(refs(document)):
        node: Any = document
        for part in ref.removeprefix("#/").split("/"):
            assert part in node, f"broken $ref {ref}"
            node = node[part]


def test_every_error_is_declared_as_a_problem(document: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in document["components"]["schemas"]
    problem = document["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}
    assert "errors" in problem["properties"]
    for name, operation in operations(document):
        errors = {s: r for s, r in operation["responses"].items() if not s.startswith("2")}
        assert "500" in errors, name
        if operation.get("parameters") or "requestBody" in operation:
            assert "422" in errors, name
        if "{" in name:
            assert "404" in errors, name
        for status, response in errors.items():
            assert response["content"] == {
                "application/problem+json": {"schema": {"$ref": PROBLEM_REF}}
            }, f"{name} {status}"
    responses = dict(operations(document))
    assert {"409"} <= set(responses["POST /api/v1/runs/{run_id}/metrics"]["responses"])
    assert {"501"} <= set(responses["GET /api/v1/runs/{run_id}/metrics/export"]["responses"])
    assert {"200", "201"} <= set(responses["POST /api/v1/sweeps"]["responses"])


def test_the_run_config_is_documented_field_by_field(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    spec = schemas["SweepSpec"]["properties"]
    assert spec["base"]["$ref"].endswith("/RunConfig")
    assert spec["runs"]["items"]["$ref"].endswith("/RunOverrides")
    assert spec["grid"]["$ref"].endswith("/SweepGrid")
    config = schemas["RunCreate"]["properties"]["config"]["anyOf"]
    assert config[0]["$ref"].endswith("/RunConfig")
    for model in ("RunConfig", "DataConfig"):
        assert "required" not in schemas[model], "every field of a partial config is optional"
        for name, field in schemas[model]["properties"].items():
            assert field.get("description"), f"{model}.{name} has no description"
    run, data = schemas["RunConfig"]["properties"], schemas["DataConfig"]["properties"]
    settings = Settings(database_url="sqlite://", embedded_dispatcher=False)
    assert run["width"]["maximum"] == settings.max_width and run["width"]["exclusiveMinimum"] == 0
    assert data["n"]["maximum"] == settings.max_n
    assert (
        run["seed"]["maximum"] == 2**63 - 1
        and data["dataset_id"]["anyOf"][0]["maximum"] == 2**31 - 1
    )
    assert set(schemas["RunOverrides"]["properties"]) == set(RUN_FIELDS)
    grid = schemas["SweepGrid"]["properties"]
    assert set(grid) == set(RUN_FIELDS) and grid["data.n"]["items"]["maximum"] == settings.max_n


CHECKS = [
    not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


def checks_of(operation: Any) -> list[Any]:
    """/readyz answers a documented 503 here (no dispatcher leads): its status must conform,
    but it is not a server error."""
    if operation.path == "/readyz":
        return [check for check in CHECKS if check is not not_a_server_error]
    return CHECKS


def fuzz(operation: Any, mode: GenerationMode, examples: int) -> tuple[int, list[str]]:
    """Up to ``examples`` generated cases of one operation in one mode: (cases, failures)."""
    count, failures = 0, []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        nonlocal count
        count += 1
        case.call_and_validate(checks=checks_of(operation))

    try:
        run()
    except (Exception, BaseExceptionGroup) as exc:  # Schemathesis's FailureGroup is a Base…
        failures.append(f"{operation.label} ({mode.value}): {exc}"[:3000])
    return count, failures


@pytest.mark.parametrize(
    ("examples", "least"), [(3, 100), pytest.param(25, 1000, marks=pytest.mark.slow)]
)
def test_schemathesis_finds_no_5xx_and_no_undocumented_response(
    tmp_path: Path, examples: int, least: int, migrated_sqlite: Callable[[Path], str]
) -> None:
    """Every operation, positive and negative cases (up to ``examples`` each), against the app
    on SQLite; streams are read up to Schemathesis's event limit and their events checked."""
    url = migrated_sqlite(tmp_path / "overparam.db")
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", create_app(make_settings(url)))
    started, total, failures = time.monotonic(), 0, []
    for result in schema.get_all_operations():
        operation = result.ok()
        raw = operation.definition.raw
        negatable = raw.get("parameters") or "requestBody" in raw  # /livez takes nothing
        for mode in [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * bool(negatable):
            count, failed = fuzz(operation, mode, examples)
            total, failures = total + count, failures + failed
    print(f"schemathesis: {total} cases in {time.monotonic() - started:.0f} s")
    assert not failures, f"{len(failures)} operations failed:\n\n" + "\n\n".join(failures)
    assert total >= least
