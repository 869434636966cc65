"""From ``module:Class`` targets and command-line words to configured services.

``asynckarton run`` builds every service through the service's own Karton hooks
(``args_parser()`` / ``config_from_args()``), so options a service declares and
argparse flags it adds keep working when several services share one process.  Each
service parses the extra arguments with ``parse_known_args`` and ignores the flags of
the others; a flag nobody accepts is an error.  Nothing here touches signals or logging
(the CLI owns those).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .._errors import ConfigError
from .._services._service import ServiceBase
from .._settings._config import Config
from ..system import SystemService

__all__ = ["CommonOptions", "build_services", "load_service_class", "split_targets"]


@dataclass(frozen=True, slots=True)
class CommonOptions:
    """Options ``asynckarton run`` applies to every service it starts.

    Each field is also an argparse destination of Karton's flags (``--grace`` is stored
    as ``shutdown_grace``); None or False means "not given: the service decides".
    """

    config_file: str | None = None
    identity: str | None = None
    log_level: str | None = None
    debug: bool = False
    shutdown_grace: float | None = None
    concurrency_limit: int | None = None
    task_timeout: float | None = None
    max_retries: int | None = None
    embedded: bool = False


_NOT_FLAGS = frozenset({"embedded"})  # ours: applied to the config, not through argparse


def split_targets(words: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``run``'s words: the leading ``module:Class`` targets, then service arguments."""
    for index, word in enumerate(words):
        if word.startswith("-"):
            return list(words[:index]), list(words[index:])
    return list(words), []


def _import_file(path: Path) -> Any:
    name = f"_asynckarton_target_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {str(path)!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # so the file can import its siblings
    spec.loader.exec_module(module)
    return module


def load_service_class(target: str) -> type[ServiceBase]:
    """Import ``package.module:Class`` or ``path/to/file.py:Class``.

    Raises:
        ConfigError: the target is malformed, cannot be imported, or is not a runnable
            service class (a Consumer, Karton or SystemService subclass).
    """
    module_name, _, class_name = target.rpartition(":")
    if not module_name or not class_name:
        raise ConfigError(f"target {target!r} must look like 'package.module:Class'")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"target {target!r}: no such file {module_name!r}")
            module = _import_file(path.resolve())
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, ServiceBase)):
        raise ConfigError(f"target {target!r} is not an asynckarton service class")
    if not callable(getattr(cls, "run", None)) or not callable(getattr(cls, "stop", None)):
        raise ConfigError(f"target {target!r} cannot run on its own (no run()/stop())")
    return cls


def _build_one(
    cls: type[ServiceBase], extras: Sequence[str], common: CommonOptions
) -> tuple[ServiceBase, list[str]]:
    """Build one service from its parser; return it and the words it did not know."""
    parser = cls.args_parser()
    args, unknown = parser.parse_known_args(list(extras))
    _apply_common(args, common)
    config = Config(getattr(args, "config_file", None))
    cls.config_from_args(config, args)
    if common.embedded:
        config.set("asynckarton", "embedded", "1", source="argument --embedded")
    return cls(config), unknown


def _apply_common(args: argparse.Namespace, common: CommonOptions) -> None:
    """Put the common options into ``args`` where the service's parser has them."""
    for field in fields(common):
        value = getattr(common, field.name)
        if field.name in _NOT_FLAGS or value is None or value is False:
            continue
        if hasattr(args, field.name):
            setattr(args, field.name, value)


def build_services(
    classes: Sequence[type[ServiceBase]],
    extras: Sequence[str],
    common: CommonOptions,
    *,
    with_system: bool = False,
) -> list[ServiceBase]:
    """Build every service (a SystemService first when ``with_system``).

    ``common.identity`` goes to the targets only, never to the added SystemService.

    Raises:
        ConfigError: ``--identity`` with several targets, an argument no service accepts,
            or a configuration error of one of the services.
    """
    if common.identity is not None and len(classes) > 1:
        raise ConfigError("--identity needs exactly one service (each one has its own)")
    services: list[ServiceBase] = []
    leftovers: list[set[str]] = []
    if with_system:
        system_common = CommonOptions(
            **{f.name: getattr(common, f.name) for f in fields(common) if f.name != "identity"}
        )
        service, unknown = _build_one(SystemService, extras, system_common)
        services.append(service)
        leftovers.append(set(unknown))
    for cls in classes:
        service, unknown = _build_one(cls, extras, common)
        services.append(service)
        leftovers.append(set(unknown))
    nobody = [word for word in extras if word.startswith("-") and all(word in u for u in leftovers)]
    if nobody:
        raise ConfigError(f"unrecognized arguments (no service accepts them): {' '.join(nobody)}")
    return services
