"""Log formats: an event's fields become JSON keys, or key=value text."""

from __future__ import annotations

import json
import logging

from warmexec.supervisor.logs import JsonFormatter, TextFormatter


def record(fields: dict | None) -> logging.LogRecord:
    r = logging.LogRecord("warmexec", logging.INFO, __file__, 1, "worker.state", None, None)
    r.fields = fields
    return r


def test_json_lines_carry_event_fields_as_keys():
    doc = json.loads(JsonFormatter().format(record({"container": "web1", "new": "READY"})))
    assert (doc["message"], doc["container"], doc["new"], doc["level"]) == \
        ("worker.state", "web1", "READY", "INFO")


def test_text_lines_carry_event_fields_as_key_value():
    line = TextFormatter().format(record({"container": "web1", "new": "READY"}))
    assert line.endswith("INFO worker.state container=web1 new=READY")
