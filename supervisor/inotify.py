"""inotify, through ctypes: so a new container's state is seen at once, not at the next poll.

runc creates ``<root>/<id>/`` and then renames ``state.json`` into it. The supervisor
watches each root (a directory appears or goes) and each container directory (the
state file is renamed in or rewritten); an event that can change what is served
(``needs_rescan``) triggers a rescan, and the rescan adds watches for directories it
has not seen before, so nothing falls in between. A served container's state file
rewritten (every ``runc exec`` into it does that) triggers nothing.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

_libc = ctypes.CDLL(None, use_errno=True)

IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

ROOT_EVENTS = IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_MOVED_FROM | IN_ONLYDIR
DIR_EVENTS = IN_MOVED_TO | IN_CLOSE_WRITE | IN_DELETE | IN_DELETE_SELF | IN_ONLYDIR
_HEADER = 16  # struct inotify_event without its name: wd, mask, cookie, len


class Watcher:
    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd = fd
        self.paths: dict[str, int] = {}
        self.wds: dict[int, str] = {}
        self.dropped: set[int] = set()  # removed by us: their IN_IGNORED is no news

    def watch(self, path: str, mask: int) -> None:
        if path in self.paths:
            return
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd >= 0:  # a directory that vanished meanwhile is simply not watched
            self.paths[path] = wd
            self.wds[wd] = path

    def unwatch(self, path: str) -> None:
        """Stop watching path (its IN_IGNORED, which follows, is not reported)."""
        wd = self.paths.pop(path, None)
        if wd is not None:
            del self.wds[wd]
            self.dropped.add(wd)
            _libc.inotify_rm_watch(self.fd, wd)

    def drain(self) -> list[tuple[str, int, str]]:
        """Read every pending event; return (watched directory, mask, file name) of each."""
        events: list[tuple[str, int, str]] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return events
            offset = 0
            while offset + _HEADER <= len(data):
                wd = int.from_bytes(data[offset:offset + 4], "little", signed=True)
                mask = int.from_bytes(data[offset + 4:offset + 8], "little")
                length = int.from_bytes(data[offset + 12:offset + 16], "little")
                name = data[offset + _HEADER:offset + _HEADER + length].rstrip(b"\0").decode(errors="replace")
                offset += _HEADER + length
                if wd in self.dropped:
                    if mask & IN_IGNORED:
                        self.dropped.discard(wd)
                    continue
                events.append((self.wds.get(wd, ""), mask, name))
                if mask & IN_IGNORED:  # the watched directory is gone
                    self.paths.pop(self.wds.pop(wd, ""), None)

    def close(self) -> None:
        os.close(self.fd)


def needs_rescan(events: list[tuple[str, int, str]], served_and_alive: Callable[[str], bool],
                 state_files: tuple[str, ...]) -> bool:
    """Whether these events can change what is served. Every `runc exec` into a
    container (docker exec, ctr exec, a kubelet's probes...) writes and deletes a file
    in its state directory: for a served container whose init lives, that changes
    nothing (its end is seen through its init's pidfd). Anything in a root, the state
    file or the directory going, or a container not served (or no longer alive: a
    restart under the same id) can."""
    for path, mask, name in events:
        if mask & (IN_DELETE_SELF | IN_IGNORED) or (mask & IN_DELETE and name in state_files):
            return True
        if not served_and_alive(os.path.basename(path)):
            return True  # also every event of a root: a root is no container's id
    return False
