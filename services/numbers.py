"""Non-finite numbers in JSON and CSV: the one convention of the service.

JSON has no NaN or infinities, so the API writes and accepts them as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (CSV uses the same words, unquoted). Pydantic response models
get the same from ``ser_json_inf_nan="strings"``; this module serves everything else.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import BeforeValidator, WithJsonSchema
from pydantic_core import to_json

if TYPE_CHECKING:
    from services.chunks import Points

WORDS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def word(value: float) -> str:
    """The word of a non-finite ``value``."""
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


def json_number(value: float | None) -> float | str | None:
    """A float as JSON allows it: non-finite values become their words."""
    if value is None or math.isfinite(value):
        return value
    return word(value)


def parse_number(value: Any) -> float:
    """A JSON number (never a boolean) or one of the three words, as a float."""
    kind = type(value)
    if kind is float or kind is int:
        return float(value)
    if kind is str and value in WORDS:
        return WORDS[value]
    raise ValueError('a number, "NaN", "Infinity" or "-Infinity"')


# A validator (not a union) so that a bad value is one error, not one per union member.
JsonNumber = Annotated[
    float,
    BeforeValidator(parse_number),
    WithJsonSchema({"anyOf": [{"type": "number"}, {"enum": list(WORDS)}]}),
]


def json_safe(value: Any) -> Any:
    """``value`` (JSON-like) with every non-finite float replaced by its word."""
    if isinstance(value, float) and not math.isfinite(value):
        return word(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def number_texts(values: npt.NDArray[np.float64], quote: bool = True) -> list[str]:
    """Each value as JSON text (``quote``) or CSV text, in the shortest form that reads back
    exactly (pydantic-core formats them: ten times faster than ``repr``)."""
    if not len(values):
        return []
    texts = to_json(values.tolist()).decode()[1:-1].split(",")
    for i in np.flatnonzero(~np.isfinite(values)).tolist():
        text = word(float(values[i]))
        texts[i] = f'"{text}"' if quote else text
    return texts


def point_objects(run_id: int | None, metric: str, points: Points) -> str:
    """``{"run_id", "metric", "step", "value"}`` objects of one series, comma-separated
    (without "run_id" when it is None)."""
    prefix = "{" if run_id is None else f'{{"run_id":{run_id},'
    prefix += f'"metric":{json.dumps(metric)},"step":'
    texts = number_texts(points.values)
    return ",".join(
        f'{prefix}{step},"value":{text}}}'
        for step, text in zip(points.steps.tolist(), texts, strict=True)
    )
