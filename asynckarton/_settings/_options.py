"""What can be configured: typed settings views, service options and command-line flags.

:class:`~asynckarton._settings._config.Config` knows *where* values come from; this module describes
*what* they are. The frozen ``*Settings`` dataclasses are the validated views that
``Config.redis_settings()`` and friends return (build them directly to skip ini files
altogether: secrets are left out of their repr).

A service declares its own settings once::

    options = [Option("smol", "how_smol", int, default=10, help="size limit for tasks")]

and gets them from ``[smol] how_smol`` in karton.ini, ``KARTON_SMOL_HOW_SMOL`` and
``--smol-how-smol``: :func:`add_options_to_parser` adds the flags, :func:`options_from_args`
copies the given ones into the config, :meth:`Option.read` returns the typed value.

The flag helpers map argparse results into the config the way Karton's ``config_from_args``
does: a flag that was not given is None and leaves the lower layers alone. The source recorded
for each value is ``argument --flag``.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from .._errors import ConfigError

if TYPE_CHECKING:
    from ._config import Config

__all__ = [
    "KartonSettings",
    "LoggingSettings",
    "Option",
    "RedisSettings",
    "S3Settings",
    "SystemSettings",
    "add_consumer_arguments",
    "add_options_to_parser",
    "add_system_arguments",
    "base_args_parser",
    "base_config_from_args",
    "consumer_config_from_args",
    "options_from_args",
    "system_config_from_args",
]

OptionType: TypeAlias = type[str] | type[int] | type[float] | type[bool]

# What Karton's KARTON_<SECTION>_<OPTION> mapping can reach (it lower-cases both parts).
_SECTION_RE = re.compile(r"[a-z0-9\-\.]+")
_NAME_RE = re.compile(r"[a-z0-9_]+")

# (argparse dest, flag, section, option)
_Mapping: TypeAlias = tuple[str, str, str, str]

_BASE_FLAGS: tuple[_Mapping, ...] = (
    ("identity", "--identity", "karton", "identity"),
    ("log_level", "--log-level", "logging", "level"),
    ("debug", "--debug", "karton", "debug"),
)
_CONSUMER_FLAGS: tuple[_Mapping, ...] = (
    ("persistent", "--non-persistent", "karton", "persistent"),
    ("task_timeout", "--task-timeout", "karton", "task_timeout"),
    ("concurrency_limit", "--concurrency-limit", "karton", "concurrency_limit"),
    ("shutdown_grace", "--grace", "karton", "shutdown_grace"),
    ("max_retries", "--max-retries", "karton", "max_retries"),
)
_SYSTEM_FLAGS: tuple[_Mapping, ...] = (
    ("setup_bucket", "--setup-bucket", "system", "setup_bucket"),
    ("enable_gc", "--disable-gc", "system", "enable_gc"),
    ("enable_router", "--disable-router", "system", "enable_router"),
    ("gc_interval", "--gc-interval", "system", "gc_interval"),
    ("task_dispatched_timeout", "--task-dispatched-timeout", "system", "task_dispatched_timeout"),
    ("task_started_timeout", "--task-started-timeout", "system", "task_started_timeout"),
    ("task_crashed_timeout", "--task-crashed-timeout", "system", "task_crashed_timeout"),
    ("task_spawned_timeout", "--task-spawned-timeout", "system", "task_spawned_timeout"),
    (
        "crash_started_tasks_on_timeout",
        "--crash-started-task-on-timeout",
        "system",
        "crash_started_tasks_on_timeout",
    ),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisSettings:
    """How to reach Redis. ``url`` (when set) replaces host, port, db and ssl."""

    host: str | None = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False
    url: str | None = field(default=None, repr=False)  # may embed a password
    socket_timeout: float | None = 30.0  # None: no timeout (``socket_timeout = 0``)

    @classmethod
    def from_config(cls, config: Config) -> RedisSettings:
        """Validate ``[redis]``; ``host`` is required unless ``url`` is set.

        Raises:
            ConfigError: Redis is not configured, or a value is invalid.
        """
        if not config.has_redis:
            raise ConfigError("Redis is not configured: set host or url", section="redis")
        port = config.getint("redis", "port", 6379)
        _check(config, 0 < port < 65536, "redis", "port", "between 1 and 65535")
        return cls(
            host=_str(config, "redis", "host"),
            port=port,
            db=_int(config, "redis", "db", 0),
            username=_str(config, "redis", "username") or None,  # empty means unset, as
            password=_str(config, "redis", "password") or None,  # in Karton
            ssl=config.getboolean("redis", "ssl", False),
            url=_str(config, "redis", "url") or None,
            socket_timeout=_float(config, "redis", "socket_timeout", 30.0) or None,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class S3Settings:
    """How to reach S3. ``address`` is None only with ``iam_auth`` (AWS itself)."""

    address: str | None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    bucket: str
    iam_auth: bool = False

    @classmethod
    def from_config(cls, config: Config) -> S3Settings:
        """Validate ``[s3]``; ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` and
        ``AWS_SECRET_ACCESS_KEY`` fill in missing options (as on Karton's master branch).

        Raises:
            ConfigError: No bucket, no endpoint (without ``iam_auth``), an address that is
                not an http(s) URL, or only one of the two keys.
        """
        iam_auth = config.getboolean("s3", "iam_auth", False)
        address, where = _str_or_env(config, "s3", "address", "AWS_ENDPOINT_URL")
        access, _ = _str_or_env(config, "s3", "access_key", "AWS_ACCESS_KEY_ID")
        secret, _ = _str_or_env(config, "s3", "secret_key", "AWS_SECRET_ACCESS_KEY")
        bucket = _str(config, "s3", "bucket")
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


@dataclass(frozen=True, slots=True, kw_only=True)
class KartonSettings:
    """The ``[karton]`` section. None means "not configured: the service decides"."""

    identity: str | None = None
    persistent: bool | None = None
    task_timeout: float | None = None  # None: unlimited (also ``task_timeout = 0``)
    concurrency_limit: int | None = None
    debug: bool = False
    shutdown_grace: float = 30.0
    max_retries: int | None = None
    retry_for: tuple[str, ...] = ()  # dotted exception names
    retry_backoff: float | None = None
    retry_backoff_max: float | None = None
    lease_timeout: float = 60.0

    @classmethod
    def from_config(cls, config: Config) -> KartonSettings:
        """Validate ``[karton]`` (``task_timeout = 0`` means unlimited and gives None).

        Raises:
            ConfigError: A value has the wrong type or is out of range.
        """
        identity = _str(config, "karton", "identity")
        if identity is not None:
            ok = bool(identity) and " " not in identity and "?" not in identity
            _check(config, ok, "karton", "identity", "a non-empty name without spaces or '?'")
        return cls(
            identity=identity,
            persistent=config.getboolean("karton", "persistent"),
            task_timeout=_opt_float(config, "karton", "task_timeout") or None,
            concurrency_limit=_opt_int(config, "karton", "concurrency_limit", minimum=1),
            debug=config.getboolean("karton", "debug", False),
            shutdown_grace=_float(config, "karton", "shutdown_grace", 30.0),
            max_retries=_opt_int(config, "karton", "max_retries"),
            retry_for=_dotted_names(config, "karton", "retry_for"),
            retry_backoff=_opt_float(config, "karton", "retry_backoff"),
            retry_backoff_max=_opt_float(config, "karton", "retry_backoff_max"),
            lease_timeout=_float(config, "karton", "lease_timeout", 60.0, positive=True),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingSettings:
    """The ``[logging]`` section."""

    level: str = "INFO"
    enable_publish: bool = True

    @classmethod
    def from_config(cls, config: Config) -> LoggingSettings:
        """Validate ``[logging]``; the level becomes its upper-case name (``10`` -> DEBUG).

        Raises:
            ConfigError: The level is not a known logging level.
        """
        raw = config.get("logging", "level", "INFO")
        name = str(raw).strip().upper()
        if isinstance(raw, int) or name.isdigit():
            name = logging.getLevelName(int(name))
        known = name in logging.getLevelNamesMapping()
        _check(config, known, "logging", "level", "a level name such as DEBUG or INFO")
        return cls(level=name, enable_publish=config.getboolean("logging", "enable_publish", True))


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemSettings:
    """The ``[system]`` section (karton-system's knobs plus ours). Durations in seconds."""

    gc_interval: float = 180.0
    task_dispatched_timeout: float = 86400.0
    task_started_timeout: float = 86400.0
    task_crashed_timeout: float = 259200.0
    task_spawned_timeout: float = 3600.0  # ours: requeue Spawned tasks nobody holds
    enable_gc: bool = True
    enable_router: bool = True
    crash_started_tasks_on_timeout: bool = False
    enable_null_version_deletion: bool = False
    enable_task_tracking: bool = True
    task_tracking_ttl: int = 2592000
    setup_bucket: bool = False  # ours: ``--setup-bucket`` / ``[system] setup_bucket``

    @classmethod
    def from_config(cls, config: Config) -> SystemSettings:
        """Validate ``[system]``: durations are non-negative, the tracking TTL positive.

        Raises:
            ConfigError: A value has the wrong type or is out of range.
        """
        defaults = cls()
        values: dict[str, Any] = {}
        for name in _SYSTEM_DURATIONS:
            values[name] = _float(config, "system", name, getattr(defaults, name))
        for name in _SYSTEM_SWITCHES:
            values[name] = config.getboolean("system", name, getattr(defaults, name))
        ttl = _int(config, "system", "task_tracking_ttl", defaults.task_tracking_ttl, minimum=1)
        return cls(task_tracking_ttl=ttl, **values)


_SYSTEM_DURATIONS = (
    "gc_interval",
    "task_dispatched_timeout",
    "task_started_timeout",
    "task_crashed_timeout",
    "task_spawned_timeout",
)
_SYSTEM_SWITCHES = (
    "enable_gc",
    "enable_router",
    "crash_started_tasks_on_timeout",
    "enable_null_version_deletion",
    "enable_task_tracking",
    "setup_bucket",
)


def _check(config: Config, ok: bool, section: str, option: str, rule: str) -> None:
    if not ok:
        raise ConfigError(
            f"value must be {rule}",
            section=section,
            option=option,
            value=config.get(section, option),
            source=config.source(section, option),
        )


def _str(config: Config, section: str, option: str) -> str | None:
    value = config.get(section, option)
    return None if value is None else str(value)


def _str_or_env(config: Config, section: str, option: str, env: str) -> tuple[str | None, str]:
    """Return ``(value, source)``: the option, else the non-empty variable ``env``."""
    if (value := _str(config, section, option)) is not None:
        return value, config.source(section, option)
    return config.environ.get(env) or None, f"env {env}"


def _opt_int(config: Config, section: str, option: str, minimum: int = 0) -> int | None:
    value = config.getint(section, option)
    _check(config, value is None or value >= minimum, section, option, f"at least {minimum}")
    return value


def _int(config: Config, section: str, option: str, default: int, minimum: int = 0) -> int:
    value = _opt_int(config, section, option, minimum)
    return default if value is None else value


def _opt_float(
    config: Config, section: str, option: str, *, positive: bool = False
) -> float | None:
    value = config.getfloat(section, option)
    if value is not None:
        ok = value > 0 if positive else value >= 0
        _check(config, ok, section, option, "positive" if positive else "non-negative")
    return value


def _float(
    config: Config, section: str, option: str, default: float, *, positive: bool = False
) -> float:
    value = _opt_float(config, section, option, positive=positive)
    return default if value is None else value


def _dotted_names(config: Config, section: str, option: str) -> tuple[str, ...]:
    """Parse ``a.B, c.D`` (or a list from ``load_from_dict``) into dotted names."""
    raw = config.get(section, option)
    if raw is None:
        return ()
    items = raw.split(",") if isinstance(raw, str) else raw
    ok = isinstance(items, list | tuple)
    names = tuple(str(item).strip() for item in items if str(item).strip()) if ok else ()
    ok = ok and all(part.isidentifier() for name in names for part in name.split("."))
    _check(config, ok, section, option, "a comma-separated list of dotted names")
    return names


@dataclass(frozen=True, slots=True)
class Option:
    """One service setting, readable from ini, environment and command line.

    Attributes:
        section: The ini section; lower-case letters, digits, ``-`` and ``.`` only (no
            ``_``: Karton's environment mapping splits the section at the first ``_``).
        name: The option; lower-case letters, digits and ``_``.
        type: ``str``, ``int``, ``float`` or ``bool``.
        default: Returned by :meth:`read` when no layer sets the option.
        help: The ``--help`` text.

    Raises:
        ConfigError: The section or name cannot be reached through the environment.
        TypeError: ``type`` is not one of the four supported types.
    """

    section: str
    name: str
    type: OptionType = str
    default: Any = None
    help: str = ""

    def __post_init__(self) -> None:
        if not _SECTION_RE.fullmatch(self.section):
            raise ConfigError(
                "option section must match [a-z0-9.-]+", section=self.section, option=self.name
            )
        if not _NAME_RE.fullmatch(self.name):
            raise ConfigError(
                "option name must match [a-z0-9_]+", section=self.section, option=self.name
            )
        if self.type not in (str, int, float, bool):
            raise TypeError(f"unsupported option type {self.type!r}")

    @property
    def env_var(self) -> str:
        """The environment variable, e.g. ``KARTON_SMOL_HOW_SMOL``."""
        return f"KARTON_{self.section}_{self.name}".upper()

    @property
    def cli_flag(self) -> str:
        """The command-line flag, e.g. ``--smol-how-smol`` (``_`` and ``.`` become ``-``)."""
        return "--" + re.sub(r"[_.]", "-", f"{self.section}-{self.name}")

    @property
    def dest(self) -> str:
        """The :class:`argparse.Namespace` attribute, e.g. ``smol_how_smol``."""
        return re.sub(r"[-.]", "_", f"{self.section}_{self.name}")

    def read(self, config: Config) -> Any:
        """Return the typed value from ``config``, or :attr:`default` when unset.

        Raises:
            ConfigError: The value cannot be converted (names its source).
        """
        value: Any
        if self.type is bool:
            value = config.getboolean(self.section, self.name)
        elif self.type is int:
            value = config.getint(self.section, self.name)
        elif self.type is float:
            value = config.getfloat(self.section, self.name)
        else:
            value = config.get(self.section, self.name)
            value = None if value is None else str(value)
        return self.default if value is None else value


def add_options_to_parser(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Add one flag per option (``--x`` / ``--no-x`` for bools); unset flags stay None."""
    for option in options:
        where = f"env {option.env_var}, ini [{option.section}] {option.name}"
        text = f"{option.help} ({where}, default {option.default!r})".strip().replace("%", "%%")
        if option.type is bool:
            parser.add_argument(
                option.cli_flag,
                dest=option.dest,
                default=None,
                help=text,
                action=argparse.BooleanOptionalAction,
            )
        else:
            parser.add_argument(
                option.cli_flag,
                dest=option.dest,
                default=None,
                help=text,
                type=option.type,
                metavar=option.name.upper(),
            )


def options_from_args(config: Config, options: Sequence[Option], args: argparse.Namespace) -> None:
    """Copy the flags that were given on the command line into ``config``."""
    for option in options:
        value = getattr(args, option.dest, None)
        if value is not None:
            flag = option.cli_flag
            if value is False and option.type is bool:
                flag = "--no-" + flag[2:]
            config.set(option.section, option.name, value, source=f"argument {flag}")


def _apply(config: Config, args: argparse.Namespace, flags: Sequence[_Mapping]) -> None:
    for dest, flag, section, option in flags:
        value = getattr(args, dest, None)
        if value is not None:
            config.set(section, option, value, source=f"argument {flag}")


def base_args_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Return a parser with Karton's base flags (the caller adds ``--version``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config-file", help="ini file read after all the others (it must exist)")
    parser.add_argument("--identity", help="service identity ([karton] identity)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING... ([logging] level)")
    parser.add_argument(
        "--debug",
        action="store_true",
        default=None,
        help="development mode: throw-away identity and queue, no log publishing",
    )
    return parser


def base_config_from_args(config: Config, args: argparse.Namespace) -> None:
    """Map ``--identity``, ``--log-level`` and ``--debug`` into ``config``."""
    _apply(config, args, _BASE_FLAGS)


def add_consumer_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the consumer flags: Karton's two plus concurrency, grace and retries."""
    parser.add_argument(
        "--non-persistent",
        dest="persistent",
        action="store_const",
        const=False,
        default=None,
        help="drop the queue when the service goes away",
    )
    parser.add_argument(
        "--task-timeout", type=float, help="seconds a handler may run (0: no limit)"
    )
    parser.add_argument("--concurrency-limit", type=int, help="tasks handled at once")
    parser.add_argument(
        "--grace",
        dest="shutdown_grace",
        type=float,
        help="seconds running tasks get to finish on shutdown",
    )
    parser.add_argument("--max-retries", type=int, help="attempts after the first failure")


def consumer_config_from_args(config: Config, args: argparse.Namespace) -> None:
    """Map the consumer flags into ``[karton]``."""
    _apply(config, args, _CONSUMER_FLAGS)


def add_system_arguments(parser: argparse.ArgumentParser) -> None:
    """Add karton-system's flags (``--crash-started-task-on-timeout`` actually works)."""
    parser.add_argument(
        "--setup-bucket",
        action="store_true",
        default=None,
        help="create the S3 bucket when it does not exist",
    )
    for flag, dest, text in (
        ("--disable-gc", "enable_gc", "leave garbage collection to another instance"),
        ("--disable-router", "enable_router", "leave routing to another instance"),
    ):
        parser.add_argument(
            flag, dest=dest, action="store_const", const=False, default=None, help=text
        )
    for flag, text in (
        ("--gc-interval", "seconds between garbage collections"),
        ("--task-dispatched-timeout", "seconds before a Dispatched task is dropped"),
        ("--task-started-timeout", "seconds before a Started task is given up"),
        ("--task-crashed-timeout", "seconds a Crashed task is kept"),
        ("--task-spawned-timeout", "seconds before an orphaned Spawned task is requeued"),
    ):
        parser.add_argument(flag, type=float, help=text)
    parser.add_argument(
        "--crash-started-task-on-timeout",
        dest="crash_started_tasks_on_timeout",
        action="store_const",
        const=True,
        default=None,
        help="mark timed-out Started tasks Crashed instead of deleting them",
    )


def system_config_from_args(config: Config, args: argparse.Namespace) -> None:
    """Map the system flags into ``[system]``."""
    _apply(config, args, _SYSTEM_FLAGS)
