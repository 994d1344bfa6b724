#!/usr/bin/env bash
# poold under a real systemd: installs the built wheel in a throw-away
# systemd-nspawn container (PID 1 = systemd 252), starts the shipped units
# (systemd/poold.service + poold.socket) and checks the systemd contract:
# readiness, socket activation, reload, watchdog restart, draining stop,
# journal, hardening (systemd-analyze security / verify).
#
# Usage (as root): bash tests/e2e/systemd/e2e.sh      (~1 min; ~1 more the first time)
# Environment:
#   SD_SANDBOX          path to sandbox.sh   (../shared/tools/systemd-sandbox/sandbox.sh from the repo)
#   SD_NAME             sandbox name         (poold-e2e)
#   SD_PRIVATE_NETWORK  1 (default): the container only has 'lo', so port 8321 never
#                       clashes with the host; everything is installed offline anyway.
#   POOLD_E2E_PYTHON    host python with pip (default: /work/venv/bin/python, else python3)
#   POOLD_E2E_KEEP      1: leave the sandbox running at the end (for debugging)
# Prints one "ok N - ..." or "not ok N - ..." line per check and, last,
# "N passed, M failed"; exits 0 only when nothing failed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
SB=${SD_SANDBOX:-$root/../shared/tools/systemd-sandbox/sandbox.sh}
[ -x "$SB" ] || SB=/work/shared/tools/systemd-sandbox/sandbox.sh
export SD_NAME=${SD_NAME:-poold-e2e}
export SD_EPHEMERAL=1                      # every run starts from the pristine rootfs
export SD_PRIVATE_NETWORK=${SD_PRIVATE_NETWORK:-1}
PY=${POOLD_E2E_PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x /work/venv/bin/python ]; then PY=/work/venv/bin/python; else PY=$(command -v python3); fi
fi

[ "$(id -u)" = 0 ] || { echo "e2e.sh: must run as root" >&2; exit 2; }
[ -x "$SB" ] || { echo "e2e.sh: sandbox.sh not found (set SD_SANDBOX)" >&2; exit 2; }

passed=0 failed=0 n=0
ok() { n=$((n + 1)); passed=$((passed + 1)); echo "ok $n - $*"; }
nok() { n=$((n + 1)); failed=$((failed + 1)); echo "not ok $n - $*"; }
note() { echo "# $*"; }
t() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(t)" 'BEGIN { printf "%.2f", b - a }'; }
X() { "$SB" exec "$@"; }                    # run inside the container
show() { X systemctl show -p "$2" --value "$1"; }
# api METHOD PATH [BODY] [FIELD...] -> "STATUS FIELD-VALUES..." (poold-e2e-req, below)
api() { X /usr/local/bin/poold-e2e-req "$@"; }
journal_tail() { X journalctl -u poold.service -o short-monotonic --no-pager -n "${1:-40}" | sed 's/^/#   /'; }
job_state() { api GET "/v1/jobs/$1" state | cut -f2; }
job_is() { [ "$(job_state "$1")" = "$2" ]; }
unit_is() { [ "$(show poold.service ActiveState)" = "$1" ]; }
cg_procs() {  # pids in the unit's cgroup (hybrid hierarchy here: name=systemd and unified)
    X sh -c "cat /sys/fs/cgroup/unified$1/cgroup.procs /sys/fs/cgroup/systemd$1/cgroup.procs \
                 /sys/fs/cgroup$1/cgroup.procs 2>/dev/null" | sort -u | wc -l
}
sigkills() { X journalctl -u poold.service -o cat --no-pager _PID=1 | grep -c "Killing process .* with signal SIGKILL"; }
restarted_since() { [ "$(show poold.service NRestarts)" -gt "$1" ]; }
wait_for() {  # wait_for SECONDS CMD...: until CMD succeeds
    local limit=$1 t0; shift; t0=$(t)
    until "$@"; do
        [ "$(since "$t0" | cut -d. -f1)" -lt "$limit" ] || return 1
        sleep 0.2
    done
}

