"""Layered config loading into frozen dataclasses, and the ServerConfig every service embeds.

Priority, lowest first: dataclass defaults < YAML file < environment < ``--set`` overrides.

- YAML: a mapping whose nesting mirrors the dataclass nesting.
- Environment: ``<PREFIX>__<FIELD>[__<FIELD>...]``, e.g. ``CMX_NPU__SERVER__PORT=5001`` sets
  ``server.port`` when the prefix is ``CMX_NPU``. Names are matched lower-cased.
- Overrides: ``a.b=value`` strings (the CLI's repeated ``--set``).

Strings from env and overrides are converted to the annotated type: int, float, str, bool
(true/false/1/0/yes/no/on/off), ``X | None`` ("none"/"null" -> None), ``tuple[X, ...]`` (YAML list
or comma-separated string) and nested dataclasses. Every failure is a ``ConfigError`` whose message
is one line naming the dotted field.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml

from cloudmatrix.errors import FieldError

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "text")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_NONE = frozenset({"none", "null"})


class ConfigError(ValueError):
    """A config value that cannot be used. ``str(err)`` is one line: ``config error: WHERE: WHAT``."""

    def __init__(self, where: str, detail: str):
        self.where = where
        self.detail = " ".join(detail.split())
        super().__init__(f"config error: {where}: {self.detail}")


@dataclass(frozen=True)
class ServerConfig:
    """Network, telemetry and lifecycle settings shared by every service process."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    metrics_port: int = 0  # 0 = pick a free port, -1 = no metrics endpoint
    grace_s: float = 5.0  # drain time for in-flight RPCs on SIGTERM
    max_message_bytes: int = 64 * 1024 * 1024
    keepalive_s: float = 10.0  # HTTP/2 ping to a client silent this long (0 = never) ...
    keepalive_timeout_s: float = 20.0  # ... and its connection closed when no ack comes within this
    log_level: str = "INFO"
    log_format: str = "json"  # "json" or "text"
    run_dir: str = "runs/local"
    trace_file: str | None = None  # None -> <run_dir>/spans/<service>-<pid>.jsonl
    otlp_endpoint: str | None = None  # set -> spans also go to this OTLP gRPC collector (host:port)
    span_files: bool = True  # False -> no JSON-lines span files (with otlp_endpoint: the collector only)
    span_file_max_bytes: int = 16 * 2**20  # a span file is rotated past this (0 = never)
    span_file_backups: int = 1  # rotated span files kept per process
    service_name: str = ""  # "" -> the name the service's main passes to run_service
    ready_file: str | None = None  # JSON {service, pid, host, port, metrics_port} once SERVING
    malloc_retain_bytes: int = 256 * 2**20  # free heap kept mapped (cloudmatrix.allocator); 0 = glibc defaults
    tls_ca: str | None = None    # mutual TLS (all three or none): the CA's certificate (PEM) ...
    tls_cert: str | None = None  # ... this process's certificate, served and presented to peers ...
    tls_key: str | None = None   # ... and its private key. `cmx certs` makes them.

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "port", f"must be in [0, 65535], got {self.port}")
        _require(-1 <= self.metrics_port <= 65535, "metrics_port",
                 f"must be -1 (off) or in [0, 65535], got {self.metrics_port}")
        _require(self.grace_s >= 0, "grace_s", f"must be >= 0, got {self.grace_s}")
        _require(0 <= self.malloc_retain_bytes < 2**31, "malloc_retain_bytes",
                 f"must be in [0, 2^31), got {self.malloc_retain_bytes}")
        tls = (self.tls_ca, self.tls_cert, self.tls_key)
        _require(all(tls) or not any(tls), "tls_ca",
                 "tls_ca, tls_cert and tls_key go together: set all three for mutual TLS, or none")
        _require(self.span_file_max_bytes >= 0, "span_file_max_bytes",
                 f"must be >= 0 (0 = never rotate), got {self.span_file_max_bytes}")
        _require(self.span_file_backups >= 0, "span_file_backups", f"must be >= 0, got {self.span_file_backups}")
        _require(self.keepalive_s >= 0, "keepalive_s", f"must be >= 0 (0 = no pings), got {self.keepalive_s}")
        _require(self.keepalive_timeout_s > 0, "keepalive_timeout_s", f"must be > 0, got {self.keepalive_timeout_s}")
        _require(self.max_message_bytes > 0, "max_message_bytes",
                 f"must be > 0, got {self.max_message_bytes}")
        _require(self.log_level.upper() in LOG_LEVELS, "log_level",
                 f"must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        _require(self.log_format in LOG_FORMATS, "log_format",
                 f"must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")

    def span_file(self, service: str, pid: int) -> str | None:
        """Where finished spans are written as JSON lines; None when span files are off."""
        if not self.span_files:
            return None
        return self.trace_file or os.path.join(self.run_dir, "spans", f"{service}-{pid}.jsonl")


