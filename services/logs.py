"""Log lines: plain text (the default), or one JSON object per line (``OVERPARAM_LOG_FORMAT=json``)
with the id of the request each line belongs to.

The request id lives in a context variable that ``api/observe.py`` sets for each request; the
request's threads (anyio copies the context into them) and uvicorn's access line (written while
the answer is sent, inside the request's task) see it. Lines outside any request (start-up, the
dispatcher) carry ``null``.
"""

from __future__ import annotations

import copy
import json
import logging
import logging.config
import re
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
# A client's X-Request-ID is kept only when it cannot forge a log line or a header.
_WELL_FORMED = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def request_id_from(header: str | None) -> str:
    """The request's id: the client's ``X-Request-ID`` when well-formed, else a new one."""
    if header is not None and _WELL_FORMED.match(header):
        return header
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record (``record.request_id``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id,
    and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", REQUEST_ID.get()),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_config(log_format: LogFormat) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for ``log_format`` that also covers uvicorn's loggers
    (uvicorn applies it in every worker). Text keeps uvicorn's own lines and gives the root
    logger (the service's) the text format."""
    if log_format == "text":
        from uvicorn.config import LOGGING_CONFIG

        config = copy.deepcopy(LOGGING_CONFIG)
        config["formatters"]["text"] = {"format": TEXT_FORMAT}
        config["handlers"]["text"] = {
            "class": "logging.StreamHandler",
            "formatter": "text",
            "stream": "ext://sys.stderr",
        }
        config["root"] = {"level": "INFO", "handlers": ["text"]}
        return config
    propagate = {"handlers": [], "level": "INFO", "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["request_id"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": "INFO", "handlers": ["stderr"]},
        "loggers": {name: propagate for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def configure(log_format: LogFormat) -> None:
    """Logging of a process that is not a uvicorn worker (``serve``'s start, ``dispatch``)."""
    if log_format == "json":
        logging.config.dictConfig(log_config("json"))
    else:
        logging.basicConfig(level=logging.INFO, format=TEXT_FORMAT)
