"""Configuration: one frozen dataclass per TOML table, built by one `load()`.

The dataclass defaults are the embedded defaults and equal `config/poold.toml`
(a test keeps the two in step). Sources, weakest first: defaults, the file,
`POOLD_<SECTION>_<KEY>` variables, command-line flags. Every error names its
source (file or variable) and the key, so `check-config` can say exactly what
is wrong.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import sys
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# `poold serve` flags, by the key each overrides (for messages)
FLAG_NAMES = {"server.host": "--host", "server.port": "--port", "pool.workers": "--workers",
              "store.path": "--store", "store.url": "--store", "log.level": "--log-level"}


class ConfigError(Exception):
    """A configuration value is wrong; `str()` names the source, the key and the problem."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8321
    unix_socket: str = ""
    token: str = ""
    token_file: str = ""
    max_body_bytes: int = 1048576


@dataclass(frozen=True)
class PoolConfig:
    workers: int = 0
    start_method: str = "forkserver"
    max_tasks_per_worker: int = 0
    max_memory_mb: int = 0
    preload: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """The number of worker slots (0 means one per CPU)."""
        return self.workers or os.cpu_count() or 1


@dataclass(frozen=True)
class JobsConfig:
    allow: tuple[str, ...] = ("service.demo:*",)
    default_timeout: float = 300.0
    max_timeout: float = 3600.0
    max_queue: int = 100000
    result_ttl: float = 86400.0
    max_result_bytes: int = 10485760


@dataclass(frozen=True)
class StoreConfig:
    path: str = "poold.db"
    url: str = ""
    schema: str = "poold"

    @property
    def where(self) -> str:
        """The store for messages: the file, or the URL without its password."""
        return redact(self.url) if self.url else self.path


@dataclass(frozen=True)
class ClusterConfig:
    name: str = ""
    heartbeat_interval: float = 2.0
    host_timeout: float = 10.0


@dataclass(frozen=True)
class SupervisorConfig:
    interval: float = 1.0
    kill_grace: float = 3.0
    shutdown_grace: float = 30.0


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "<defaults>"  # where it was read from, for messages
    path: str | None = None  # the file, re-read on reload
    flags: tuple[tuple[str, Any], ...] = ()  # command-line values, applied again on reload

    @property
    def token(self) -> str:
        """The bearer token in force ("" for none): `server.token`, else `server.token_file`'s text."""
        if self.server.token:
            return self.server.token
        if self.server.token_file:
            with open(self.server.token_file, encoding="utf-8") as f:
                return f.read().strip()
        return ""


_TYPES = {"server": ServerConfig, "pool": PoolConfig, "jobs": JobsConfig, "store": StoreConfig,
          "cluster": ClusterConfig, "supervisor": SupervisorConfig, "log": LogConfig}

# key -> (low, high) inclusive bounds; None for an open side
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "server.port": (0, 65535),
    "server.max_body_bytes": (1, None),
    "pool.workers": (0, 4096),
    "pool.max_tasks_per_worker": (0, None),
    "pool.max_memory_mb": (0, None),
    "jobs.max_queue": (1, None),
    "jobs.max_result_bytes": (1, None),
}
_POSITIVE = {"jobs.default_timeout", "jobs.max_timeout", "jobs.result_ttl", "supervisor.interval",
             "cluster.heartbeat_interval", "cluster.host_timeout"}
_URL_SCHEMES = ("postgresql", "postgres")
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")


def redact(url: str) -> str:
    """The URL with its password (if any) replaced by ***: what logs, /health and messages show."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<an unreadable URL>"
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
_NON_NEGATIVE = {"supervisor.kill_grace", "supervisor.shutdown_grace"}
_CHOICES = {
    "pool.start_method": ("forkserver", "spawn", "fork"),
    "log.level": ("debug", "info", "warning", "error"),
    "log.format": ("text", "json"),
}


def _coerce(value: Any, default: Any, where: str, key: str) -> Any:
    """Checks `value` against the type of the key's default; returns the typed value."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(where, key, f"expected true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(where, key, f"expected an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(where, key, f"expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(where, key, f"expected a number, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise ConfigError(where, key, f"expected a string, got {value!r}")
    if isinstance(default, tuple):
        if isinstance(value, list) and all(isinstance(x, str) for x in value):
            return tuple(value)
        raise ConfigError(where, key, f"expected a list of strings, got {value!r}")
    raise ConfigError(where, key, "unsupported type")  # pragma: no cover


