"""A worker's stdout and stderr, labelled with the job that wrote them.

Inside the daemon a job's prints would land in the daemon's own log as if the
daemon had said them. So the worker points fds 1 and 2 at pipes of its own
(what the job starts inherits them: its children are labelled too) and a
thread per pipe copies each line to the real stream behind a label naming the
running job ("[job ID] ..."), or the worker when none runs. The dashboard
issue will keep these lines as the job's log.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable

_MAX_LINE = 65536  # a line longer than this is cut into labelled pieces
# (read end, lock held by its copier from the read to the write): see flush()
_pipes: list[tuple[int, threading.Lock]] = []


def label(current: Callable[[], str]) -> None:
    """From now on every line written to fd 1 or 2 goes out behind `[<current()>] `."""
    for fd in (1, 2):
        try:
            real = os.dup(fd)
        except OSError:  # no such stream (closed stdout): nothing to label
            continue
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        lock = threading.Lock()
        _pipes.append((r, lock))
        threading.Thread(target=_copy, args=(r, lock, real, current), name=f"poold-output-{fd}",
                         daemon=True).start()


def flush() -> None:
    """Called as a job ends: pushes what Python buffered into the pipes and waits until the
    copiers have labelled all of it, so the job's last lines carry its own label.

    Cheap when the job wrote nothing: one ioctl per pipe and an uncontended lock."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    for r, lock in _pipes:
        while _unread(r):
            time.sleep(0.0002)
        with lock:  # a copier that read the last bytes has labelled and written them
            pass


def _unread(r: int) -> int:
    try:
        return int(struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, b"\0\0\0\0"))[0])
    except OSError:
        return 0


def _copy(r: int, lock: threading.Lock, real: int, current: Callable[[], str]) -> None:
    pending = b""
    while True:
        try:
            select.select([r], [], [])  # waits without the lock: flush() must be able to take it
        except OSError:
            return
        with lock:
            try:
                chunk = os.read(r, 65536)
            except OSError:
                return
            if not chunk:
                if pending:
                    _write(real, current(), pending)
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > _MAX_LINE:
                lines.append(pending)
                pending = b""
            if lines:
                _write(real, current(), b"\n".join(lines))


def _write(real: int, who: str, text: bytes) -> None:
    prefix = f"[{who}] ".encode()
    data = b"".join(prefix + line + b"\n" for line in text.split(b"\n"))
    try:
        while data:
            data = data[os.write(real, data):]
    except OSError:  # the daemon's stream is closed: the lines have nowhere to go
        pass
