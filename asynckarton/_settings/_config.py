"""Karton-compatible configuration that remembers where every value came from.

The one precedence rule, lowest first; a later layer beats every earlier one:

0. the declared default, then the service's class attribute (code),
1. ``/etc/karton/karton.ini``, ``~/.config/karton/karton.ini``, ``./karton.ini``
   (missing ones are skipped; ``search_paths=`` replaces this list),
2. the file named by ``$KARTON_CONFIG_FILE`` (must exist),
3. the explicit ``path`` argument, i.e. ``--config-file`` / ``--config-path`` (must exist),
4. ``KARTON_<SECTION>_<OPTION>`` environment variables,
5. command-line flags, ``--set``, ``load_from_dict`` and ``set``.

The one exception is Karton's own: a class ``task_timeout`` that is not None beats every
layer (karton-core 5.9.1 reads ``[karton] task_timeout`` only when the class leaves it None).

``[karton]`` options can be set for one identity in every layer: ``[karton:<identity>]``
in an ini file, ``KARTON_KARTON__<IDENTITY>__<OPTION>`` in the environment
(:func:`~asynckarton._settings._declare.mangle_identity`), ``--set <identity>:karton.<option>=v``
on the command line. Within one layer the identity's value beats the generic one; across
layers the later layer wins, whichever of the two it is (:meth:`Config.entry`).

All files go through one :class:`configparser.ConfigParser`, exactly like Karton, so
``[DEFAULT]`` keys leak into every section (``DEFAULT`` itself is not listed as a section)
and ``%(name)s`` interpolation works (write a literal ``%`` as ``%%``). Environment values are
taken verbatim. Construction reads files and takes a snapshot of the environment:
it is synchronous on purpose and meant to happen once, before the event loop starts.

Unlike Karton, a missing ``[redis]`` or ``[s3]`` section is not an error: with neither of
them the configuration is :attr:`Config.embedded` and asynckarton runs in-process.
"""

from __future__ import annotations

import configparser
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar, overload

from .._errors import ConfigError
from ._builtin import builtin
from ._declare import PER_IDENTITY_SECTION, Option, demangle_identity
from ._options import (
    KartonSettings,
    LoggingSettings,
    RedisSettings,
    S3Settings,
    SystemSettings,
    has_redis,
)
from ._values import RANK_ARGUMENTS, RANK_ENV, RANK_FILES, Entry, mask, to_bool, to_float, to_int

__all__ = ["DEFAULT_SEARCH_PATHS", "DEFAULT_SOURCE", "Config", "Option", "identity_section"]

logger = logging.getLogger("asynckarton.config")

DEFAULT_SEARCH_PATHS: tuple[str, ...] = (
    "/etc/karton/karton.ini",
    "~/.config/karton/karton.ini",
    "./karton.ini",
)
DEFAULT_SOURCE = "default"

# Karton's own mapping: the section stops at the first underscore, the option takes the rest.
_ENV_RE = re.compile(r"KARTON_([A-Z0-9\-\.]+)_([A-Z0-9_]+)")
# Ours, checked first: KARTON_KARTON__<mangled identity>__<OPTION>.
_IDENTITY_ENV_PREFIX = f"KARTON_{PER_IDENTITY_SECTION.upper()}__"
_OPTION_RE = re.compile(r"[A-Z0-9][A-Z0-9_]*")

_T = TypeVar("_T")


def identity_section(identity: str) -> str:
    """The ini section of one identity's ``[karton]`` options: ``karton:<identity>``."""
    return f"{PER_IDENTITY_SECTION}:{identity}"


