"""warmexec's wire protocol: schema, codec, error codes and the Python client.

A leaf package: it depends on the standard library and msgpack only; pyzmq is
imported by the client module alone, so workers can use the codec without it.
"""

from __future__ import annotations

from typing import Any

from .errors import WarmexecError
from .messages import VERSION

__all__ = ["VERSION", "Client", "WarmexecError"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from .client import Client

        return Client
    raise AttributeError(name)
