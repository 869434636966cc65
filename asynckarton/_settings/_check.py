"""Unknown options: a misspelt built-in option is an error, an undeclared section a warning.

Built-in sections (``[redis]``, ``[karton]``, ``[karton:<identity>]``...) are closed: every
option in them is declared in ``_builtin.py``, so ``[karton] concurency_limit`` or
``KARTON_KARTON_CONCURENCY_LIMIT`` fails at start with a "did you mean". Other sections
belong to services, which declare their options with :class:`Option`; since Karton-style
services may also read undeclared options with ``config.get``, an option or section that no
running service declares is only a warning (for values from files, the environment and
``--set``: what code puts there, code reads). Keys leaked from ``[DEFAULT]`` are not checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from .._errors import ConfigError
from ._builtin import BUILTIN, suggest
from ._declare import PER_IDENTITY_SECTION, Option
from ._values import RANK_ARGUMENTS, Entry

__all__ = ["check_config"]


class _Entries(Protocol):
    def entries(self) -> Iterable[tuple[str, str, Entry, bool]]: ...


def check_config(config: _Entries, declared: Iterable[Option] = ()) -> list[str]:
    """Raise on unknown built-in options; return warnings about undeclared ones.

    Args:
        config: The configuration to check.
        declared: The options of every service that runs with it.

    Raises:
        ConfigError: An option a built-in section does not have (with a suggestion), an
            identity section of a section other than ``[karton]``, or ``identity`` set
            for one identity.
    """
    services: dict[str, set[str]] = {}
    for option in declared:
        services.setdefault(option.section, set()).add(option.name)
    warnings: list[str] = []
    unknown_sections: dict[str, str] = {}
    for section, name, entry, inherited in config.entries():
        if inherited:
            continue
        base, colon, _ = section.partition(":")
        if base in BUILTIN:
            if colon and base != PER_IDENTITY_SECTION:
                raise ConfigError(
                    f"only [{PER_IDENTITY_SECTION}] has per-identity sections",
                    section=section, option=name, source=entry.source,
                )  # fmt: skip
            if name not in BUILTIN[base]:
                raise ConfigError(
                    f"unknown option{suggest(name, BUILTIN[base])}",
                    section=section, option=name, source=entry.source,
                )  # fmt: skip
            if colon and name == "identity":
                raise ConfigError(
                    "an identity cannot be renamed in its own section: use [karton] identity "
                    "with one service, or --identity",
                    section=section, option=name, source=entry.source,
                )  # fmt: skip
        elif entry.rank >= RANK_ARGUMENTS and not entry.source.startswith("argument --set"):
            continue  # put there by code (config_from_args, set): the code reads it
        elif section in services:
            if name not in services[section]:
                hint = suggest(name, services[section])
                warnings.append(
                    f"[{section}] {name} ({entry.source}): no running service declares "
                    f"this option{hint}"
                )
        else:
            unknown_sections.setdefault(section, entry.source)
    for section, source in unknown_sections.items():
        hint = suggest(section, [*BUILTIN, *services])
        warnings.append(f"[{section}] ({source}): no running service declares this section{hint}")
    return warnings