class Config:
    """Layered Karton configuration with per-value provenance.

    Construction reads the ini files synchronously and snapshots the environment: build the
    config once, before the event loop runs (or in a worker thread).

    Args:
        path: An extra ini file read last (``--config-file``). It must exist.
        environ: The environment to read (default: a snapshot of ``os.environ``).
        search_paths: Replaces the three default file locations (``~`` is expanded).

    Raises:
        ConfigError: A required file is missing, a file cannot be parsed or interpolated.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        search_paths: Sequence[str] | None = None,
    ) -> None:
        self._environ: dict[str, str] = dict(os.environ if environ is None else environ)
        self._data: dict[str, dict[str, Entry]] = {}
        self._inherited: set[tuple[str, str]] = set()  # [DEFAULT] keys leaked into a section
        self._load_files(self._file_layers(path, search_paths))
        self._load_env()
        if self.has_section("minio") and not self.has_section("s3"):
            self._map_minio_to_s3()

    def __repr__(self) -> str:
        return f"<Config sections={self.sections()!r}>"

    # -- loading ------------------------------------------------------------------------

    def _file_layers(
        self, path: str | os.PathLike[str] | None, search_paths: Sequence[str] | None
    ) -> list[tuple[str, str | None]]:
        """Return ``(file, who requires it)`` pairs; None marks an optional file."""
        paths = DEFAULT_SEARCH_PATHS if search_paths is None else search_paths
        layers: list[tuple[str, str | None]] = [(os.path.expanduser(p), None) for p in paths]
        if env_path := self._environ.get("KARTON_CONFIG_FILE"):
            layers.append((env_path, "env KARTON_CONFIG_FILE"))
        if path is not None:
            layers.append((os.fspath(path), "path argument"))
        return layers

    def _load_files(self, layers: list[tuple[str, str | None]]) -> None:
        parser = configparser.ConfigParser()
        lines: dict[tuple[str, str], tuple[str, int]] = {}
        for rank, (path, required_by) in enumerate(layers, start=RANK_FILES):
            text = _read_text(path, required_by)
            if text is None:
                continue
            where = os.path.abspath(path)
            try:
                parser.read_string(text, source=where)
            except configparser.Error as exc:
                raise ConfigError(f"cannot parse configuration file: {exc}", source=where) from None
            for key, line in _scan_lines(text, where, parser.optionxform).items():
                lines[key] = (line, rank)
        for section in parser.sections():
            for option in parser.options(section):
                found = lines.get((section, option))
                inherited = found is None
                if found is None:
                    found = lines.get((parser.default_section, option), ("?", RANK_FILES))
                try:
                    value = parser.get(section, option)
                except configparser.InterpolationError as exc:
                    raise ConfigError(
                        f"cannot interpolate value: {exc.message}",
                        section=section,
                        option=option,
                        source=found[0],
                    ) from None
                self._put(section, option, value, found[0], found[1])
                if inherited:
                    self._inherited.add((section, option))

    def _load_env(self) -> None:
        for name, value in self._environ.items():
            if name.startswith(_IDENTITY_ENV_PREFIX) and "__" in name[len(_IDENTITY_ENV_PREFIX) :]:
                mangled, _, option = name[len(_IDENTITY_ENV_PREFIX) :].rpartition("__")
                try:
                    identity = demangle_identity(mangled)
                except ValueError as exc:
                    raise ConfigError(
                        f"not a per-identity variable: {exc}", source=f"env {name}"
                    ) from None
                if not identity or not _OPTION_RE.fullmatch(option):
                    raise ConfigError(
                        "a per-identity variable is KARTON_KARTON__<IDENTITY>__<OPTION>",
                        source=f"env {name}",
                    )
                section = identity_section(identity)
                self._put(section, option.lower(), value, f"env {name}", RANK_ENV)
            elif match := _ENV_RE.fullmatch(name):
                self._put(match[1].lower(), match[2].lower(), value, f"env {name}", RANK_ENV)

    def _map_minio_to_s3(self) -> None:
        """Karton < 5 used ``[minio]`` with a bare ``address`` and a ``secure`` flag."""
        logger.warning("the [minio] configuration section is deprecated: rename it to [s3]")
        s3 = dict(self._data["minio"])
        address = s3.get("address")
        if address is not None and not str(address.value).startswith(("http://", "https://")):
            scheme = "https://" if self.getboolean("minio", "secure", True) else "http://"
            s3["address"] = Entry(scheme + str(address.value), address.source, address.rank)
        self._data["s3"] = s3

    def _put(
        self, section: str, option: str, value: Any, source: str, rank: int = RANK_ARGUMENTS
    ) -> None:
        self._data.setdefault(section, {})[option] = Entry(value, source, rank)
        self._inherited.discard((section, option))

    # -- the precedence rule --------------------------------------------------------------

    def entry(self, section: str, option: str, identity: str | None = None) -> Entry | None:
        """The value of ``[section] option`` that wins for ``identity`` (None: unset).

        For a ``[karton]`` option and an identity, the identity's value (from
        ``[karton:<identity>]``, its variable or ``--set <identity>:...``) competes with the
        generic one: the higher layer wins, and within one layer the identity's value.
        """
        generic = self._data.get(section, {}).get(option)
        if identity is None or section != PER_IDENTITY_SECTION:
            return generic
        specific = self._data.get(identity_section(identity), {}).get(option)
        if specific is None or (generic is not None and generic.rank > specific.rank):
            return generic
        return specific

    def entries(self) -> Iterator[tuple[str, str, Entry, bool]]:
        """Every stored value: ``(section, option, entry, inherited from [DEFAULT])``."""
        for section, options in self._data.items():
            for option, entry in options.items():
                yield section, option, entry, (section, option) in self._inherited

    # -- Karton's accessors -------------------------------------------------------------

    def sections(self) -> list[str]:
        """Return the names of all sections, in the order they were first seen."""
        return list(self._data)

    def has_section(self, section: str) -> bool:
        """Return True when ``section`` holds at least one value."""
        return section in self._data

    def has_option(self, section: str, option: str) -> bool:
        """Return True when ``[section] option`` is set by any layer."""
        return option in self._data.get(section, {})

    def get(self, section: str, option: str, fallback: Any = None) -> Any:
        """Return the raw value: a str from files and env, any type from ``load_from_dict``."""
        entry = self._data.get(section, {}).get(option)
        return fallback if entry is None else entry.value

    def source(self, section: str, option: str) -> str:
        """Return where the value came from (``/x/karton.ini:3``, ``env KARTON_...``...).

        Returns ``"default"`` when the option is not set at all.
        """
        entry = self._data.get(section, {}).get(option)
        return DEFAULT_SOURCE if entry is None else entry.source

    def set(self, section: str, option: str, value: Any, source: str = "set") -> None:
        """Set ``[section] option`` to ``value``, overriding every other layer."""
        self._put(section, option, value, source)

    def append_to_list(self, section: str, option: str, value: Any, source: str = "set") -> None:
        """Append ``value`` to the list stored in ``[section] option`` (created if missing).

        Raises:
            ConfigError: The option holds something other than a list.
        """
        current = self.get(section, option)
        if current is None:
            current = []
        elif not isinstance(current, list):
            raise ConfigError(
                "expected a list",
                section=section,
                option=option,
                value=current,
                source=self.source(section, option),
            )
        self._put(section, option, [*current, value], source)

    def load_from_dict(
        self, data: Mapping[str, Mapping[str, Any]], source: str = "arguments"
    ) -> None:
        """Set every value of ``{section: {option: value}}``; None values are skipped."""
        for section, options in data.items():
            for option, value in options.items():
                if value is not None:
                    self._put(section, option, value, source)

    def __getitem__(self, section: str) -> dict[str, Any]:
        """Return a copy of one section as ``{option: value}`` (KeyError if missing)."""
        return {option: entry.value for option, entry in self._data[section].items()}

    @overload
    def getint(self, section: str, option: str, fallback: int) -> int: ...
    @overload
    def getint(self, section: str, option: str, fallback: None = None) -> int | None: ...
    def getint(self, section: str, option: str, fallback: int | None = None) -> int | None:
        """Return the value as an int, or ``fallback`` when unset.

        Raises:
            ConfigError: The value is not an integer (names the option, value and source).
        """
        return self._typed(section, option, fallback, to_int, "integer")

    @overload
    def getfloat(self, section: str, option: str, fallback: float) -> float: ...
    @overload
    def getfloat(self, section: str, option: str, fallback: None = None) -> float | None: ...
    def getfloat(self, section: str, option: str, fallback: float | None = None) -> float | None:
        """Return the value as a finite float, or ``fallback`` when unset.

        Raises:
            ConfigError: The value is not a finite number.
        """
        return self._typed(section, option, fallback, to_float, "number")

    @overload
    def getboolean(self, section: str, option: str, fallback: bool) -> bool: ...
    @overload
    def getboolean(self, section: str, option: str, fallback: None = None) -> bool | None: ...
    def getboolean(self, section: str, option: str, fallback: bool | None = None) -> bool | None:
        """Return the value as a bool (``1/yes/true/on``, ``0/no/false/off``, any case).

        Raises:
            ConfigError: The value is none of those words.
        """
        return self._typed(section, option, fallback, to_bool, "boolean")

    def _typed(
        self,
        section: str,
        option: str,
        fallback: _T | None,
        convert: Callable[[object], _T],
        what: str,
    ) -> _T | None:
        entry = self._data.get(section, {}).get(option)
        if entry is None or entry.value is None:
            return fallback
        try:
            return convert(entry.value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"invalid {what}",
                section=section,
                option=option,
                value=entry.value,
                source=entry.source,
            ) from None

    def explain(self) -> list[str]:
        """Return one ``[section] option = value  # source`` line per value, secrets masked."""
        lines = []
        for section, option, entry, _ in self.entries():
            declared = builtin(section.partition(":")[0], option)
            value = mask(option, entry.value, None if declared is None else declared.secret)
            lines.append(f"[{section}] {option} = {value}  # {entry.source}")
        return lines

    # -- typed views --------------------------------------------------------------------

    @property
    def has_redis(self) -> bool:
        """True when ``[redis] host``, ``url`` or ``sentinel_master`` is set."""
        return has_redis(self)

    @property
    def has_s3(self) -> bool:
        """True when an S3 endpoint is known.

        That is ``[s3] address``, or an ``[s3]`` section together with ``$AWS_ENDPOINT_URL``
        or ``iam_auth`` (plain AWS).
        """
        if self._str("s3", "address"):
            return True
        return self.has_section("s3") and bool(
            self._environ.get("AWS_ENDPOINT_URL") or self.getboolean("s3", "iam_auth", False)
        )

    @property
    def embedded(self) -> bool:
        """Whether to run in-process (fakeredis and a local directory).

        ``[asynckarton] embedded`` decides when set; otherwise True exactly when neither
        Redis nor S3 is configured. A half configuration is not embedded: asking for the
        missing half raises :class:`ConfigError`.
        """
        explicit = self.getboolean("asynckarton", "embedded")
        if explicit is not None:
            return explicit
        return not self.has_redis and not self.has_s3

    @property
    def data_dir(self) -> Path:
        """Where embedded mode keeps its data.

        ``[asynckarton] data_dir``, else ``$XDG_DATA_HOME/asynckarton``, else
        ``~/.local/share/asynckarton`` (``HOME`` is taken from :attr:`environ`).
        """
        home = Path(self._environ.get("HOME") or Path.home())
        configured = self._str("asynckarton", "data_dir")
        if configured:
            if configured == "~" or configured.startswith("~/"):
                return home / configured[2:]
            return Path(os.path.expanduser(configured))
        xdg = self._environ.get("XDG_DATA_HOME")
        base = Path(xdg) if xdg and os.path.isabs(xdg) else home / ".local" / "share"
        return base / "asynckarton"

    @property
    def environ(self) -> Mapping[str, str]:
        """The environment snapshot taken at construction (read-only)."""
        return MappingProxyType(self._environ)

    def redis_settings(self) -> RedisSettings:
        """Return the validated ``[redis]`` section (see :meth:`RedisSettings.from_config`)."""
        return RedisSettings.from_config(self)

    def s3_settings(self) -> S3Settings:
        """Return the validated ``[s3]`` section (see :meth:`S3Settings.from_config`)."""
        return S3Settings.from_config(self)

    def karton_settings(self, identity: str | None = None) -> KartonSettings:
        """Return ``[karton]`` as ``identity`` sees it (see :meth:`KartonSettings.from_config`)."""
        return KartonSettings.from_config(self, identity)

    def logging_settings(self) -> LoggingSettings:
        """Return the validated ``[logging]`` section."""
        return LoggingSettings.from_config(self)

    def signaling_status(self) -> bool:
        """Return ``[signaling] status``: whether to send ``karton.signaling.status`` tasks."""
        return bool(builtin("signaling", "status").read(self))  # type: ignore[union-attr]

    def system_settings(self) -> SystemSettings:
        """Return the validated ``[system]`` section (see :meth:`SystemSettings.from_config`)."""
        return SystemSettings.from_config(self)

    def _str(self, section: str, option: str) -> str | None:
        value = self.get(section, option)
        return None if value is None else str(value)


