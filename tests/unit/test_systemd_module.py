"""service.daemon.systemd against real sockets and real fd passing: it must work, and never raise."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pytest

from service.daemon import systemd

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

ENV_VARS = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts without systemd variables and without a cached notify socket."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    systemd._drop_socket()
    yield
    systemd._drop_socket()


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound to a file path, as systemd's /run/systemd/notify."""
    path = str(tmp_path / "notify")
    sock = _receiver(path)
    yield path, sock
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket in the abstract namespace: NOTIFY_SOCKET='@name'."""
    name = f"poold-test-{uuid.uuid4().hex}"
    sock = _receiver("\0" + name)
    yield "@" + name, sock
    sock.close()


# --- notify -------------------------------------------------------------------------------


def test_notify_without_notify_socket_is_false() -> None:
    assert systemd.notify("READY=1") is False


def test_notify_path_socket(path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    address, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert systemd.notify("READY=1", "STATUS=queued 0, busy 0/2") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=queued 0, busy 0/2"


def test_notify_abstract_socket(
    abstract_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert systemd.notify("WATCHDOG=1") is True
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_reuses_one_socket(
    path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    first = None
    for i in range(50):
        assert systemd.notify(f"STATUS={i}")
        assert sock.recv(64) == f"STATUS={i}".encode()
        first = first or systemd._sock
        assert first is not None and systemd._sock is first


def test_notify_gives_up_quickly_when_the_queue_is_full(
    path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, _sock = path_socket  # nobody reads: the kernel queue fills up
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setattr(systemd, "_SEND_TIMEOUT", 0.05)
    results = [systemd.notify(f"STATUS={i}") for i in range(15)]
    assert results[0] is True
    assert results[-1] is False


def test_notify_recovers_when_its_socket_was_closed_under_it(
    path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert systemd.notify("STATUS=1")
    assert systemd._sock is not None
    os.close(systemd._sock.detach())  # as a careless "close all fds" would
    assert systemd.notify("STATUS=2")
    assert sock.recv(64) == b"STATUS=1"
    assert sock.recv(64) == b"STATUS=2"


def test_notify_follows_a_changed_notify_socket(
    path_socket: tuple[str, socket.socket],
    abstract_socket: tuple[str, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket[0])
    assert systemd.notify("A=1")
    monkeypatch.setenv("NOTIFY_SOCKET", abstract_socket[0])
    assert systemd.notify("B=1")
    assert path_socket[1].recv(64) == b"A=1"
    assert abstract_socket[1].recv(64) == b"B=1"


def test_notify_to_a_missing_socket_is_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@poold-test-nobody-{uuid.uuid4().hex}")
    assert systemd.notify("READY=1") is False


def test_notify_with_no_lines_sends_nothing(
    path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert systemd.notify() is False
    sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        sock.recv(64)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "@",
        "/",
        "relative/path",
        "vsock:2:1234",
        "/bad\0path",
        "@" + "x" * 200,
        "/" + "y" * 4096,
        "\udcff",
        "  /tmp/x  ",
        "/dev/null",
        "/proc",
    ],
)
def test_notify_never_raises_on_garbage(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    except ValueError:  # the OS itself refuses it (embedded NUL): patch the mapping instead
        monkeypatch.setitem(os.environ._data, b"NOTIFY_SOCKET", value.encode("utf-8", "surrogateescape"))  # type: ignore[attr-defined]
    assert systemd.notify("READY=1") is False


def test_notify_never_raises_on_unencodable_text(
    path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket[0])
    assert systemd.notify("STATUS=\udcff") is False
    assert systemd.notify(None) is False  # type: ignore[arg-type]


# --- watchdog_period ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("10000000", None, 5.0),
        ("3000000", "self", 1.5),
        ("1", None, 0.0000005),
        ("3000000", "1", None),  # meant for another process
        ("0", None, None),
        ("-5", None, None),
        ("", None, None),
        ("abc", None, None),
        ("1.5", None, None),
        ("3000000", "garbage", None),
        (" 4000000 ", None, 2.0),
    ],
)
def test_watchdog_period(
    usec: str | None, pid: str | None, expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert systemd.watchdog_period() == expected


# --- monotonic_usec -----------------------------------------------------------------------


def test_monotonic_usec_is_clock_monotonic_in_microseconds() -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    value = systemd.monotonic_usec()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert isinstance(value, int)
    assert before <= value <= after


# --- listen_sockets -----------------------------------------------------------------------

# Runs in the child that received the fds: reports what listen_sockets() made of them.
CHILD = """
import json, os, socket, sys
from service.daemon import systemd
named = systemd.listen_sockets_named()
out = {
    "pid": os.getpid(),
    "names": [n for n, _ in named],
    "families": [int(s.family) for _, s in named],
    "types": [int(s.type) for _, s in named],
    "fds": [s.fileno() for _, s in named],
    "inheritable": [os.get_inheritable(s.fileno()) for _, s in named],
    "env": {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")},
    "again": len(systemd.listen_sockets()),
}
for _, s in named:
    if s.type == socket.SOCK_STREAM:
        conn, _addr = s.accept()
        conn.sendall(b"hello from " + str(s.getsockname()).encode())
        conn.close()
print(json.dumps(out))
"""


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


# Runs first in the child: moves the passed fds (parked at 100+) down to 3, 4, ... and
# execs CHILD in the same process, so the shell's $$ (LISTEN_PID) is still its pid.
WRAPPER = """
import os, sys
src = [int(fd) for fd in os.environ.pop("TEST_PASSED_FDS").split(",") if fd]
for i, fd in enumerate(src):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
"""


def _run_activated(
    socks: Sequence[_HasFileno], env: dict[str, str], *, pid: str = "$$"
) -> subprocess.Popen[str]:
    """Starts CHILD with `socks` as fds 3.. and LISTEN_PID set to the exec'd child's own pid."""
    parked = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 100 + i) for i, s in enumerate(socks)]
    script = f'LISTEN_PID={pid} exec "$0" -c "$1" "$2"' if pid else 'exec "$0" -c "$1" "$2"'
    root = str(Path(__file__).resolve().parents[2])
    child_env = {**os.environ, **env, "PYTHONPATH": root, "TEST_PASSED_FDS": ",".join(map(str, parked))}
    try:
        return subprocess.Popen(
            ["sh", "-c", script, sys.executable, WRAPPER, CHILD],
            pass_fds=parked,
            env=child_env,
            stdout=subprocess.PIPE,
            text=True,
        )
    finally:
        for fd in parked:
            os.close(fd)


def _tcp_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _unix_listener(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "api.sock"))
    sock.listen()
    return sock


def _talk(sock: socket.socket) -> bytes:
    with socket.socket(sock.family, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(sock.getsockname())
        return client.recv(4096)


def test_listen_sockets_receives_real_fds(tmp_path: Path) -> None:
    tcp, unix = _tcp_listener(), _unix_listener(tmp_path)
    with tcp, unix:
        child = _run_activated([tcp, unix], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "http:api"})
        assert _talk(tcp).startswith(b"hello from ('127.0.0.1'")
        assert _talk(unix) == b"hello from " + str(unix.getsockname()).encode()
        stdout, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    out = json.loads(stdout)
    assert out["names"] == ["http", "api"]
    assert out["families"] == [socket.AF_INET, socket.AF_UNIX]
    assert out["types"] == [socket.SOCK_STREAM, socket.SOCK_STREAM]
    assert out["fds"] == [3, 4]
    assert out["inheritable"] == [False, False]
    assert out["env"] == {}  # LISTEN_* unset, so children do not inherit them
    assert out["again"] == 0  # and a second call finds nothing


def test_listen_sockets_without_fdnames_and_without_pid(tmp_path: Path) -> None:
    tcp = _tcp_listener()
    with tcp:
        child = _run_activated([tcp], {"LISTEN_FDS": "1"}, pid="")
        _talk(tcp)
        stdout, _ = child.communicate(timeout=30)
    out = json.loads(stdout)
    assert out["names"] == ["unknown"]
    assert out["fds"] == [3]
    assert out["env"] == {}


def test_listen_sockets_ignores_fds_meant_for_another_pid() -> None:
    tcp = _tcp_listener()
    with tcp:
        child = _run_activated([tcp], {"LISTEN_FDS": "1"}, pid="1")
        stdout, _ = child.communicate(timeout=30)
    out = json.loads(stdout)
    assert out["names"] == []
    assert out["env"] == {}


def test_listen_sockets_skips_an_fd_that_is_not_a_socket() -> None:
    tcp = _tcp_listener()
    r, w = os.pipe()
    try:
        with tcp:  # fd 3 = a pipe (not a socket), fd 4 = the listener
            child = _run_activated([_Fd(r), tcp], {"LISTEN_FDS": "2"})
            _talk(tcp)
            stdout, _ = child.communicate(timeout=30)
    finally:
        os.close(r)
        os.close(w)
    assert json.loads(stdout)["fds"] == [4]


class _Fd:
    """A bare fd with the one method _run_activated needs."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_FDS": "0"},
        {"LISTEN_FDS": "-1"},
        {"LISTEN_FDS": "abc"},
        {"LISTEN_FDS": ""},
        {"LISTEN_FDS": "1", "LISTEN_PID": "abc"},
        {"LISTEN_FDS": "1", "LISTEN_PID": "1"},
        {"LISTEN_PID": "self"},
        {"LISTEN_FDS": "3", "LISTEN_PID": "self", "LISTEN_FDNAMES": "a:b"},  # fds not open here
    ],
)
def test_listen_sockets_never_raises_on_garbage(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # fds 3..5 must not be sockets of ours for the last case: use numbers far above
    for name, value in env.items():
        monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    monkeypatch.setattr(systemd, "SD_LISTEN_FDS_START", 10_000)
    assert systemd.listen_sockets() == []
    assert not any(name.startswith("LISTEN_") for name in os.environ)
