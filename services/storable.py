"""What the database can store as a client sent it: text without NUL characters or lone
surrogates, and JSON nested at most ``MAX_JSON_DEPTH`` levels.

PostgreSQL refuses NUL in text and JSONB; a lone surrogate (``"\\ud800"`` is valid JSON) cannot
be encoded as UTF-8 by any driver; and JSON nested hundreds deep overflows the recursion of
whatever walks it next (copies, encoders, the database's parser). Requests are checked at
validation, so such input is a 422 naming its field, never a driver error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import AfterValidator

MAX_JSON_DEPTH = 32


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored; None when it can."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (such as \\ud800), which is not Unicode text"
    return None


def check_text(text: str) -> str:
    """A pydantic validator: ``text`` unchanged, or ValueError saying why it cannot be stored."""
    problem = text_problem(text)
    if problem:
        raise ValueError(problem)
    return text


def _children(value: dict[Any, Any] | list[Any], path: str) -> Iterable[tuple[Any, str, Any]]:
    """(key, path, child) of each item; keys are None for list items."""
    if isinstance(value, dict):
        return ((key, f"{path}.{key}" if path else str(key), v) for key, v in value.items())
    return ((None, f"{path}[{i}]", v) for i, v in enumerate(value))


def json_problem(value: Any, with_text: bool) -> str | None:
    """Why the JSON ``value`` cannot be stored (too deep; with ``with_text`` also a string or key
    that :func:`text_problem` refuses), naming the place; None when it can. Iterative: any
    depth is safe to check."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str) and with_text and (problem := text_problem(item)):
            return f"{path or 'the value'} {problem}"
        if not isinstance(item, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            return f"nested deeper than {MAX_JSON_DEPTH} levels (at {path})"
        for key, child_path, child in _children(item, path):
            if isinstance(key, str) and with_text and (problem := text_problem(key)):
                return f"a key at {path or 'the top'} {problem}"
            stack.append((child, child_path, depth + 1))
    return None


def check_depth(value: Any) -> Any:
    """A pydantic validator: JSON that is at most ``MAX_JSON_DEPTH`` levels deep."""
    problem = json_problem(value, with_text=False)
    if problem:
        raise ValueError(problem)
    return value


def check_json(value: Any) -> Any:
    """A pydantic validator: JSON that can be stored as it is (depth and text)."""
    problem = json_problem(value, with_text=True)
    if problem:
        raise ValueError(problem)
    return value


StoredText = Annotated[str, AfterValidator(check_text)]
StoredJson = Annotated[dict[str, Any], AfterValidator(check_json)]
