"""Checking one field of a request: shared by messages.py and streams.py."""

from __future__ import annotations

from typing import Any

from . import errors
from .errors import WarmexecError


def bad(message: str) -> WarmexecError:
    return WarmexecError(errors.BAD_REQUEST, message)


def optional(req: dict, key: str, kind: type | tuple, default: Any) -> Any:
    """req[key] if it is there and of kind; default if it is absent or nil."""
    value = req.get(key)
    if value is None:
        return default
    # bool is an int subclass: True must not pass as a timeout or a capture size.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise bad(f"{key} has the wrong type")
    return value
