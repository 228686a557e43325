"""Logging for `warmexec serve`: text for people, or one JSON object per line.

Events (see events.py) are logged with their fields attached, so the JSON form carries
``container``, ``exec_id`` and the rest as keys rather than inside a message. Nothing
is logged per exec at INFO.
"""

from __future__ import annotations

import json
import logging
import time


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if fields:
            record.msg = f"{record.msg} " + " ".join(f"{k}={v}" for k, v in fields.items())
            record.fields = None
        return super().format(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": round(time.time(), 6), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        doc.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
