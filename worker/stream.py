"""A streamed exec's terminal, the worker's side: a pty of the container's devpts.

(The supervisor's side, which reads and writes the exec's pipes, is supervisor/streams.py.)
"""

from __future__ import annotations

import fcntl
import termios


def set_controlling_tty(fd: int) -> None:
    """In a fork child that has just called setsid: fd's terminal becomes its session's."""
    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
