"""Typed, validated views of the built-in sections (``Config.redis_settings()`` and friends).

What each setting is (type, default, range) is declared once in ``_builtin.py``; these frozen
dataclasses only group the values a component needs, validate what a single declaration
cannot (an identity, a log level, a URL, pairs of keys), and keep secrets out of ``repr``.
Build them directly to skip ini files altogether.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

from .._errors import ConfigError
from ._builtin import BUILTIN
from ._values import SettingsSource

__all__ = [
    "KartonSettings",
    "LoggingSettings",
    "RedisSettings",
    "S3Settings",
    "SystemSettings",
    "has_redis",
    "parse_names",
]


def _default(section: str, name: str) -> Any:
    return BUILTIN[section][name].default


def _read(config: SettingsSource, section: str, name: str, identity: str | None = None) -> Any:
    return BUILTIN[section][name].read(config, identity)


def _given(config: SettingsSource, section: str, name: str, identity: str | None = None) -> Any:
    """The typed value when some layer sets it, else None (the caller decides)."""
    option = BUILTIN[section][name]
    entry = option.lookup(config, identity)
    return None if entry is None else option.convert(entry.value, entry.source)


def _fail(config: SettingsSource, section: str, option: str, rule: str) -> ConfigError:
    return ConfigError(
        f"value must be {rule}",
        section=section,
        option=option,
        value=config.get(section, option),
        source=config.source(section, option),
    )


def has_redis(config: SettingsSource) -> bool:
    """True when ``[redis] host``, ``url`` or ``sentinel_master`` is set."""
    return bool(
        config.get("redis", "host")
        or config.get("redis", "url")
        or config.get("redis", "sentinel_master")
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisSettings:
    """How to reach Redis. ``url`` (when set) replaces host, port, db and ssl."""

    host: str | None = "127.0.0.1"
    port: int = _default("redis", "port")
    db: int = _default("redis", "db")
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False
    url: str | None = field(default=None, repr=False)  # may embed a password
    socket_timeout: float | None = _default("redis", "socket_timeout")  # None: no timeout
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = _default("redis", "ssl_cert_reqs")
    ssl_check_hostname: bool = True
    sentinel_master: str | None = None  # set: reach the master through Redis Sentinel
    sentinels: str | None = None  # "host:port,host:port" (parsed by the connector)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: SettingsSource) -> RedisSettings:
        """Validate ``[redis]``; ``host`` is required unless ``url`` is set.

        Raises:
            ConfigError: Redis is not configured, or a value is invalid.
        """
        if not has_redis(config):
            raise ConfigError(
                "Redis is not configured: set host, url or sentinel_master", section="redis"
            )
        port = _read(config, "redis", "port")
        if port > 65535:
            raise _fail(config, "redis", "port", "between 1 and 65535")
        return cls(
            host=_read(config, "redis", "host"),
            port=port,
            db=_read(config, "redis", "db"),
            username=_read(config, "redis", "username") or None,  # empty means unset, as
            password=_read(config, "redis", "password") or None,  # in Karton
            ssl=_read(config, "redis", "ssl"),
            url=_read(config, "redis", "url") or None,
            socket_timeout=_read(config, "redis", "socket_timeout") or None,
            ssl_ca_certs=_read(config, "redis", "ssl_ca_certs") or None,
            ssl_certfile=_read(config, "redis", "ssl_certfile") or None,
            ssl_keyfile=_read(config, "redis", "ssl_keyfile") or None,
            ssl_cert_reqs=_ssl_cert_reqs(config),
            ssl_check_hostname=_read(config, "redis", "ssl_check_hostname"),
            sentinel_master=_read(config, "redis", "sentinel_master") or None,
            sentinels=_read(config, "redis", "sentinels") or None,
            sentinel_username=_read(config, "redis", "sentinel_username") or None,
            sentinel_password=_read(config, "redis", "sentinel_password") or None,
        )


def _ssl_cert_reqs(config: SettingsSource) -> str:
    value = str(_read(config, "redis", "ssl_cert_reqs")).strip().lower()
    if value not in ("required", "optional", "none"):
        raise _fail(config, "redis", "ssl_cert_reqs", "one of required, optional, none")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class S3Settings:
    """How to reach S3. ``address`` is None only with ``iam_auth`` (AWS itself)."""

    address: str | None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    bucket: str
    iam_auth: bool = False

    @classmethod
    def from_config(cls, config: SettingsSource) -> S3Settings:
        """Validate ``[s3]``; ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` and
        ``AWS_SECRET_ACCESS_KEY`` fill in missing options (as on Karton's master branch).

        Raises:
            ConfigError: No bucket, no endpoint (without ``iam_auth``), an address that is
                not an http(s) URL, or only one of the two keys.
        """
        iam_auth = _read(config, "s3", "iam_auth")
        address, where = _str_or_env(config, "address", "AWS_ENDPOINT_URL")
        access, _ = _str_or_env(config, "access_key", "AWS_ACCESS_KEY_ID")
        secret, _ = _str_or_env(config, "secret_key", "AWS_SECRET_ACCESS_KEY")
        bucket = _read(config, "s3", "bucket")
        if not bucket:
            raise ConfigError("S3 bucket is not configured", section="s3", option="bucket")
        if address is None and not iam_auth:
            raise ConfigError("S3 is not configured", section="s3", option="address")
        if address is not None and not address.startswith(("http://", "https://")):
            raise ConfigError(
                "S3 address must start with http:// or https://",
                section="s3",
                option="address",
                value=address,
                source=where,
            )
        if (access is None) != (secret is None):
            missing = "secret_key" if secret is None else "access_key"
            raise ConfigError(
                "S3 needs both access_key and secret_key", section="s3", option=missing
            )
        return cls(
            address=address, access_key=access, secret_key=secret, bucket=bucket, iam_auth=iam_auth
        )


def _str_or_env(config: SettingsSource, option: str, env: str) -> tuple[str | None, str]:
    """Return ``(value, source)``: ``[s3] option``, else the non-empty variable ``env``."""
    if (value := _read(config, "s3", option)) is not None:
        return value, config.source("s3", option)
    return config.environ.get(env) or None, f"env {env}"


@dataclass(frozen=True, slots=True, kw_only=True)
class KartonSettings:
    """What the layers say about ``[karton]`` for one identity.

    None means "no layer sets it: the class attribute, else the declared default, decides"
    (:func:`~asynckarton._settings._policy.resolve_policy` does that merge).
    """

    identity: str | None = None
    persistent: bool | None = None
    task_timeout: float | None = None  # None: unlimited (also ``task_timeout = 0``)
    concurrency_limit: int | None = None
    debug: bool = False
    shutdown_grace: float = _default("karton", "shutdown_grace")
    max_retries: int | None = None
    retry_for: tuple[str, ...] = ()  # dotted exception names
    retry_backoff: float | None = None
    retry_backoff_max: float | None = None
    lease_timeout: float = _default("karton", "lease_timeout")

    @classmethod
    def from_config(cls, config: SettingsSource, identity: str | None = None) -> KartonSettings:
        """Validate ``[karton]`` as seen by ``identity`` (``[karton:<identity>]`` included).

        ``task_timeout = 0`` means unlimited and gives None.

        Raises:
            ConfigError: A value has the wrong type or is out of range.
        """
        name = _given(config, "karton", "identity")
        if name is not None and (not name or " " in name or "?" in name):
            raise _fail(config, "karton", "identity", "a non-empty name without spaces or '?'")
        entry = config.entry("karton", "retry_for", identity)
        return cls(
            identity=name,
            persistent=_given(config, "karton", "persistent", identity),
            task_timeout=_given(config, "karton", "task_timeout", identity) or None,
            concurrency_limit=_given(config, "karton", "concurrency_limit", identity),
            debug=_read(config, "karton", "debug", identity),
            shutdown_grace=_read(config, "karton", "shutdown_grace", identity),
            max_retries=_given(config, "karton", "max_retries", identity),
            retry_for=() if entry is None else parse_names(entry.value, "retry_for", entry.source),
            retry_backoff=_given(config, "karton", "retry_backoff", identity),
            retry_backoff_max=_given(config, "karton", "retry_backoff_max", identity),
            lease_timeout=_read(config, "karton", "lease_timeout", identity),
        )


def parse_names(raw: Any, option: str, source: str, section: str = "karton") -> tuple[str, ...]:
    """Parse ``a.B, c.D`` (or a list from ``load_from_dict``) into dotted names.

    Raises:
        ConfigError: Something other than comma-separated dotted names.
    """
    items = raw.split(",") if isinstance(raw, str) else raw
    ok = isinstance(items, list | tuple)
    names = tuple(str(item).strip() for item in items if str(item).strip()) if ok else ()
    if not ok or not all(part.isidentifier() for name in names for part in name.split(".")):
        raise ConfigError(
            "value must be a comma-separated list of dotted names",
            section=section,
            option=option,
            value=raw,
            source=source,
        )
    return names


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingSettings:
    """The ``[logging]`` section."""

    level: str = _default("logging", "level")
    enable_publish: bool = _default("logging", "enable_publish")

    @classmethod
    def from_config(cls, config: SettingsSource) -> LoggingSettings:
        """Validate ``[logging]``; the level becomes its upper-case name (``10`` -> DEBUG).

        Raises:
            ConfigError: The level is not a known logging level.
        """
        raw = config.get("logging", "level", _default("logging", "level"))
        name = str(raw).strip().upper()
        if isinstance(raw, int) or name.isdigit():
            name = logging.getLevelName(int(name))
        if name not in logging.getLevelNamesMapping():
            raise _fail(config, "logging", "level", "a level name such as DEBUG or INFO")
        return cls(level=name, enable_publish=_read(config, "logging", "enable_publish"))


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemSettings:
    """The ``[system]`` section (karton-system's knobs plus ours). Durations in seconds."""

    gc_interval: float = _default("system", "gc_interval")
    task_dispatched_timeout: float = _default("system", "task_dispatched_timeout")
    task_started_timeout: float = _default("system", "task_started_timeout")
    task_crashed_timeout: float = _default("system", "task_crashed_timeout")
    task_spawned_timeout: float = _default("system", "task_spawned_timeout")  # ours
    enable_gc: bool = _default("system", "enable_gc")
    enable_router: bool = _default("system", "enable_router")
    crash_started_tasks_on_timeout: bool = _default("system", "crash_started_tasks_on_timeout")
    enable_null_version_deletion: bool = _default("system", "enable_null_version_deletion")
    enable_task_tracking: bool = _default("system", "enable_task_tracking")
    task_tracking_ttl: int = _default("system", "task_tracking_ttl")
    setup_bucket: bool = _default("system", "setup_bucket")  # ours: ``--setup-bucket``

    @classmethod
    def from_config(cls, config: SettingsSource) -> SystemSettings:
        """Validate ``[system]``: durations are non-negative, the tracking TTL positive.

        Raises:
            ConfigError: A value has the wrong type or is out of range.
        """
        return cls(**{f.name: _read(config, "system", f.name) for f in fields(cls)})
