"""Job functions for poold's own test suite.

The test daemons put the repository root on PYTHONPATH and allow `tests.support.jobs:*`,
so every module-level function here can be submitted as `tests.support.jobs:<name>`.
They only use the standard library and `service.progress`.
"""

import ctypes
import os
import subprocess
import sys
import threading
import time

from service import progress

_HOLD: list[bytearray] = []


# -- plain results


def add(a, b):
    return a + b


def noop(x=None):
    return x


def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


def pid():
    return os.getpid()


def env(name):
    """The worker's value of an environment variable (None when unset)."""
    return os.environ.get(name)


def has_module(name):
    """Whether the worker had imported `name` before this job ran (for pool.preload)."""
    return name in sys.modules


def python_version():
    return list(sys.version_info[:2])


def blob(n):
    """A result of about n bytes (for jobs.max_result_bytes)."""
    return "x" * n


def touch(path, value="ran"):
    """Writes `value` to `path`: proof that the job ran."""
    with open(path, "w") as f:
        f.write(str(value))
    return value


# -- time


def spin(seconds):
    """A busy loop (CPU) for `seconds`."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def sleep(seconds):
    time.sleep(seconds)
    return seconds


def forever():
    """Never returns (CPU-light, so a test may keep several running)."""
    while True:
        time.sleep(0.05)


def report(n, pause):
    """Reports progress i/n with a message at each of n steps."""
    for i in range(1, n + 1):
        progress(i, n, f"step {i}")
        time.sleep(pause)
    return n


def report_bare(n):
    """Reports progress without total or message."""
    for i in range(1, n + 1):
        progress(i)
        time.sleep(0.02)
    return n


# -- attempts (state kept in a file, since every attempt may run in a new process)


def _bump(counter_path):
    n = 0
    if os.path.exists(counter_path):
        with open(counter_path) as f:
            n = int(f.read() or 0)
    with open(counter_path, "w") as f:
        f.write(str(n + 1))
    return n


def flaky(counter_path, fail_times):
    """Raises on the first `fail_times` calls, then returns the number of calls."""
    n = _bump(counter_path)
    if n < fail_times:
        raise RuntimeError(f"flaky attempt {n + 1}")
    return n + 1


def hang_once(marker_path):
    """The first attempt hangs forever; any later attempt returns at once."""
    if not os.path.exists(marker_path):
        with open(marker_path, "w") as f:
            f.write(str(os.getpid()))
        forever()
    return "second attempt"


def die_once(counter_path):
    """The first attempt kills its own worker; later attempts succeed."""
    n = _bump(counter_path)
    if n == 0:
        os.kill(os.getpid(), 9)
        time.sleep(10)
    return n + 1


# -- failures


class CustomError(Exception):
    pass


class UnpicklableError(Exception):
    """An exception that cannot cross a process boundary by pickle."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def boom(message="boom from tests"):
    raise ValueError(message)


def custom_error():
    raise CustomError("custom failure")


def raise_unpicklable():
    raise UnpicklableError("cannot pickle me")


def unserializable():
    """Picklable, but not JSON."""
    return object()


def nan():
    """Not valid JSON (NaN)."""
    return float("nan")


def a_set():
    return {1, 2, 3}


def a_bytes():
    return b"bytes"


def generator():
    """Neither picklable nor JSON."""
    return (i for i in range(3))


def suicide():
    os.kill(os.getpid(), 9)
    time.sleep(10)


def hard_exit(code):
    """The worker process ends with this exit status, without raising."""
    os._exit(code)


def segfault():
    ctypes.string_at(0)


def big_mem(mb):
    _HOLD.append(bytearray(mb * 1024 * 1024))
    for i in range(0, len(_HOLD[-1]), 4096):
        _HOLD[-1][i] = 1
    return os.getpid()


# -- processes a job leaves behind


def _write_pid(pidfile, value):
    tmp = f"{pidfile}.tmp"
    with open(tmp, "w") as f:
        f.write(str(value))
    os.replace(tmp, pidfile)  # readers never see a half-written file


def leak_child(pidfile):
    """Starts a child and returns without waiting for it."""
    p = subprocess.Popen(["sleep", "300"])
    _write_pid(pidfile, p.pid)
    return p.pid


def leak_detached(pidfile):
    """Double fork + setsid: a grandchild detached from the worker's tree."""
    r, w = os.pipe()
    first = os.fork()
    if first == 0:
        os.setsid()
        second = os.fork()
        if second == 0:
            os.close(r)
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            os.execvp("sleep", ["sleep", "300"])
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    os.waitpid(first, 0)
    gpid = int(data)
    _write_pid(pidfile, gpid)
    return gpid


def spawn_and_hang(pidfile):
    """Starts a child (`sleep 300`), then never returns."""
    p = subprocess.Popen(["sleep", "300"])
    _write_pid(pidfile, p.pid)
    forever()