def _check(section: str, key: str, value: Any, where: str) -> None:
    """Range and choice checks for one key."""
    name = f"{section}.{key}"
    if name in _RANGES:
        lo, hi = _RANGES[name]
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            span = f"{lo} to {hi}" if hi is not None else f">= {lo}"
            raise ConfigError(where, name, f"must be {span}, got {value!r}")
    if name in _POSITIVE and value <= 0:
        raise ConfigError(where, name, f"must be > 0, got {value!r}")
    if name in _NON_NEGATIVE and value < 0:
        raise ConfigError(where, name, f"must be >= 0, got {value!r}")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ConfigError(where, name, f"must be one of {', '.join(_CHOICES[name])}, got {value!r}")
    if name == "jobs.allow":
        for pattern in value:
            mod, sep, attr = pattern.partition(":")
            if not sep or not mod or not attr:
                raise ConfigError(where, name, f"{pattern!r} is not 'module:name' or 'module:*'")
    if name == "store.path" and not value.strip():
        raise ConfigError(where, name, "must name a file (or :memory:)")
    if name == "store.url" and value:
        scheme = value.partition("://")[0].lower() if "://" in value else ""
        if scheme not in _URL_SCHEMES:
            raise ConfigError(where, name, f"expected a postgresql:// URL, got {redact(value)!r}")
        try:
            urllib.parse.urlsplit(value).port  # noqa: B018 - a bad port raises here
        except ValueError as e:
            raise ConfigError(where, name, f"{redact(value)!r}: {e}") from None
    if name == "store.schema" and not _SCHEMA_NAME.fullmatch(value):
        raise ConfigError(where, name, f"expected a lower-case SQL name (a-z, 0-9, _), got {value!r}")
    if name == "pool.preload":
        for mod in value:
            if not mod or not all(part.isidentifier() for part in mod.split(".")):
                raise ConfigError(where, name, f"{mod!r} is not a module name")
            if not _findable(mod):  # else no worker could ever start: they would fail in a loop
                raise ConfigError(where, name, f"module {mod!r} not found")


def _unwritable(path: str) -> str:
    """Why the store could not be made at `path` ("" when it can): said here, by key, rather than
    as SQLite's "unable to open database file" once the daemon starts."""
    if path == ":memory:" or path.startswith("file:"):
        return ""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        return f"{path!r} is a directory, not a file"
    if os.path.exists(target):
        writable = os.access(target, os.R_OK | os.W_OK)
        return "" if writable else f"{path!r} cannot be written (permission denied)"
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        return f"the directory {parent!r} of {path!r} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"the directory {parent!r} of {path!r} cannot be written (read-only or permission denied)"
    return ""


def _findable(mod: str) -> bool:
    """Whether the module can be found on this process's path, without running any of its code
    or its packages': a dotted name is followed through its packages' directories. Not found
    means certainly not there; anything this cannot tell counts as found (the workers import)."""
    import importlib.machinery
    import importlib.util

    parts = mod.split(".")
    try:
        if mod in sys.modules or (parts[0] in sys.modules and len(parts) > 1):
            return True  # its top package is imported already: its workers' import will tell
        spec = importlib.util.find_spec(parts[0])  # a top-level name: nothing is run
        for i in range(1, len(parts)):
            if spec is None:
                return False
            where = spec.submodule_search_locations
            if where is None:
                return True  # a module, not a package: its attributes cannot be told from here
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:i + 1]), list(where))
        return spec is not None
    except Exception:  # noqa: BLE001 - a finder that fails: the workers' import will say why
        return True


