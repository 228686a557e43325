"""A streamed exec's terminal (``tty: true``): a pty of the container's own devpts, and
the worker's relay between its master and the supervisor's pipes.

The worker opens the container's ``/dev/pts/ptmx`` (else ``/dev/ptmx``) without
following a symlink in any component (``/``, ``dev``, ``pts``, ``ptmx`` each opened
``O_NOFOLLOW`` relative to the last), non-blocking and without making it a controlling
terminal, and takes it only if it is the real multiplexer (a character device 5:2): a
container's file is hostile input. It unlocks it and takes the peer with
``TIOCGPTPEER``, never by its path. The worker already holds the exec's credentials,
so devpts gives the peer to the exec's uid (and the group its ``gid=`` mount option
names, tty under runc and docker), with its ``mode=`` (0620 under them): as ``runc
exec -t`` leaves it. The command gets the peer as its stdio and as the controlling
terminal of its new session (``worker.fork_exec``: setsid, then TIOCSCTTY).

The supervisor never holds a descriptor of the terminal (whose flags the container
can change): the worker copies master -> the supervisor's output pipe and the
supervisor's stdin pipe -> master, non-blocking, at most BUF bytes held each way, in
its own poll loop, so a stalled side stalls only this exec. The exit is reported once
what the command wrote is through (``finish``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import stat
import struct
import termios
from collections.abc import Callable

TIOCGPTPEER = 0x5441  # _IO('T', 0x41): the peer of a master, opened through the master
TIOCSPTLCK = 0x40045431  # _IOW('T', 0x31, int): lock (1) or unlock (0) the peer
PTMX_DEV = os.makedev(5, 2)
DEVPTS_MAJORS = range(136, 144)  # Unix98 pty slaves
BUF = 64 << 10  # bytes held per direction
_FLAGS = os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW


def _open_beneath(path: str, flags: int) -> int:
    """Open an absolute path with no symlink followed in any component."""
    parts = [p for p in path.split("/") if p]
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)


def open_master() -> int:
    """The container's pty multiplexer, or OSError."""
    last: OSError = OSError(errno.ENOENT, "no /dev/pts/ptmx or /dev/ptmx")
    for path in ("/dev/pts/ptmx", "/dev/ptmx"):
        try:
            fd = _open_beneath(path, _FLAGS)
        except OSError as exc:
            last = exc
            continue
        st = os.fstat(fd)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == PTMX_DEV:
            return fd
        os.close(fd)
        last = OSError(errno.ENODEV, f"{path} is not the pty multiplexer")
    raise last


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def open_pty(rows: int, cols: int) -> tuple[int, int]:
    """(master, peer): a new terminal of the container's devpts, rows x cols."""
    master = open_master()
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))  # unlockpt
        peer = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        st = os.fstat(peer)
        if not stat.S_ISCHR(st.st_mode) or os.major(st.st_rdev) not in DEVPTS_MAJORS:
            os.close(peer)
            raise OSError(errno.ENODEV, "the pty's peer is not a pty")
        set_size(master, rows, cols)
    except OSError:
        os.close(master)
        raise
    return master, peer


Register = Callable[[int, int], None]  # fd, poll mask (0: forget it)


class Relay:
    """Bytes between one terminal's master and the supervisor's pipes (stdin: -1 if none)."""

    def __init__(self, master: int, stdin: int, out: int, register: Register) -> None:
        self.master, self.stdin, self.out = master, stdin, out
        self.register = register
        self.to_out = bytearray()  # from the terminal, for the supervisor
        self.to_master = bytearray()  # from the supervisor, for the terminal
        self.masks: dict[int, int] = {}
        self.done: Callable[[], None] | None = None  # the exit report, once drained
        self.ended = False  # the master read its end (EIO): no process holds the peer
        for fd in (master, stdin, out):
            if fd >= 0:
                os.set_blocking(fd, False)

    def resize(self, rows: int, cols: int) -> None:
        if self.master >= 0:
            set_size(self.master, rows, cols)  # the kernel sends SIGWINCH to its foreground

    def update(self) -> None:
        """Poll each fd for what it can do now (first called by the owner, once set up)."""
        want = {}
        if self.master >= 0:
            live = not self.ended
            reading = live and len(self.to_out) < BUF and self.done is None
            want[self.master] = ((select.POLLIN if reading else 0)
                                 | (select.POLLOUT if live and self.to_master else 0))
        if self.stdin >= 0:
            want[self.stdin] = select.POLLIN if len(self.to_master) < BUF else 0
        if self.out >= 0:
            want[self.out] = select.POLLOUT if self.to_out else 0
        for fd, mask in want.items():
            if self.masks.get(fd) != mask:
                self.masks[fd] = mask
                self.register(fd, mask)

    def ready(self, fd: int, events: int) -> None:
        if fd == self.master:
            if events & select.POLLOUT:
                self._write(self.master, self.to_master)
            if events & ~select.POLLOUT and self.master >= 0:  # IN, HUP, ERR: read, or learn it ended
                self._read_master(BUF - len(self.to_out))
        elif fd == self.stdin:
            self._read_stdin()
        elif fd == self.out:
            self._write(self.out, self.to_out)
        self._settle()

    def finish(self, done: Callable[[], None]) -> None:
        """The command exited: take what it wrote (all in the master by now), pass it on,
        then call done and close all (a process it left behind loses the terminal)."""
        self.done = done
        if self.master >= 0:
            self._read_master(1 << 20)
        self._settle()

    def _read_master(self, room: int) -> None:
        while room > 0 and self.master >= 0 and not self.ended:
            try:
                data = os.read(self.master, min(room, 65536))
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError:  # EIO: no process holds the peer any more
                data = b""
            if not data:  # the peer is closed everywhere: kept open until the exit (closing
                self.ended = True  # it now would hang up, SIGHUP, a command still exiting)
                self.to_master.clear()
                return
            self.to_out += data
            room -= len(data)

    def _read_stdin(self) -> None:
        try:
            data = os.read(self.stdin, BUF - len(self.to_master))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            if not self.ended:  # nobody would read it
                self.to_master += data
        else:  # the client's EOF: the terminal stays, as a closed docker -i leaves it
            self._close("stdin")

    def _write(self, fd: int, buf: bytearray) -> None:
        try:
            del buf[:os.write(fd, buf)]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # EPIPE (the supervisor let go of the exec) or EIO: drop it
            buf.clear()
            self._close("out" if fd == self.out else "master")

    def _close(self, name: str) -> None:
        fd = getattr(self, name)
        if fd >= 0:
            self.register(fd, 0)
            self.masks.pop(fd, None)
            os.close(fd)
            setattr(self, name, -1)

    def _settle(self) -> None:
        if self.done is not None and (not self.to_out or self.out < 0):
            for name in ("master", "stdin", "out"):
                self._close(name)
            done, self.done = self.done, None
            done()
            return
        self.update()


def make_controlling(fd: int) -> None:
    """In a new session's leader (the forked child): fd's terminal becomes its own."""
    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