# -- supervision (tests/test_supervision.py)


def _sh(script, ignore_term):
    """argv of a `sh` running `script`, with SIGTERM ignored (inherited through exec) if asked."""
    return ["sh", "-c", ("trap '' TERM; " if ignore_term else "") + script]


def _detach(argv, pidfile):
    """Double fork + setsid: runs argv as a grandchild detached from the caller's tree."""
    r, w = os.pipe()
    first = os.fork()
    if first == 0:
        try:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                os.write(w, str(os.getpid()).encode())
                os.close(w)
                os.execvp(argv[0], argv)
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    os.waitpid(first, 0)
    _write_pid(pidfile, int(data))
    return int(data)


def busy_forever():
    """A pure-Python busy loop that never returns, sleeps or calls anything."""
    while True:
        pass


def spawn_tree(pid_dir, ignore_term=False, busy=False):
    """Starts a child (`sleep 300`), a grandchild (`sleep 300` under a `sh` child) and a detached
    setsid double-forked grandchild (`sleep 300`), writes their pids to child.pid, grandchild.pid
    and detached.pid in pid_dir, then never returns (sleeping, or in a busy loop when `busy`).
    With `ignore_term`, all of them ignore SIGTERM (only SIGKILL ends them)."""
    child = subprocess.Popen(_sh("exec sleep 300", ignore_term))
    _write_pid(os.path.join(pid_dir, "child.pid"), child.pid)
    gfile = os.path.join(pid_dir, "grandchild.pid")
    subprocess.Popen(_sh(f"sleep 300 & echo $! > {gfile}.tmp && mv {gfile}.tmp {gfile}; wait",
                         ignore_term))
    _detach(_sh("exec sleep 300", ignore_term), os.path.join(pid_dir, "detached.pid"))
    while not os.path.exists(gfile):
        time.sleep(0.01)
    if busy:
        busy_forever()
    forever()


def leak_stubborn_child(pidfile):
    """Like leak_child, but the child ignores SIGTERM."""
    p = subprocess.Popen(_sh("exec sleep 300", True))
    _write_pid(pidfile, p.pid)
    return p.pid


def leak_stubborn_detached(pidfile):
    """Like leak_detached, but the detached grandchild ignores SIGTERM."""
    return _detach(_sh("exec sleep 300", True), pidfile)


