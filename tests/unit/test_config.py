"""service.config.load(): defaults, sources and their order, and errors that name the key."""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from service import config
from service.config import ConfigError, load

DEFAULT_TOML = Path(__file__).resolve().parents[2] / "config" / "poold.toml"
SECTIONS = {"server": config.ServerConfig, "pool": config.PoolConfig, "jobs": config.JobsConfig,
            "store": config.StoreConfig, "cluster": config.ClusterConfig,
            "supervisor": config.SupervisorConfig, "log": config.LogConfig}


def write(tmp_path: Path, text: str, name: str = "poold.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def sections(cfg: config.Config) -> dict[str, Any]:
    """The configuration proper: one dataclass per TOML table (not where it came from)."""
    return {name: getattr(cfg, name) for name in SECTIONS}


def value(cfg: config.Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def load_error(*args: Any, **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load(*args, **kw)
    return e.value


# -- defaults


def test_defaults_equal_the_annotated_file():
    from_file = load(DEFAULT_TOML, env={})
    built_in = load(None, env={})
    assert from_file.source == str(DEFAULT_TOML)
    assert built_in.source == "<defaults>"
    assert sections(from_file) == sections(built_in)


def test_the_annotated_file_sets_every_key():
    """config/poold.toml documents every key there is, and nothing else."""
    data = tomllib.loads(DEFAULT_TOML.read_text())
    assert set(data) == set(SECTIONS)
    for section, cls in SECTIONS.items():
        assert set(data[section]) == {f.name for f in dataclasses.fields(cls)}, section


@pytest.mark.parametrize(("dotted", "expected"), [
    ("server.host", "127.0.0.1"), ("server.port", 8321), ("server.unix_socket", ""),
    ("server.token", ""), ("server.token_file", ""), ("server.max_body_bytes", 1048576),
    ("pool.workers", 0), ("pool.start_method", "forkserver"), ("pool.max_tasks_per_worker", 0),
    ("pool.max_memory_mb", 0), ("pool.preload", ()),
    ("jobs.allow", ("service.demo:*",)), ("jobs.default_timeout", 300.0),
    ("jobs.max_timeout", 3600.0), ("jobs.max_queue", 100000), ("jobs.result_ttl", 86400.0),
    ("jobs.max_result_bytes", 10485760),
    ("store.path", "poold.db"),
    ("supervisor.interval", 1.0), ("supervisor.kill_grace", 3.0), ("supervisor.shutdown_grace", 30.0),
    ("log.level", "info"), ("log.format", "text"),
])
def test_contract_defaults(dotted, expected):
    got = value(load(None, env={}), dotted)
    assert got == expected and type(got) is type(expected), (dotted, got)


def test_workers_zero_means_one_per_cpu():
    assert load(None, env={}).pool.size == (os.cpu_count() or 1)
    assert load(None, env={"POOLD_POOL_WORKERS": "3"}).pool.size == 3


def test_no_token_by_default():
    assert load(None, env={}).token == ""


def test_file_values(tmp_path):
    p = write(tmp_path, """
[server]
port = 9000
max_body_bytes = 2048
[pool]
workers = 3
start_method = "spawn"
preload = ["json", "os.path"]
[jobs]
allow = ["a.b:*", "c:f"]
default_timeout = 5
max_queue = 7
[store]
path = ":memory:"
[supervisor]
kill_grace = 0
[log]
level = "debug"
format = "json"
""")
    cfg = load(p, env={})
    assert cfg.server.port == 9000 and cfg.server.max_body_bytes == 2048
    assert cfg.pool.workers == 3 and cfg.pool.start_method == "spawn"
    assert cfg.pool.preload == ("json", "os.path")
    assert cfg.jobs.allow == ("a.b:*", "c:f") and cfg.jobs.max_queue == 7
    # an integer where a number is expected is taken as a float
    assert cfg.jobs.default_timeout == 5.0 and isinstance(cfg.jobs.default_timeout, float)
    assert cfg.store.path == ":memory:"
    assert cfg.supervisor.kill_grace == 0.0
    assert (cfg.log.level, cfg.log.format) == ("debug", "json")
    # keys the file leaves out keep their defaults
    assert cfg.server.host == "127.0.0.1" and cfg.jobs.max_timeout == 3600.0


def test_empty_file_is_the_defaults(tmp_path):
    cfg = load(write(tmp_path, "# nothing\n"), env={})
    assert sections(cfg) == sections(load(None, env={}))


# -- sources and precedence


@pytest.mark.parametrize(("var", "text", "dotted", "expected"), [
    ("POOLD_POOL_WORKERS", "4", "pool.workers", 4),
    ("POOLD_SERVER_MAX_BODY_BYTES", "2048", "server.max_body_bytes", 2048),
    ("POOLD_JOBS_ALLOW", '["a:*", "b:f"]', "jobs.allow", ("a:*", "b:f")),
    ("POOLD_JOBS_DEFAULT_TIMEOUT", "2.5", "jobs.default_timeout", 2.5),
    ("POOLD_JOBS_DEFAULT_TIMEOUT", "7", "jobs.default_timeout", 7.0),
    ("POOLD_SUPERVISOR_INTERVAL", "0.25", "supervisor.interval", 0.25),
    ("POOLD_POOL_PRELOAD", '["json"]', "pool.preload", ("json",)),
    # not TOML: the plain string
    ("POOLD_LOG_LEVEL", "debug", "log.level", "debug"),
    ("POOLD_POOL_START_METHOD", "spawn", "pool.start_method", "spawn"),
    ("POOLD_STORE_PATH", "/tmp/poold-jobs.db", "store.path", "/tmp/poold-jobs.db"),
    ("POOLD_SERVER_HOST", "localhost", "server.host", "localhost"),
    ("POOLD_SERVER_TOKEN", "s3cret-token", "server.token", "s3cret-token"),
    # a TOML string
    ("POOLD_STORE_PATH", '"quoted.db"', "store.path", "quoted.db"),
    ("POOLD_SERVER_UNIX_SOCKET", "/run/poold.sock", "server.unix_socket", "/run/poold.sock"),
])
def test_env_override(var, text, dotted, expected):
    cfg = load(None, env={var: text})
    got = value(cfg, dotted)
    assert got == expected and type(got) is type(expected), (var, got)


def test_env_beats_file_and_flags_beat_both(tmp_path):
    p = write(tmp_path, "[pool]\nworkers = 1\n[server]\nmax_body_bytes = 100\n")
    env = {"POOLD_POOL_WORKERS": "2", "POOLD_SERVER_MAX_BODY_BYTES": "200"}
    assert load(p, env={}).pool.workers == 1
    cfg = load(p, env=env)
    assert (cfg.pool.workers, cfg.server.max_body_bytes) == (2, 200)
    cfg = load(p, env=env, flags={"pool.workers": 3})
    assert (cfg.pool.workers, cfg.server.max_body_bytes) == (3, 200)
    # a flag left unset (None) changes nothing
    cfg = load(p, env=env, flags={"pool.workers": None, "store.path": None})
    assert cfg.pool.workers == 2 and cfg.store.path == "poold.db"


@pytest.mark.parametrize(("flag", "env_text", "flag_value"), [
    ("server.host", "localhost", "::1"),
    ("server.port", "9000", 9999),
    ("pool.workers", "1", 5),
    ("store.path", "env.db", "/tmp/flag.db"),
    ("log.level", "error", "warning"),
])
def test_flag_beats_env_and_file(tmp_path, flag, env_text, flag_value):
    section, key = flag.split(".")
    p = write(tmp_path, "[jobs]\nmax_queue = 5\n")
    env = {f"POOLD_{section.upper()}_{key.upper()}": env_text}
    assert value(load(p, env=env), flag) != flag_value
    assert value(load(p, env=env, flags={flag: flag_value}), flag) == flag_value


def test_flag_errors_are_checked_too():
    e = load_error(None, env={}, flags={"pool.workers": -2})
    assert "workers" in str(e)


@pytest.mark.parametrize("var", ["POOLD_URL", "POOLD_TOKEN", "POOLD_CONFIG"])
def test_client_variables_are_not_overrides(var):
    cfg = load(None, env={var: "/does/not/matter"})
    assert sections(cfg) == sections(load(None, env={}))


def test_variables_that_name_no_section_are_ignored():
    env = {"POOLD_URL": "http://x", "POOLD_TOKEN": "t", "POOLD_CONFIG": "/nope.toml",
           "POOLD_SOMETHING_ELSE": "1", "POOLD": "x", "NOT_POOLD_POOL_WORKERS": "9",
           "poold_pool_workers": "9"}
    assert load(None, env=env).pool.workers == 0


def test_env_mapping_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("POOLD_POOL_WORKERS", "6")
    assert load(None).pool.workers == 6


# -- errors name the source and the key


def test_error_carries_source_key_and_message(tmp_path):
    p = write(tmp_path, "[pool]\nworkers = -1\n", "mine.toml")
    e = load_error(p, env={})
    assert e.source == str(p) and e.key == "pool.workers" and e.message
    assert str(p) in str(e) and "workers" in str(e)


@pytest.mark.parametrize(("text", "key"), [
    # unknown section / key
    ("[poool]\nworkers = 1\n", "poool"),
    ("[pool]\nwrokers = 1\n", "wrokers"),
    ("[server]\ntokenn = 'x'\n", "tokenn"),
    ("pool = 1\n", "pool"),
    # wrong type
    ("[pool]\nworkers = 'many'\n", "workers"),
    ("[pool]\nworkers = 2.5\n", "workers"),
    ("[pool]\nworkers = true\n", "workers"),
    ("[server]\nport = '8321'\n", "port"),
    ("[server]\nhost = 127\n", "host"),
    ("[jobs]\nallow = 'tests.support.jobs:*'\n", "allow"),
    ("[jobs]\nallow = [1, 2]\n", "allow"),
    ("[jobs]\ndefault_timeout = 'soon'\n", "default_timeout"),
    ("[jobs]\nresult_ttl = true\n", "result_ttl"),
    ("[pool]\npreload = 'json'\n", "preload"),
    ("[store]\npath = 1\n", "path"),
    ("[jobs]\nmax_timeout = inf\n", "max_timeout"),
    ("[jobs]\nmax_timeout = nan\n", "max_timeout"),
    # out of range
    ("[pool]\nworkers = -1\n", "workers"),
    ("[server]\nport = 70000\n", "port"),
    ("[server]\nport = -1\n", "port"),
    ("[server]\nmax_body_bytes = 0\n", "max_body_bytes"),
    ("[pool]\nmax_tasks_per_worker = -1\n", "max_tasks_per_worker"),
    ("[pool]\nmax_memory_mb = -5\n", "max_memory_mb"),
    ("[jobs]\ndefault_timeout = 0\n", "default_timeout"),
    ("[jobs]\ndefault_timeout = -1.0\n", "default_timeout"),
    ("[jobs]\nmax_timeout = 0.0\n", "max_timeout"),
    ("[jobs]\nmax_queue = 0\n", "max_queue"),
    ("[jobs]\nresult_ttl = 0\n", "result_ttl"),
    ("[jobs]\nmax_result_bytes = 0\n", "max_result_bytes"),
    ("[supervisor]\ninterval = 0\n", "interval"),
    ("[supervisor]\nkill_grace = -1\n", "kill_grace"),
    ("[supervisor]\nshutdown_grace = -0.5\n", "shutdown_grace"),
    ("[jobs]\ndefault_timeout = 100.0\nmax_timeout = 10.0\n", "default_timeout"),
    # bad choice
    ("[pool]\nstart_method = 'threads'\n", "start_method"),
    ("[log]\nlevel = 'loud'\n", "level"),
    ("[log]\nlevel = 'INFO'\n", "level"),
    ("[log]\nformat = 'xml'\n", "format"),
    # bad allow pattern / module name
    ("[jobs]\nallow = ['nocolon']\n", "allow"),
    ("[jobs]\nallow = [':f']\n", "allow"),
    ("[jobs]\nallow = ['mod:']\n", "allow"),
    ("[jobs]\nallow = ['service.demo:*', '']\n", "allow"),
    ("[pool]\npreload = ['not a module']\n", "preload"),
    ("[pool]\npreload = ['']\n", "preload"),
    ("[pool]\npreload = ['no_such_module_poold_test']\n", "preload"),  # no worker could start
    ("[store]\npath = ''\n", "store.path"),
    # cross-key rules
    ("[server]\nhost = '0.0.0.0'\n", "host"),
    ("[server]\nhost = '192.0.2.1'\n", "host"),
    ("[server]\nhost = 'example.com'\n", "host"),
    ("[server]\nport = 0\n", "port"),
    ("[server]\ntoken = 'a'\ntoken_file = '/etc/hostname'\n", "token_file"),
])
def test_file_errors_name_the_key(tmp_path, text, key):
    p = write(tmp_path, text, "bad.toml")
    e = load_error(p, env={})
    assert key in str(e) and key in e.key, (text, str(e))
    assert "bad.toml" in str(e) and e.source == str(p)


@pytest.mark.parametrize("text", [
    "[pool\nworkers = 1\n",
    "[pool]\nworkers = \n",
    "[pool]\nworkers = 1\nworkers = 2\n",
    "[pool]\n[pool]\n",
    "not toml at all",
])
def test_toml_syntax_error_names_the_file(tmp_path, text):
    p = write(tmp_path, text, "broken.toml")
    e = load_error(p, env={})
    assert "broken.toml" in str(e) and e.source == str(p)


def test_missing_file_is_an_error(tmp_path):
    e = load_error(tmp_path / "absent.toml", env={})
    assert "absent.toml" in str(e)


@pytest.mark.parametrize(("env", "var", "key"), [
    ({"POOLD_POOL_BOGUS": "1"}, "POOLD_POOL_BOGUS", "bogus"),
    ({"POOLD_SERVER_TOKENN": "x"}, "POOLD_SERVER_TOKENN", "tokenn"),
    ({"POOLD_POOL_WORKERS": "many"}, "POOLD_POOL_WORKERS", "workers"),
    ({"POOLD_POOL_WORKERS": "-1"}, "POOLD_POOL_WORKERS", "workers"),
    ({"POOLD_POOL_WORKERS": "1.5"}, "POOLD_POOL_WORKERS", "workers"),
    ({"POOLD_JOBS_ALLOW": "service.demo:*"}, "POOLD_JOBS_ALLOW", "allow"),
    ({"POOLD_JOBS_ALLOW": '["nocolon"]'}, "POOLD_JOBS_ALLOW", "allow"),
    ({"POOLD_LOG_LEVEL": "loud"}, "POOLD_LOG_LEVEL", "level"),
    ({"POOLD_SERVER_PORT": "99999"}, "POOLD_SERVER_PORT", "port"),
    ({"POOLD_JOBS_DEFAULT_TIMEOUT": "soon"}, "POOLD_JOBS_DEFAULT_TIMEOUT", "default_timeout"),
    ({"POOLD_POOL": "3"}, "POOLD_POOL", "pool"),  # a section and no key
    # rules across keys name where the key they name was set
    ({"POOLD_SERVER_HOST": "0.0.0.0"}, "POOLD_SERVER_HOST", "server.host"),
    ({"POOLD_SERVER_PORT": "0"}, "POOLD_SERVER_PORT", "server.port"),
    ({"POOLD_JOBS_DEFAULT_TIMEOUT": "7200"}, "POOLD_JOBS_DEFAULT_TIMEOUT", "default_timeout"),
])
def test_env_errors_name_the_variable(env, var, key):
    e = load_error(None, env=env)
    assert var in str(e) and e.source == var, str(e)
    assert key in str(e), str(e)


def test_env_error_wins_over_a_good_file(tmp_path):
    p = write(tmp_path, "[pool]\nworkers = 2\n")
    e = load_error(p, env={"POOLD_POOL_WORKERS": "many"})
    assert "POOLD_POOL_WORKERS" in str(e)


# -- cross-key rules, the good side


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_need_no_token(host):
    assert load(None, env={"POOLD_SERVER_HOST": f'"{host}"'}).server.host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
def test_non_loopback_host_with_a_token(host, tmp_path):
    env = {"POOLD_SERVER_HOST": f'"{host}"'}
    e = load_error(None, env=env)
    assert "host" in str(e)
    assert load(None, env={**env, "POOLD_SERVER_TOKEN": "t0ken"}).server.host == host
    tf = tmp_path / "token"
    tf.write_text("from-file\n")
    cfg = load(None, env={**env, "POOLD_SERVER_TOKEN_FILE": str(tf)})
    assert cfg.server.host == host and cfg.token == "from-file"


def test_a_rule_across_keys_names_the_most_specific_source_of_its_keys(tmp_path):
    p = write(tmp_path, "[server]\nport = 8000\n")
    assert load_error(p, flags={"server.host": "0.0.0.0"}).source == "--host"
    q = write(tmp_path, '[server]\nhost = "0.0.0.0"\n')
    assert load_error(q, env={"POOLD_SERVER_PORT": "8000"}).source == str(q)
    # the file is valid; the variable broke the rule, though the key named is the file's
    r = write(tmp_path, "[jobs]\ndefault_timeout = 300\n")
    e = load_error(r, env={"POOLD_JOBS_MAX_TIMEOUT": "100"})
    assert (e.source, e.key) == ("POOLD_JOBS_MAX_TIMEOUT", "jobs.default_timeout"), str(e)


def test_a_preload_is_looked_for_without_running_its_packages(tmp_path, monkeypatch):
    pkg = tmp_path / "boom_pkg_poold_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not run at config time')\n")
    (pkg / "sub.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    good = write(tmp_path, "[pool]\npreload = ['boom_pkg_poold_test.sub', 'os.path', 'json.decoder']\n")
    assert load(good, env={}).pool.preload[0] == "boom_pkg_poold_test.sub"
    assert "boom_pkg_poold_test" not in sys.modules
    bad = write(tmp_path, "[pool]\npreload = ['boom_pkg_poold_test.nope']\n")
    assert load_error(bad, env={}).key == "pool.preload"


def test_port_zero_needs_a_unix_socket(tmp_path):
    e = load_error(None, env={"POOLD_SERVER_PORT": "0"})
    assert "port" in str(e)
    cfg = load(None, env={"POOLD_SERVER_PORT": "0", "POOLD_SERVER_UNIX_SOCKET": str(tmp_path / "s")})
    assert cfg.server.port == 0 and cfg.server.unix_socket.endswith("s")


def test_token_file_is_read_and_stripped(tmp_path):
    tf = tmp_path / "token"
    tf.write_text("  \n\tsecret-value \n\n")
    cfg = load(write(tmp_path, f"[server]\ntoken_file = {str(tf)!r}\n".replace("'", '"')), env={})
    assert cfg.token == "secret-value"


@pytest.mark.parametrize("content", [None, "", "   \n"])
def test_unusable_token_file(tmp_path, content):
    tf = tmp_path / "token"
    if content is not None:
        tf.write_text(content)
    e = load_error(None, env={"POOLD_SERVER_TOKEN_FILE": str(tf)})
    assert "token_file" in str(e)


def test_token_wins_when_set():
    assert load(None, env={"POOLD_SERVER_TOKEN": "abc"}).token == "abc"


def test_config_is_frozen():
    cfg = load(None, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.pool.workers = 3  # type: ignore[misc]


@pytest.mark.parametrize(("where", "reason"), [
    ("missing/poold.db", "does not exist"),
    ("adir", "is a directory"),
])
def test_a_store_path_that_cannot_be_made_is_named(tmp_path: Path, where: str, reason: str) -> None:
    (tmp_path / "adir").mkdir()
    path = tmp_path / where
    err = load_error(write(tmp_path, f'[store]\npath = "{path}"\n'), env={})
    assert err.key == "store.path" and reason in err.message, err


@pytest.mark.parametrize(("env", "key", "says"), [
    ({"POOLD_STORE_URL": "mysql://u:s3cret@h/db"}, "store.url", "postgresql://"),
    ({"POOLD_STORE_URL": "postgresql://u:s3cret@h:99999/db"}, "store.url", "Port out of range"),
    ({"POOLD_STORE_SCHEMA": "Poold"}, "store.schema", "lower-case"),
    ({"POOLD_CLUSTER_HEARTBEAT_INTERVAL": "0"}, "cluster.heartbeat_interval", "> 0"),
    ({"POOLD_CLUSTER_HOST_TIMEOUT": "5"}, "cluster.host_timeout", "3 x"),
])
def test_cluster_keys_are_checked_without_showing_the_password(env: dict[str, str], key: str,
                                                               says: str) -> None:
    err = load_error(None, env=env)
    assert err.key == key and says in err.message, err
    assert "s3cret" not in str(err)


def test_a_store_url_from_the_flag_and_the_path_it_makes_moot(tmp_path: Path) -> None:
    cfg = load(None, env={"POOLD_STORE_PATH": str(tmp_path / "missing" / "x.db")},
               flags={"store.path": "postgresql://poold:pw@db:5432/jobs"})
    assert cfg.store.url == "postgresql://poold:pw@db:5432/jobs"  # --store took the URL
    assert cfg.store.where == "postgresql://poold:***@db:5432/jobs"  # and a missing path is no error
    assert config.redact("postgresql://db/jobs") == "postgresql://db/jobs"
