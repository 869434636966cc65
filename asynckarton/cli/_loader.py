"""From ``module:Class`` targets and command-line words to configured services.

``asynckarton run`` builds every service through the service's own Karton hooks
(``args_parser()`` / ``config_from_args()``), so options a service declares and
argparse flags it adds keep working when several services share one process.  Each
service parses the extra arguments with ``parse_known_args`` and ignores the flags of
the others; a flag nobody accepts is an error.  Nothing here touches signals or logging
(the CLI owns those).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import ConfigError
from .._services._service import ServiceBase
from .._settings._builtin import builtin
from .._settings._check import check_config
from .._settings._config import Config
from .._settings._flags import apply_sets
from ..system import SystemService

__all__ = ["CommonOptions", "build_services", "load_service_class", "split_targets"]

log = logging.getLogger("asynckarton.config")


@dataclass(frozen=True, slots=True)
class CommonOptions:
    """Options ``asynckarton run`` applies to every service it starts.

    Attributes:
        config_file: ``--config-file`` / ``--config-path``.
        values: The declared flags that were given, as ``{"section.name": typed value}``
            (``karton.identity`` goes to the targets only, never to an added SystemService).
        sets: ``--set`` items, applied after ``values``.
        embedded: ``--embedded``.
    """

    config_file: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)
    sets: tuple[str, ...] = ()
    embedded: bool = False

    @property
    def identity(self) -> str | None:
        """``--identity``, when given."""
        value = self.values.get("karton.identity")
        return None if value is None else str(value)


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


def _working_directory_importable() -> None:
    """Let ``module:Class`` name a module in the working directory, as ``python -m`` does.

    A console script's ``sys.path`` starts with its own directory, not the working one
    (uvicorn, celery and arq add it the same way).
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def load_service_class(target: str) -> type[ServiceBase]:
    """Import ``package.module:Class`` (the working directory is importable) or
    ``path/to/file.py:Class``.

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
            _working_directory_importable()
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, ServiceBase)):
        raise ConfigError(f"target {target!r} is not an asynckarton service class")
    if not callable(getattr(cls, "run", None)) or not callable(getattr(cls, "stop", None)):
        raise ConfigError(f"target {target!r} cannot run on its own (no run()/stop())")
    return cls


def _config_for(
    cls: type[ServiceBase], extras: Sequence[str], common: CommonOptions, *, target: bool
) -> tuple[Config, list[str]]:
    """Build one service's config from its parser; return it and the words it did not know."""
    parser = cls.args_parser()
    args, unknown = parser.parse_known_args(list(extras))
    config = Config(getattr(args, "config_file", None) or common.config_file)
    cls.config_from_args(config, args)
    for key, value in common.values.items():
        section, _, name = key.partition(".")
        option = builtin(section, name)
        if option is None or (key == "karton.identity" and not target):
            continue
        config.set(section, name, value, source=f"argument {option.cli_flag}")
    apply_sets(config, common.sets)
    if not target and config.entry("karton", "identity") is not None:  # it names the targets
        config.set("karton", "identity", cls.identity, source="run --with-system")
    if common.embedded:
        config.set("asynckarton", "embedded", True, source="argument --embedded")
    return config, unknown


def build_services(
    classes: Sequence[type[ServiceBase]],
    extras: Sequence[str],
    common: CommonOptions,
    *,
    with_system: bool = False,
) -> list[ServiceBase]:
    """Build every service (a SystemService first when ``with_system``).

    Each target reads ``[karton:<its identity>]``, ``KARTON_KARTON__<IDENTITY>__*`` and
    ``--set <identity>:karton.*`` on top of the generic ``[karton]`` values, so two
    targets can run with different policies. Warnings about options and sections no
    service declares are logged once, knowing every service.

    Raises:
        ConfigError: ``--identity`` or ``[karton] identity`` with several targets, an
            argument no service accepts, or a configuration error of one of the services.
    """
    if common.identity is not None and len(classes) > 1:
        raise ConfigError("--identity needs exactly one service (each one has its own)")
    built: list[tuple[type[ServiceBase], Config]] = []
    leftovers: list[set[str]] = []
    kinds = [(SystemService, False)] if with_system else []
    for cls, target in [*kinds, *((cls, True) for cls in classes)]:
        config, unknown = _config_for(cls, extras, common, target=target)
        entry = config.entry("karton", "identity")
        if target and len(classes) > 1 and entry is not None:
            raise ConfigError(
                f"[karton] identity would rename all {len(classes)} services to one name: "
                "run them separately, or leave the identity to each class",
                section="karton", option="identity", value=entry.value, source=entry.source,
            )  # fmt: skip
        built.append((cls, config))
        leftovers.append(set(unknown))
    nobody = [word for word in extras if word.startswith("-") and all(word in u for u in leftovers)]
    if nobody:
        raise ConfigError(f"unrecognized arguments (no service accepts them): {' '.join(nobody)}")
    services = [cls(config) for cls, config in built]
    declared = [option for cls, _ in built for option in cls.options]
    for warning in check_config(built[-1][1], declared):
        log.warning("%s", warning)
    return services