work=$(mktemp -d /var/tmp/poold-e2e.XXXXXX)
cleanup() {
    local rc=$?
    if [ "${POOLD_E2E_KEEP:-0}" = 1 ]; then
        echo "# sandbox $SD_NAME left running (POOLD_E2E_KEEP=1); stop it with: SD_NAME=$SD_NAME $SB stop" >&2
    else
        "$SB" stop >/dev/null 2>&1 || "$SB" stop || true
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT INT TERM

# ------------------------------------------------------------------ build ---
note "building the poold wheel and downloading its dependencies (for Debian's python3.11, x86_64)"
mkdir -p "$work/payload/opt/poold-wheels" "$work/payload/etc/systemd/system" \
         "$work/payload/etc/poold" "$work/payload/usr/local/bin"
wheels=$work/payload/opt/poold-wheels
"$PY" -m pip wheel -q --no-deps -w "$wheels" "$root" >"$work/build.log" 2>&1 \
    || { cat "$work/build.log" >&2; echo "e2e.sh: wheel build failed" >&2; exit 2; }
wheel=$(ls "$wheels"/poold-*.whl)
platforms=()
for p in manylinux_2_36 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do
    platforms+=(--platform "${p}_x86_64")
done
"$PY" -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
    "${platforms[@]}" -d "$wheels" "$wheel" >"$work/download.log" 2>&1 \
    || { cat "$work/download.log" >&2; echo "e2e.sh: pip download failed" >&2; exit 2; }
note "wheels: $(cd "$wheels" && ls | tr '\n' ' ')"

cp "$root/systemd/poold.service" "$root/systemd/poold.socket" "$work/payload/etc/systemd/system/"
# The configuration the test runs with: 2 workers (raised to 3 by the reload check).
printf '[pool]\nworkers = 2\n' >"$work/payload/etc/poold/poold.toml"
chmod 0644 "$work/payload/etc/poold/poold.toml"
printf 'POOLD_CONFIG=/etc/poold/poold.toml\n' >"$work/payload/etc/poold/env"

# A tiny HTTP client for inside the container (the minimal rootfs has no curl):
# req METHOD PATH [BODY] [FIELD...]: prints the status code, then each FIELD
# (a dotted path into the JSON answer; strings raw, the rest as JSON; '#path': its
# length), tab-separated.
cat >"$work/payload/usr/local/bin/poold-e2e-req" <<'EOF'
#!/usr/bin/python3
import json, sys, urllib.error, urllib.request
method, path, *rest = sys.argv[1:]
body = rest.pop(0).encode() if rest and rest[0].startswith("{") else None
req = urllib.request.Request("http://127.0.0.1:8321" + path, data=body, method=method,
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=45) as r:
        status, raw = r.status, r.read()
except urllib.error.HTTPError as e:
    status, raw = e.code, e.read()
except OSError as e:
    print("000", repr(e), sep="\t"); sys.exit(1)
try:
    doc = json.loads(raw)
except ValueError:
    doc = raw.decode(errors="replace")
out = [str(status)]
for field in rest:
    count, field = field.startswith("#"), field.lstrip("#")
    v = doc
    for part in field.split("."):
        v = v.get(part) if isinstance(v, dict) else (v[int(part)] if isinstance(v, list) and part.isdigit() and int(part) < len(v) else None)
    out.append(str(len(v) if isinstance(v, (list, dict)) else -1) if count else v if isinstance(v, str) else json.dumps(v))
print(*out, sep="\t")
EOF
chmod 0755 "$work/payload/usr/local/bin/poold-e2e-req"

# --------------------------------------------------------------- sandbox ---
"$SB" setup
"$SB" stop >/dev/null 2>&1 || true          # a sandbox left over by an aborted run
"$SB" boot
"$SB" copy "$work/payload" /
X python3 -m venv /opt/poold
X /opt/poold/bin/pip install -q --no-index --find-links /opt/poold-wheels poold >/dev/null
X /opt/poold/bin/poold --version >/dev/null || { echo "e2e.sh: poold not runnable in the container" >&2; exit 1; }
X systemctl daemon-reload
note "installed $(basename "$wheel") into /opt/poold; units in /etc/systemd/system"

# ---------------------------------------------------------------- checks ---
set +e    # from here on a failing command fails a check, not the script

# 1. 'activating' until READY=1, then 'active'
X systemctl start poold.socket
t0=$(t)
X systemctl start --no-block poold.service
s=$(X systemctl is-active poold.service || true)
X systemctl start poold.service || true    # returns when the start job is done (READY=1)
s2=$(X systemctl is-active poold.service || true)
if [ "$s" = activating ] && [ "$s2" = active ]; then
    ok "activating until READY=1, then active (after $(since "$t0") s)"
else
    nok "expected activating then active, got '$s' then '$s2'"; journal_tail
fi
mainpid=$(show poold.service MainPID)

runtime_checks() {
# 2. it runs as its own unprivileged user, with its store in the state directory
uid=$(X ps -o uid= -p "$mainpid" | tr -d ' ' || true)
if [ -n "$uid" ] && [ "$uid" != 0 ] && X test -e /var/lib/private/poold/poold.db; then
    ok "runs as dynamic user uid $uid; store at /var/lib/poold/poold.db"
else
    nok "main pid $mainpid uid '$uid' (want non-root) / no /var/lib/private/poold/poold.db"
    X ls -la /var/lib/private/poold/ 2>&1 | sed 's/^/#   /' || true
fi

# 3. a job submitted through the activated socket succeeds; poold did not bind 8321 itself
listeners=$(X awk '$2 == "0100007F:2081" && $4 == "0A"' /proc/net/tcp | wc -l)
read -r st id _ < <(api POST /v1/jobs '{"fn":"service.demo:fib","args":[20]}' id || true)
read -r st2 state result _ < <(api GET "/v1/jobs/$id?wait=10" state result || true)
if [ "$st" = 202 ] && [ "$st2" = 200 ] && [ "$state" = succeeded ] && [ "$result" = 6765 ] \
   && [ "$listeners" = 1 ]; then
    ok "fib(20) through the activated socket: $state, $result (one listener on 127.0.0.1:8321)"
else
    nok "job via activated socket: POST $st, GET $st2 state=$state result=$result, listeners=$listeners"
    journal_tail
fi

idle_status=$(show poold.service StatusText)

# 4. systemctl reload during a running job keeps it (and applies the new pool size)
read -r st id _ < <(api POST /v1/jobs '{"fn":"service.demo:sleep","args":[3]}' id || true)
wait_for 10 job_is "$id" running \
    || note "the sleep job did not show as running within 10 s"
X sed -i 's/^workers = 2$/workers = 3/' /etc/poold/poold.toml
t0=$(t)
if X systemctl reload poold.service; then rl=ok; else rl=failed; fi
rtook=$(since "$t0")
wait_for 10 unit_is active || true
read -r st2 state _ < <(api GET "/v1/jobs/$id?wait=15" state || true)
pid_after=$(show poold.service MainPID)
workers=$(api GET /v1/workers '#workers' | cut -f2)
if [ "$rl" = ok ] && [ "$state" = succeeded ] && [ "$pid_after" = "$mainpid" ] \
   && [ "$(show poold.service ActiveState)" = active ]; then
    ok "reload during a running sleep(3) job: reload $rl in $rtook s, job $state, same main pid $mainpid"
else
    nok "reload: systemctl reload $rl, job '$state' (GET $st2), pid $mainpid -> $pid_after, state $(show poold.service ActiveState)"
    journal_tail
fi
if [ "$workers" = 3 ]; then
    ok "reload applied pool.workers = 3"
else
    nok "after reload with pool.workers = 3, /v1/workers lists $workers"
fi

# 5. SIGSTOP of the main pid: the watchdog restarts the service; a queued job survives
restarts0=$(show poold.service NRestarts)
busy=()
case $workers in ''|*[!0-9]*) workers=3 ;; esac
for _ in $(seq "$workers"); do              # occupy every worker...
    read -r st id _ < <(api POST /v1/jobs '{"fn":"service.demo:sleep","args":[120]}' id || true)
    busy+=("$id")
done
wait_for 10 job_is "${busy[-1]}" running \
    || note "the last of the $workers sleep(120) jobs is not running"
read -r st qid _ < <(api POST /v1/jobs '{"fn":"service.demo:fib","args":[20],"priority":10}' id || true)
read -r _ qstate _ < <(api GET "/v1/jobs/$qid" state || true)   # ...so this one waits
# STATUS= follows the load: it must have changed from the idle text seen before.
status_changed() { busy_status=$(show poold.service StatusText); [ -n "$busy_status" ] && [ "$busy_status" != "$idle_status" ]; }
if [ -n "$idle_status" ] && wait_for 10 status_changed; then
    ok "STATUS= follows the load: '$idle_status' -> '$busy_status'"
else
    nok "StatusText did not follow the load: idle '$idle_status', busy '$(show poold.service StatusText)'"
fi
pid1=$(show poold.service MainPID)
t0=$(t)
X kill -STOP "$pid1"
if wait_for 90 restarted_since "$restarts0"; then
    took=$(since "$t0")
    X systemctl start poold.service || true  # wait for the new instance's READY=1
    pid2=$(show poold.service MainPID)
    read -r st2 state result _ < <(api GET "/v1/jobs/$qid?wait=30" state result || true)
    if [ "$qstate" = queued ] && [ "$st2" = 200 ] && [ "$state" = succeeded ] && [ "$result" = 6765 ] \
       && [ "$pid2" != "$pid1" ] && [ "$(show poold.service ActiveState)" = active ]; then
        ok "SIGSTOP: watchdog restart after $took s (NRestarts $restarts0 -> $(show poold.service NRestarts), pid $pid1 -> $pid2); the queued job survived: $state, $result"
    else
        nok "after the watchdog restart: job was '$qstate' before; now GET $st2 state=$state result=$result; pid $pid1 -> $pid2"
        journal_tail 60
    fi
else
    nok "no watchdog restart within 90 s of SIGSTOP (NRestarts $(show poold.service NRestarts))"
    X kill -CONT "$pid1" || true
    journal_tail
fi
if X journalctl -u poold.service -o cat --no-pager | grep -q 'Watchdog timeout'; then
    ok "journal has systemd's 'Watchdog timeout' line"
else
    nok "no 'Watchdog timeout' line in the journal"
fi

# 6. systemctl stop drains: new jobs get 503 draining, the running job finishes,
#    exit 0, and nothing is left in the unit's cgroup
read -r st id _ < <(api POST /v1/jobs '{"fn":"service.demo:sleep","args":[4]}' id || true)
wait_for 10 job_is "$id" running \
    || note "the sleep(4) job did not show as running"
cg=$(show poold.service ControlGroup)
kills0=$(sigkills)
before=$(cg_procs "$cg")                    # > 0: proves the cgroup paths are the right ones
pid_stop=$(show poold.service MainPID)
t0=$(t)
X systemctl stop --no-block poold.service
wait_for 10 unit_is deactivating || true
read -r dst dcode _ < <(api POST /v1/jobs '{"fn":"service.demo:fib","args":[5]}' error.code || true)
read -r hst _ < <(api GET /health || true)
wait_for 60 unit_is inactive || true
stook=$(since "$t0")
result=$(show poold.service Result); code=$(show poold.service ExecMainStatus)
left=$(cg_procs "$cg")
titled=$(X ps -eo args | grep -c '^poold:' || true)
sigkill=$(( $(sigkills) - kills0 ))
if [ "$dst" = 503 ] && [ "$dcode" = draining ] && [ "$hst" = 503 ]; then
    ok "while stopping: POST /v1/jobs -> 503 draining, /health -> 503"
else
    nok "while stopping: POST /v1/jobs -> $dst $dcode (want 503 draining), /health -> $hst (want 503)"
fi
if [ "$(show poold.service ActiveState)" = inactive ] && [ "$result" = success ] && [ "$code" = 0 ] \
   && [ "$before" -gt 0 ] && [ "$left" = 0 ] && [ "$titled" = 0 ]; then
    ok "stop drained in $stook s: exit 0, Result=success, $before -> 0 processes in $cg"
else
    nok "stop: state $(show poold.service ActiveState), Result=$result, exit $code, $before -> $left pids in $cg, $titled 'poold:' processes (main pid was $pid_stop)"
    X ps -eo pid,ppid,uid,args | sed 's/^/#   /' || true
    journal_tail 60
fi
# KillMode=mixed: whatever poold leaves behind when it exits gets SIGKILL from systemd.
if [ "$sigkill" = 0 ]; then
    ok "poold itself ended all its processes: systemd had nothing to SIGKILL at stop"
else
    nok "at stop systemd had to SIGKILL $sigkill process(es) poold left behind:"
    X journalctl -u poold.service -o cat --no-pager _PID=1 | grep "with signal SIGKILL" | tail -n "$sigkill" | sed 's/^/#   /'
fi
# The next connection starts poold again (socket activation): a GET /health, answered 200 (its
# workers, still starting, count as alive); the drained job had finished.
read -r hst0 _ < <(api GET /health || true)
if [ "$hst0" = 200 ]; then
    ok "the first request after socket activation, GET /health, answered 200"
else
    nok "the first request after socket activation, GET /health, answered $hst0 (want 200)"
fi
read -r st2 state _ < <(api GET "/v1/jobs/$id" state || true)
for _ in $(seq 50); do  # answering already; READY=1 follows once a worker runs
    [ "$(show poold.service ActiveState)" = active ] && break
    sleep 0.1
done
if [ "$state" = succeeded ] && [ "$(show poold.service ActiveState)" = active ]; then
    ok "a connection re-activated poold; the job running at stop finished during the drain: $state"
else
    nok "after stop: GET -> $st2 state '$state' (want succeeded), service $(show poold.service ActiveState)"
fi

# 7. journalctl shows the daemon's own lines
own=$(X journalctl _SYSTEMD_UNIT=poold.service -o cat --no-pager | wc -l)
if [ "$own" -gt 0 ]; then
    ok "journalctl shows $own lines logged by poold itself"
    X journalctl _SYSTEMD_UNIT=poold.service -o cat --no-pager | head -5 | sed 's/^/#   /'
else
    nok "no line logged by poold's processes in the journal"
fi
}

if unit_is active; then
    runtime_checks
else
    nok "checks 2-7 skipped: poold.service is not active (state $(show poold.service ActiveState))"
    journal_tail
fi

# 8. hardening: systemd-analyze security exposure <= 2.0 (with jobs still running, above)
exposure=$(X systemd-analyze security --no-pager poold.service 2>/dev/null \
           | sed -n 's/.*Overall exposure level for poold.service: \([0-9.]*\).*/\1/p')
if [ -n "$exposure" ] && awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }'; then
    ok "systemd-analyze security poold.service: exposure $exposure"
else
    nok "systemd-analyze security poold.service: exposure '$exposure' (want <= 2.0)"
fi

# 9. systemd-analyze verify prints nothing
out=$(X systemd-analyze verify /etc/systemd/system/poold.service /etc/systemd/system/poold.socket 2>&1) \
    && vr=0 || vr=$?
if [ "$vr" = 0 ] && [ -z "$out" ]; then
    ok "systemd-analyze verify: no warning"
else
    nok "systemd-analyze verify (exit $vr): $out"
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
