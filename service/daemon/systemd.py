"""The few bits of the systemd protocol poold speaks: sd_notify, socket activation, watchdog.

Pure stdlib (no libsystemd), and nothing here ever raises: a daemon that is
not run by systemd, or gets a garbled environment, simply sees ``False``,
``[]`` or ``None`` and carries on. Modelled on gunicorn's ``systemd.py``.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["listen_sockets", "listen_sockets_named", "monotonic_usec", "notify", "watchdog_period"]

SD_LISTEN_FDS_START = 3
# A send may block while systemd's receive queue is full; cap it so a stuck
# manager can never freeze the event loop for long (a lost WATCHDOG=1 is harmless).
_SEND_TIMEOUT = 1.0
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

_sock: socket.socket | None = None  # opened lazily, kept for cheap repeated notify() calls


def _notify_address() -> str | None:
    """$NOTIFY_SOCKET as an AF_UNIX address ('@' = abstract namespace), or None."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if len(addr) < 2 or addr[0] not in "/@":
        return None
    return "\0" + addr[1:] if addr[0] == "@" else addr


def _drop_socket() -> None:
    """Forgets the cached socket (closed under us, or broken) so the next call reopens it."""
    global _sock
    sock, _sock = _sock, None
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def notify(*lines: str) -> bool:
    """Sends ``"\\n".join(lines)`` to $NOTIFY_SOCKET; True when the datagram went out."""
    global _sock
    try:
        addr = _notify_address()
        if addr is None or not lines:
            return False
        data = "\n".join(lines).encode("utf-8")
        for _attempt in range(2):
            sock, fresh = _sock, _sock is None
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.settimeout(_SEND_TIMEOUT)
                _sock = sock
            try:
                sock.sendto(data, addr)
                return True
            except TimeoutError:  # systemd's queue is full: retrying would only block longer
                return False
            except OSError:
                _drop_socket()
                if fresh:  # a brand-new socket failed too: the address is the problem
                    return False
        return False
    except (OSError, ValueError, TypeError):  # e.g. NUL in the path, unencodable text
        return False


def _int_env(name: str) -> int | None:
    """An environment variable as a decimal integer, or None when unset or garbled."""
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value.strip(), 10)
    except ValueError:
        return None


def listen_sockets_named() -> list[tuple[str, socket.socket]]:
    """Like `listen_sockets`, with each socket's LISTEN_FDNAMES name ("unknown" when absent)."""
    try:
        env = {name: os.environ.get(name) for name in _LISTEN_VARS}
        # Unset first, whatever happens next: a child must never adopt our fds.
        for name in _LISTEN_VARS:
            os.environ.pop(name, None)
        pid, count = env["LISTEN_PID"], env["LISTEN_FDS"]
        if count is None:
            return []
        if pid is not None and pid.strip() != str(os.getpid()):
            return []  # meant for another process (e.g. the one that exec'd us)
        n = int(count.strip(), 10)
        if n <= 0:
            return []
        names = (env["LISTEN_FDNAMES"] or "").split(":")
        if len(names) != n:
            names = ["unknown"] * n
        found: list[tuple[str, socket.socket]] = []
        for i, fd in enumerate(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n)):
            try:
                os.set_inheritable(fd, False)
                found.append((names[i] or "unknown", socket.socket(fileno=fd)))
            except OSError:  # not open, or not a socket (e.g. a passed FIFO): skip it
                continue
        return found
    except (OSError, ValueError):
        return []


def listen_sockets() -> list[socket.socket]:
    """Sockets passed by socket activation (fds 3...), non-inheritable; LISTEN_* is unset."""
    return [sock for _name, sock in listen_sockets_named()]


def watchdog_period() -> float | None:
    """How often to send WATCHDOG=1 (half of WATCHDOG_USEC, in seconds), or None when off."""
    usec = _int_env("WATCHDOG_USEC")
    if usec is None or usec <= 0:
        return None
    if "WATCHDOG_PID" in os.environ and _int_env("WATCHDOG_PID") != os.getpid():
        return None
    return usec / 2_000_000


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, for "MONOTONIC_USEC=" next to RELOADING=1."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
