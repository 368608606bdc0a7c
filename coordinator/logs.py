"""Logging: one configuration for the parent and every worker, as text or JSON lines.

`QUOTAGATE_LOG_FORMAT=json` writes one JSON object a line: `time` (UTC, ISO 8601),
`level`, `logger`, `event` (a short name such as `fleet_pause`; `message` for lines that
name none), `message`, `pid`, the request id of the request being served, and whichever
of `FIELDS` the line carries. `event()` writes such a line; in text format the fields
follow the message as `name=value`.

Secrets never reach a line: tokens are not logged by the code, an `Authorization` header
is never a field, and a `token=` query parameter (the dashboard's way in) is masked in
every message, uvicorn's access lines included.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger("quotagate")

# The fields a line may carry, in the order they are written.
FIELDS = (
    "tenant",
    "api",
    "key",
    "holder",
    "lease",  # lease_prefix() of the lease id
    "reason",
    "retry_after",  # seconds
    "status",
    "kind",
    "window",
    "amount",
    "configured",
    "down_for",  # seconds
    "since",  # ms, Redis time: the loss a recovery counts from
)
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|access_token)=)[^&\s\"']+")
# A lease id in a path (an access line): its random part is a capability, keep 8 digits.
_LEASE_ID = re.compile(r"(/v1/leases/[A-Za-z0-9_-]+\.[0-9a-f]{8})[0-9a-f]{24}")
_SECRET_HEADER = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(bearer\s+)?[^\s,\"'}]+")

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def mask(text: str) -> str:
    """`text` with token query parameters and Authorization values replaced by `***`,
    and lease ids in paths cut to their prefix."""
    if "oken=" in text or "uthorization" in text:
        text = _SECRET_QUERY.sub(r"\1***", text)
        text = _SECRET_HEADER.sub(r"\1***", text)
    if "/v1/leases/" in text:
        text = _LEASE_ID.sub("\\1…", text)
    return text


def lease_prefix(lease_id: str) -> str:
    """What a line shows of a lease id, as the client's lines do: its scope and the start
    of its random part, enough to tell leases apart, too little to release one."""
    scope, dot, token = lease_id.rpartition(".")
    return f"{scope}{dot}{token[:8]}…"


def event(level: int, name: str, message: str, **fields: Any) -> None:
    """One line of the coordinator's log for `name`, with `fields` (None ones left out)."""
    if log.isEnabledFor(level):
        given = {k: v for k, v in fields.items() if v is not None}
        extra = {"event": name, "fields": given, "request_id": request_id.get()}
        log.log(level, message, extra=extra)


def _request_of(record: logging.LogRecord) -> str:
    found: str = getattr(record, "request_id", "") or request_id.get()
    return found


class _Masking(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        return mask(super().formatMessage(record))


class TextFormatter(_Masking):
    """`time [pid] LEVEL logger: message name=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields: dict[str, Any] = getattr(record, "fields", {})
        if fields:
            line += " " + " ".join(f"{k}={fields[k]}" for k in FIELDS if k in fields)
        rid = _request_of(record)
        return f"{line} request={rid}" if rid else line


class JsonFormatter(logging.Formatter):
    """One JSON object a line (see the module's docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", "message"),
            "message": mask(record.getMessage()),
            "pid": record.process,
        }
        fields: dict[str, Any] = getattr(record, "fields", {})
        for name in FIELDS:
            if name in fields:
                value = fields[name]
                line[name] = mask(value) if isinstance(value, str) else value
        rid = _request_of(record)
        if rid:
            line["request_id"] = rid
        if record.exc_info:
            line["error"] = mask(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


def config(log_format: str = "text") -> dict[str, Any]:
    """The `logging.config.dictConfig` mapping for uvicorn's loggers and ours: lines with
    the process id (several workers write to one stream), applied in the parent and again
    in every worker."""
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    handler = {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}
    to_stderr = {"handlers": ["stderr"], "level": "INFO", "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {"stderr": handler},
        "loggers": {"quotagate": to_stderr, "uvicorn": to_stderr, "uvicorn.access": to_stderr},
    }


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestId:
    """ASGI middleware: each HTTP request gets an id (the client's `X-Request-Id` when it
    sends a short one), seen by every log line written while it is served and echoed in
    the reply's `X-Request-Id`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id" and len(value) <= 64 and value.isascii():
                rid = value.decode()
        rid = rid or secrets.token_hex(8)
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = request_id.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


__all__ = [
    "FIELDS",
    "JsonFormatter",
    "RequestId",
    "TextFormatter",
    "config",
    "event",
    "lease_prefix",
    "mask",
]
