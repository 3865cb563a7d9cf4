"""Domain errors the API turns into problem+json responses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldError:
    """One invalid field: its dotted path in the request, the offending value and why."""

    field: str
    value: Any
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "value": self.value, "reason": self.reason}


class SpecError(Exception):
    """A request that parsed but is invalid (422)."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(f"{e.field}: {e.reason}" for e in errors))
        self.errors = errors


class NotFound(Exception):
    """An unknown id (404)."""


class Conflict(Exception):
    """A request that the resource's current state forbids (409)."""
