"""A consumer's resolved policy: one frozen value, its sources, and a stable JSON form.

:func:`resolve_policy` applies the one precedence rule to every ``[karton]`` policy of one
consumer class and identity: the declared default, then the class attribute, then the
layers of :class:`~asynckarton._settings._config.Config` (identity-specific values
included). Karton's exception is kept because karton-core 5.9.1 behaves so
(``karton/core/karton.py``: ``if self.task_timeout is None: self.task_timeout =
config.getint("karton", "task_timeout")``): a class ``task_timeout`` that is not None beats
every layer.

:meth:`ConsumerPolicy.to_json` / :meth:`ConsumerPolicy.from_json` are pynenc's
``options_to_json`` / ``options_from_json``: sorted keys, exceptions as dotted names.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from .._errors import ConfigError
from ._builtin import BUILTIN
from ._options import parse_names
from ._values import SettingsSource

__all__ = ["POLICY_OPTIONS", "ConsumerPolicy", "exception_name", "load_exception", "resolve_policy"]

#: The ``[karton]`` options a consumer's policy is made of (each may be a class attribute).
POLICY_OPTIONS = (
    "persistent",
    "concurrency_limit",
    "prefetch",
    "task_timeout",
    "max_retries",
    "retry_for",
    "retry_backoff",
    "retry_backoff_max",
    "lease_timeout",
    "shutdown_grace",
    "call_result_cache",
    "call_result_cache_ttl",
    "disable_cache_args",
)
_LIBRARY = "asynckarton."  # class attributes defined here are defaults, not "code" values


def _default(name: str) -> Any:
    return BUILTIN["karton"][name].default


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerPolicy:
    """The policy one consumer runs with (``task_timeout`` None: no limit).

    ``sources`` maps each field to where its value came from (not part of equality or JSON).
    """

    persistent: bool = _default("persistent")
    concurrency_limit: int = _default("concurrency_limit")
    prefetch: int = 0  # derived from concurrency_limit when unset
    task_timeout: float | None = _default("task_timeout") or None
    max_retries: int = _default("max_retries")
    retry_for: tuple[type[BaseException], ...] = (Exception,)  # declared as "unset"
    retry_backoff: float = _default("retry_backoff")
    retry_backoff_max: float = _default("retry_backoff_max")
    lease_timeout: float = _default("lease_timeout")
    shutdown_grace: float = _default("shutdown_grace")
    call_result_cache: bool = _default("call_result_cache")
    call_result_cache_ttl: float = _default("call_result_cache_ttl")
    disable_cache_args: tuple[str, ...] = ()  # "headers.X" / "payload.X"; ("*",): no cache
    sources: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    def to_json(self) -> str:
        """The stable JSON form: sorted keys, exceptions as dotted names, no sources."""
        data: dict[str, Any] = {}
        for item in fields(self):
            if item.name != "sources":
                data[item.name] = getattr(self, item.name)
        data["retry_for"] = [exception_name(exc) for exc in self.retry_for]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ConsumerPolicy:
        """Invert :meth:`to_json` (unknown keys are ignored: newer writers may add some).

        Raises:
            ConfigError: Not a JSON object, or an exception name that does not import.
        """
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"policy is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("policy JSON must be an object")
        known = {item.name for item in fields(cls)} - {"sources"}
        values = {key: value for key, value in data.items() if key in known}
        if "retry_for" in values:
            names = values["retry_for"]
            values["retry_for"] = tuple(
                load_exception(n, "retry_for", "policy JSON") for n in names
            )
        if "disable_cache_args" in values:
            values["disable_cache_args"] = tuple(values["disable_cache_args"])
        return cls(**values)


def exception_name(exc: type[BaseException]) -> str:
    """``module.Qualname`` of an exception class (``builtins.ValueError``)."""
    return f"{exc.__module__}.{exc.__qualname__}"


def load_exception(dotted: str, option: str, source: str) -> type[BaseException]:
    """Import the exception class ``dotted`` (``ValueError`` means ``builtins.ValueError``).

    Raises:
        ConfigError: It does not import or is no exception class; names ``[karton] option``
            and ``source``.
    """
    module, _, name = dotted.strip().rpartition(".")
    value: Any = None
    problem = ""
    try:
        value = importlib.import_module(module or "builtins")
        for part in name.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as exc:
        problem = f"cannot import exception {dotted!r}: {exc}"
    if not problem and not (isinstance(value, type) and issubclass(value, BaseException)):
        problem = f"{dotted!r} is not an exception class"
    if problem:
        raise ConfigError(problem, section="karton", option=option, source=source)
    return value  # type: ignore[no-any-return]


def _class_value(cls: type, name: str) -> tuple[Any, str] | None:
    """The class attribute ``name`` when a subclass sets it (not None).

    The value of the asynckarton class that introduces the attribute (``Consumer``) is the
    default, not code; every class below it that sets the attribute is code.
    """
    owners = [klass for klass in cls.__mro__ if name in vars(klass)]
    if not owners:
        return None
    klass, value = owners[0], vars(owners[0])[name]
    if value is None or (len(owners) == 1 and klass.__module__.startswith(_LIBRARY)):
        return None
    return value, f"class {klass.__module__}.{klass.__qualname__}.{name}"


def resolve_policy(
    config: SettingsSource, cls: type, identity: str | None, *, debug: bool = False
) -> ConsumerPolicy:
    """Resolve every policy option of consumer class ``cls`` running as ``identity``.

    Raises:
        ConfigError: A value is invalid or a ``retry_for`` name does not import (the error
            names the option and the layer it came from).
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in POLICY_OPTIONS:
        option = BUILTIN["karton"][name]
        value: Any = option.default
        source = "default"
        if (code := _class_value(cls, name)) is not None:
            value, source = code
        entry = option.lookup(config, identity)
        karton_exception = name == "task_timeout" and code is not None
        if entry is not None and entry.value is not None and not karton_exception:
            source = entry.source
            if name == "retry_for":
                value = tuple(
                    load_exception(dotted, name, source)
                    for dotted in parse_names(entry.value, name, source)
                )
            elif name == "disable_cache_args":  # "*" alone: nothing is cached
                star = isinstance(entry.value, str) and entry.value.strip() == "*"
                value = ("*",) if star else parse_names(entry.value, name, source)
            else:
                value = option.convert(entry.value, source)
        elif karton_exception:
            source += " (a class task_timeout beats every layer, as in karton-core 5.9.1)"
        elif name == "retry_for" and code is None:
            value = (Exception,)
        values[name] = value
        sources[name] = source
    if values["prefetch"] is None:  # not set anywhere: keep the handlers busy
        limit = values["concurrency_limit"]
        values["prefetch"] = limit if limit > 1 else 0
        sources["prefetch"] = "derived from concurrency_limit"
    values["task_timeout"] = values["task_timeout"] or None
    values["retry_for"] = tuple(values["retry_for"])
    values["disable_cache_args"] = tuple(values["disable_cache_args"] or ())
    values["call_result_cache"] = bool(values["call_result_cache"])
    if debug and values["persistent"]:
        values["persistent"] = False
        sources["persistent"] += " (off in debug mode)"
    values["persistent"] = bool(values["persistent"])
    return ConsumerPolicy(**values, sources=MappingProxyType(sources))