def _read_text(path: str, required_by: str | None) -> str | None:
    """Read one ini file; a missing optional file gives None, a missing required one fails."""
    if not os.path.isfile(path):
        if required_by is None:
            return None
        raise ConfigError("configuration file not found", value=path, source=required_by)
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"configuration file is not UTF-8: {exc}", source=path) from None
    except OSError as exc:
        if required_by is not None:
            raise ConfigError(f"cannot read configuration file: {exc}", source=path) from None
        logger.warning("skipping unreadable configuration file %s: %s", path, exc)
        return None


def _scan_lines(
    text: str, where: str, optionxform: Callable[[str], str]
) -> dict[tuple[str, str], str]:
    """Map ``(section, option)`` to ``file:line`` for one file configparser accepted."""
    found: dict[tuple[str, str], str] = {}
    section: str | None = None
    in_value = False
    for lineno, raw in enumerate(text.split("\n"), start=1):
        stripped = raw.strip()
        if not stripped or stripped[0] in "#;" or (in_value and raw[0].isspace()):
            continue
        if header := configparser.ConfigParser.SECTCRE.match(stripped):
            section, in_value = header.group("header"), False
        elif (option := configparser.ConfigParser.OPTCRE.match(stripped)) and section:
            found[(section, optionxform(option.group("option").rstrip()))] = f"{where}:{lineno}"
            in_value = True
    return found
