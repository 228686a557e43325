"""Where an exec's executable is, and its environment: as runc finds them.

Everything here runs in the worker, inside the container, on what the container and
the request give it: bounded in bytes (the worker's memory is charged to the container).
"""

from __future__ import annotations

import errno
import os
import stat


def env_dict(env: list[str]) -> dict[str, str]:
    """A process spec's env list as a dict (an entry without "=" is not a variable)."""
    out: dict[str, str] = {}
    for item in env:
        key, sep, value = item.partition("=")
        if sep:
            out[key] = value
    return out


class PathCache:
    """$PATH values split into prefixes, bounded in bytes: a request can send a PATH of
    any length, and the worker's memory is charged to the container."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used = max_bytes, 0
        self.entries: dict[str, tuple[str, ...]] = {}

    def prefixes(self, path_var: str) -> tuple[str, ...]:
        hit = self.entries.get(path_var)
        if hit is not None:
            return hit
        found = tuple(f"{d or '.'}/" for d in path_var.split(":"))
        if 2 * len(path_var) <= self.max_bytes:
            while self.entries and self.used + 2 * len(path_var) > self.max_bytes:
                old = next(iter(self.entries))
                del self.entries[old]
                self.used -= 2 * len(old)
            self.entries[path_var] = found
            self.used += 2 * len(path_var)
        return found


def lookup(name: str, path_var: str | None, cache: PathCache | None = None) -> tuple[str | None, int]:
    """Find the executable as Go's exec.LookPath (runc) does: a name with a slash is
    used as is; otherwise the first regular file with an execute bit on $PATH. No
    PATH: nothing is searched."""
    if "/" in name:
        return name, 0
    if not path_var:
        return None, errno.ENOENT
    prefixes = cache.prefixes(path_var) if cache else PathCache(0).prefixes(path_var)
    for prefix in prefixes:  # stat only: the container's seccomp filter
        try:                  # is ours too, and it may allow no more
            st = os.stat(prefix + name)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return prefix + name, 0
    return None, errno.ENOENT