def _require(ok: bool, field: str, detail: str) -> None:
    """Validation helper: ``load_config`` turns the "field: ..." prefix into the dotted path."""
    if not ok:
        raise FieldError(field, detail)


def load_config(
    cls: type[T],
    *,
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
    env_prefix: str = "CMX",
    base: Sequence[str] = (),
) -> T:
    """Build ``cls`` from defaults, the YAML file at ``path``, ``base`` (KEY=VALUE settings below
    the environment, e.g. a topology entry's), ``env`` and ``overrides``, in increasing priority."""
    raw: dict[str, Any] = read_yaml(path) if path else {}
    for item in base:
        _set_dotted(raw, *parse_override(item))
    for dotted, value in env_items(env or {}, env_prefix):
        _set_dotted(raw, dotted, value)
    for item in overrides:
        _set_dotted(raw, *parse_override(item))
    return _build(cls, raw, "", None)


def read_yaml(path: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file (an empty file is an empty mapping)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(path, f"cannot read config file: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError(path, f"invalid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"top level must be a mapping, got {type(data).__name__}")
    return data


def env_items(env: Mapping[str, str], prefix: str) -> Iterator[tuple[str, str]]:
    """(dotted field, value) for every ``<prefix>__A__B`` variable, in sorted order."""
    head = prefix + "__"
    for key in sorted(env):
        if key.startswith(head) and len(key) > len(head):
            yield ".".join(part.lower() for part in key[len(head):].split("__")), env[key]


def parse_override(item: str) -> tuple[str, str]:
    """``"a.b=value"`` -> ``("a.b", "value")``."""
    dotted, sep, value = item.partition("=")
    if not sep or not dotted.strip():
        raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}")
    return dotted.strip(), value


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError(where, f"expected a mapping, got {child!r}")
        node = child
    node[leaf] = value


def _build(cls: type[T], raw: Mapping[Any, Any], where: str, base: Any) -> T:
    """Instantiate dataclass ``cls`` from ``raw``; unset fields come from ``base`` or defaults."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            raise ConfigError(_join(where, str(key)), "unknown key")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        current = getattr(base, name) if base is not None else _default(f)
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], _join(where, name), current)
        elif current is not dataclasses.MISSING:
            kwargs[name] = current
        else:
            raise ConfigError(_join(where, name), "missing required value")
    return _construct(cls, kwargs, where)


def _construct(cls: type[T], kwargs: dict[str, Any], where: str) -> T:
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except FieldError as err:
        raise ConfigError(_join(where, err.field), str(err).removeprefix(f"{err.field}: ")) from err
    except (ValueError, TypeError) as err:
        raise ConfigError(where or cls.__name__, str(err)) from err


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(value: Any, tp: Any, where: str, current: Any = None) -> Any:
    """Convert one raw value (YAML-typed or string) to annotation ``tp``."""
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(value, tp, where, current)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_optional(value, tp, where, current)
    if origin is tuple:
        return _convert_tuple(value, tp, where)
    if origin is typing.Literal:
        return _convert_literal(value, tp, where)
    scalar = _SCALARS.get(tp)
    if scalar is None:
        raise TypeError(f"{where}: unsupported config annotation {tp!r}")
    return scalar(value, where)


def _convert_dataclass(value: Any, tp: type, where: str, current: Any) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(where, f"expected a mapping, got {value!r}")
    base = current if isinstance(current, tp) else None
    return _build(tp, value, where, base)


def _convert_optional(value: Any, tp: Any, where: str, current: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) != 1 or len(typing.get_args(tp)) != 2:
        raise TypeError(f"{where}: only X | None unions are supported, got {tp!r}")
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
        return None
    return _convert(value, args[0], where, current)


def _convert_tuple(value: Any, tp: Any, where: str) -> tuple:
    args = typing.get_args(tp)
    if len(args) != 2 or args[1] is not Ellipsis:
        raise TypeError(f"{where}: only tuple[X, ...] is supported, got {tp!r}")
    if isinstance(value, str):
        items = [s.strip() for s in value.split(",")] if value.strip() else []
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(where, f"expected a list or comma-separated string, got {value!r}")
    return tuple(_convert(item, args[0], f"{where}[{i}]") for i, item in enumerate(items))


def _convert_literal(value: Any, tp: Any, where: str) -> Any:
    for choice in typing.get_args(tp):
        if value == choice or (isinstance(value, str) and value == str(choice)):
            return choice
    raise ConfigError(where, f"expected one of {list(typing.get_args(tp))}, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(where, f"expected int, got {value!r}")


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ConfigError(where, f"expected float, got {value!r}")


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(where, f"expected bool (true/false/1/0/yes/no), got {value!r}")


def _to_str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(where, f"expected str, got {value!r}")


_SCALARS = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}