def own_helper(pidfile, seconds, detached):
    """Starts a helper (`sleep 300`: a child, or a detached setsid double-forked grandchild),
    works for `seconds` while it should run, and returns whether it still ran at the end."""
    if detached:
        hpid = _detach(["sleep", "300"], pidfile)
    else:
        hpid = subprocess.Popen(["sleep", "300"]).pid
        _write_pid(pidfile, hpid)
    time.sleep(seconds)
    try:
        with open(f"/proc/{hpid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def big_mem_and_hang(mb):
    """Holds about `mb` MiB (touched) and never returns."""
    big_mem(mb)
    forever()


def attempt_script(counter_path, steps):
    """Attempt i (counted in a file) does steps[i]: "raise" (RuntimeError naming the attempt),
    "exit" (os._exit(3)), "kill" (SIGKILL of its own worker), "hang" (never returns) or "ok"
    (returns the attempt number)."""
    n = _bump(counter_path) + 1
    step = steps[min(n, len(steps)) - 1]
    if step == "raise":
        raise RuntimeError(f"attempt {n} raised")
    if step == "exit":
        os._exit(3)
    if step == "kill":
        os.kill(os.getpid(), 9)
        time.sleep(10)
    if step == "hang":
        forever()
    return n


# -- hostile jobs (tests/test_reliability_limits.py): each must end as its own failure or success


def _child_sleep(seconds):
    """In a forked child: sleep, then leave without running any Python exit code."""
    try:
        time.sleep(seconds)
    finally:
        os._exit(0)


def fork_tree(depth, fanout, then="return", detach=False):
    """A bounded fork bomb: every process forks `fanout` children down to `depth` levels (2, 7:
    254 processes, none exec'd), each of which then sleeps for 120 s (a bound, so nothing
    outlives a broken test by much). With `detach`, each child first calls setsid(). The job
    waits until the whole tree stands (each process writes a byte to a pipe once its own
    children are forked), then returns how many processes stand, or hangs (`then="hang"`)."""
    want = sum(fanout ** k for k in range(1, depth + 1))
    r, w = os.pipe()
    level = 0
    while level < depth:
        child = False
        for _ in range(fanout):
            if os.fork() == 0:
                child = True
                break
        if not child:
            break
        if detach:
            os.setsid()
        level += 1
    if level > 0:  # not the job itself: report, then stay until the bound
        os.close(r)
        os.write(w, b"x")
        _child_sleep(120)
    os.close(w)
    got = 0
    end = time.monotonic() + 60
    while got < want and time.monotonic() < end:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        got += len(chunk)
    os.close(r)
    if then == "hang":
        forever()
    return got


def leak_forked(pidfile, detach=False):
    """Leaves a forked (never exec'd) child sleeping for 120 s, or with `detach` a double-forked,
    setsid() grandchild, and returns its pid."""
    r, w = os.pipe()
    first = os.fork()
    if first == 0:
        os.close(r)
        if detach:
            os.setsid()
            if os.fork():
                os._exit(0)
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        _child_sleep(120)
    os.close(w)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    if detach:
        os.waitpid(first, 0)
    _write_pid(pidfile, int(data))
    return int(data)


def fork_chain(heartbeat, stop, seconds=30):
    """A process that keeps replacing itself by a fresh fork (its parent exits at once), so its
    pid never lasts more than a millisecond or so: a kill by pid, or a scan of processes, misses
    it. It writes the time to `heartbeat` every 0.1 s (proof it still runs) and ends itself once
    `stop` exists or after `seconds`. The job returns once the chain has beaten; the chain runs on
    without it."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        until = time.monotonic() + 5  # returns once the chain runs (it beats), so it is a leftover
        while not os.path.exists(heartbeat) and time.monotonic() < until:
            time.sleep(0.001)
        return "started"
    end = time.monotonic() + seconds
    beat = 0.0
    while time.monotonic() < end and not os.path.exists(stop):
        if os.fork():
            os._exit(0)
        if time.monotonic() - beat > 0.1:
            beat = time.monotonic()
            with open(heartbeat, "w") as f:
                f.write(str(time.time()))
        time.sleep(0.001)
    os._exit(0)


def open_files(n, keep=True):
    """Opens /dev/null up to n times (stopping at EMFILE) after raising its soft RLIMIT_NOFILE to
    the hard limit; keeps them open in the worker when `keep`. Returns how many it opened."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fds = []
    try:
        for _ in range(n):
            fds.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as e:
        if e.errno != 24:  # EMFILE
            raise
    if keep:
        _FDS.extend(fds)
    else:
        for fd in fds:
            os.close(fd)
    return len(fds)


_FDS: list = []


def alloc_until(limit_mb, step_mb=8, catch=False):
    """Simulates running out of memory, safely: caps its own address space (RLIMIT_AS) at its
    current size plus `limit_mb` MiB, then allocates (and touches) `step_mb` MiB blocks until
    MemoryError. Raises it, or with `catch` drops the blocks and returns the MiB it got."""
    import resource

    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + limit_mb * 2**20, hard))
    blocks = []
    try:
        while True:
            blocks.append(bytearray(step_mb * 2**20))
    except MemoryError:
        got = len(blocks) * step_mb
        blocks.clear()
        if catch:
            return got
        raise


def oom_in_cgroup(cgroup, step_mb=16):
    """Runs out of memory for real: moves its own worker into `cgroup` (a cgroup v1 memory
    controller group with a small memory.limit_in_bytes) and allocates, touching every page, until
    the kernel's OOM killer ends the process. Never returns."""
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    blocks = []
    while True:
        blocks.append(bytearray(step_mb * 2**20))


def close_std(fds, write=True):
    """Closes its own file descriptors `fds` (e.g. [1] for stdout), then writes to stdout and
    stderr and flushes. Returns what it closed."""
    for fd in fds:
        os.close(fd)
    if write:
        print("to a closed stdout?")
        print("to a closed stderr?", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
    return fds


def flood_output(mb, fds=(1, 2)):
    """Writes `mb` MiB to each of the file descriptors `fds` (stdout, stderr); returns mb."""
    line = b"x" * 1023 + b"\n"
    for fd in fds:
        for _ in range(mb * 1024):
            os.write(fd, line)
    return mb


def forked_title(own=None):
    """The process title a child this job forks has (read by the child, from /proc); with `own`,
    the job first sets that title itself (and puts the worker's back before it returns)."""
    import setproctitle

    before = setproctitle.getproctitle()
    if own is not None:
        setproctitle.setproctitle(own)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        with open("/proc/self/cmdline", "rb") as f:
            os.write(w, f.read().replace(b"\0", b" ").strip())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    setproctitle.setproctitle(before)
    with os.fdopen(r, "rb") as f:
        return f.read().decode()


# -- runs counted from the jobs' own records (the cluster tests)
def logged(path, seconds=0.0):
    """Appends this run's start, a tick every 50 ms, and its end (job id, pid, time) to `path`,
    one line each: a run that was killed ended at its last tick."""
    jid = os.environ.get("POOLD_JOB_ID", "?")
    end = time.time() + seconds
    kind = "start"
    while True:
        with open(path, "a") as f:
            f.write(f"{kind} {jid} {os.getpid()} {time.time()}\n")
        if kind == "end":
            return jid
        time.sleep(max(0.0, min(0.05, end - time.time())))
        kind = "end" if time.time() >= end else "tick"