def _parse_env_value(text: str) -> Any:
    """A TOML value where the text parses as one, else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _env_overrides(env: Mapping[str, str]) -> list[tuple[str, str, str, Any]]:
    """(variable, section, key, value) for each POOLD_<SECTION>_<KEY> variable."""
    out = []
    for var, text in sorted(env.items()):
        if not var.startswith("POOLD_"):
            continue
        rest = var[len("POOLD_"):].lower()
        for section in _TYPES:
            if rest == section or rest.startswith(section + "_"):  # POOLD_POOL: a key is missing
                key = rest[len(section) + 1:]
                out.append((var, section, key, _parse_env_value(text)))
                break
    return out


def _apply(values: dict[str, dict[str, Any]], section: str, key: str, value: Any, where: str,
           origins: dict[str, str]) -> None:
    if section not in _TYPES:
        raise ConfigError(where, section, f"unknown section [{section}]")
    defaults = {f.name: f.default for f in fields(_TYPES[section])}
    if not key:  # POOLD_POOL=3
        raise ConfigError(where, section, f"names no key (POOLD_{section.upper()}_<KEY>)")
    if key not in defaults:
        raise ConfigError(where, f"{section}.{key}", f"unknown key in [{section}]")
    typed = _coerce(value, defaults[key], where, f"{section}.{key}")
    _check(section, key, typed, where)
    values.setdefault(section, {})[key] = typed
    origins[f"{section}.{key}"] = where


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
         flags: Mapping[str, Any] | None = None) -> Config:
    """Builds the configuration from defaults < file < environment < flags.

    `flags` maps "section.key" to a value (None values are ignored). Raises
    ConfigError naming the file or variable, the key and what is wrong.
    """
    env = os.environ if env is None else env
    values: dict[str, dict[str, Any]] = {}
    origins: dict[str, str] = {}  # "section.key" -> the file, variable or flag that set it
    source = "<defaults>"
    if path is not None:
        source = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(source, "", f"cannot read: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(source, "", f"invalid TOML: {e}") from None
        for section, table in data.items():
            if section not in _TYPES:
                raise ConfigError(source, section, f"unknown section [{section}]")
            if not isinstance(table, dict):
                raise ConfigError(source, section, "expected a table")
            for key, value in table.items():
                _apply(values, section, key, value, source, origins)
    for var, section, key, value in _env_overrides(env):
        _apply(values, section, key, value, var, origins)
    for name, value in (flags or {}).items():
        if value is not None:
            if name == "store.path" and "://" in str(value):  # --store takes a file or a URL
                name = "store.url"
            section, key = name.split(".", 1)
            _apply(values, section, key, value, FLAG_NAMES.get(name, "--" + key.replace("_", "-")),
                   origins)
    cfg = Config(**{s: _TYPES[s](**values.get(s, {})) for s in _TYPES},  # type: ignore[arg-type]
                 source=source, path=None if path is None else os.fspath(path),
                 flags=tuple((k, v) for k, v in (flags or {}).items() if v is not None))
    _check_whole(cfg, origins)
    return cfg


def _check_whole(cfg: Config, origins: dict[str, str]) -> None:
    """Rules that involve more than one key; an error names where the key it names was set."""
    s = cfg.server

    def error(key: str, message: str, *others: str) -> ConfigError:
        """Names the key, and where the rule was broken: the most specific source among the
        rule's keys (a flag over a variable over the file), as that is the one that changed."""
        found = [origins[k] for k in (key, *others) if k in origins]
        where = max(found, key=lambda w: 2 if w.startswith("--") else 1 if w.startswith("POOLD_")
                    else 0, default=cfg.source)
        return ConfigError(where, key, message)

    if s.port == 0 and not s.unix_socket:
        raise error("server.port", "0 needs server.unix_socket (nothing to listen on)",
                    "server.unix_socket")
    if s.token and s.token_file:
        raise error("server.token_file", "set server.token or server.token_file, not both",
                    "server.token")
    if s.token_file:
        try:
            token = cfg.token
        except OSError as e:
            raise error("server.token_file", f"cannot read {s.token_file}: {e.strerror}") from None
        if not token:
            raise error("server.token_file", f"{s.token_file} is empty")
    if not cfg.store.url and (why := _unwritable(cfg.store.path)):  # with a URL the path is ignored
        raise error("store.path", why)
    c = cfg.cluster
    if c.host_timeout < 3 * c.heartbeat_interval:
        raise error("cluster.host_timeout",
                    f"must be at least 3 x cluster.heartbeat_interval ({3 * c.heartbeat_interval:g}),"
                    f" got {c.host_timeout:g}", "cluster.heartbeat_interval")
    if cfg.jobs.default_timeout > cfg.jobs.max_timeout:
        raise error("jobs.default_timeout", "must not exceed jobs.max_timeout", "jobs.max_timeout")
    if not is_loopback(s.host) and not (s.token or s.token_file):
        raise error("server.host",
                    f"{s.host!r} is not a loopback address: set server.token to listen there",
                    "server.token", "server.token_file")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reload(cfg: Config, env: Mapping[str, str] | None = None) -> Config:
    """The configuration built again from the same file and flags (for SIGHUP)."""
    return load(cfg.path, env, dict(cfg.flags))


def replace(cfg: Config, **sections: Any) -> Config:
    """A copy with some sections replaced (for tests and reloads)."""
    return dataclasses.replace(cfg, **sections)
