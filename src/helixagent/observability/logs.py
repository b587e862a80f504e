"""Logging set-up: JSON lines or console, per the `logging:` block."""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson


# The handler HelixAgent installed (JSON format): the access log writes its ready-made lines straight to
# it, skipping LogRecord creation and formatting (see access.py); None when not configured.
SINK: logging.Handler | None = None


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:  # exc_text: set when the traceback had to be scrubbed of a secret (redaction.py)
            out["exception"] = record.exc_text or self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure_logging(cfg: Any) -> None:
    global SINK
    level = str(cfg.level).upper()
    if level == "WARN":
        level = "WARNING"
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_helixagent", False):
            root.removeHandler(h)
            h.close()
    handler: logging.Handler = (logging.FileHandler(cfg.file) if getattr(cfg, "file", None)
                                else logging.StreamHandler(sys.stderr))
    handler._helixagent = True  # type: ignore[attr-defined]
    SINK = None
    if cfg.format == "json":
        handler.setFormatter(JSONFormatter())
        SINK = handler
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("uvicorn.access", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def set_level(level: str) -> None:
    """A config reload: the new ``logging.level`` (format, fields and file need a restart)."""
    name = str(level).upper()
    root = logging.getLogger()
    root.setLevel("WARNING" if name == "WARN" else name)
    for noisy in ("uvicorn.access", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def reset_logging() -> None:
    """Remove the handler installed by :func:`configure_logging` (tests, embedding)."""
    global SINK
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_helixagent", False):
            root.removeHandler(h)
            h.close()
    SINK = None
