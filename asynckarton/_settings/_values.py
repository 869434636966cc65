"""Values as the configuration holds them: layer ranks, provenance, conversion, masking.

Every value carries the rank of the layer that set it. Ranks only grow from the bottom of
the precedence rule to its top, so "which value wins" is one comparison, the same for every
setting (see :mod:`asynckarton._settings._config` for the rule itself).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "RANK_ARGUMENTS",
    "RANK_ENV",
    "RANK_FILES",
    "Entry",
    "SettingsSource",
    "mask",
    "to_bool",
    "to_float",
    "to_int",
]

#: The first ini file's rank; each later file adds one (``/etc``, ``~/.config``, ``./``,
#: ``$KARTON_CONFIG_FILE``, ``--config-file``).
RANK_FILES = 10
#: ``KARTON_*`` environment variables.
RANK_ENV = 30
#: Command-line flags, ``--set``, ``load_from_dict`` and ``set``: the top layer.
RANK_ARGUMENTS = 40

_TRUE = frozenset({"1", "yes", "true", "on"})
_FALSE = frozenset({"0", "no", "false", "off"})
_URL_PASSWORD_RE = re.compile(r"(://[^:/@]*:)[^@]*@")
_SECRET_NAME_RE = re.compile(r"password|secret|token|key$")


@dataclass(frozen=True, slots=True)
class Entry:
    """One value, where it came from, and the rank of that layer."""

    value: Any
    source: str
    rank: int = RANK_ARGUMENTS


class SettingsSource(Protocol):
    """What the typed views and declarations read from (a :class:`Config`)."""

    def entry(self, section: str, option: str, identity: str | None = None) -> Entry | None:
        """The winning value of ``[section] option`` for ``identity`` (None: unset)."""
        ...

    def get(self, section: str, option: str, fallback: Any = None) -> Any:
        """The raw value, or ``fallback``."""
        ...

    def source(self, section: str, option: str) -> str:
        """Where the value came from."""
        ...

    def has_section(self, section: str) -> bool:
        """Whether any layer set an option of ``section``."""
        ...

    @property
    def environ(self) -> Mapping[str, str]:
        """The environment snapshot."""
        ...


def to_int(value: object) -> int:
    """Convert ini text or a native value to an int (bools and fractions refused)."""
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return int(value)
    raise TypeError(value)


def to_float(value: object) -> float:
    """Convert to a finite float."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(value)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return number


def to_bool(value: object) -> bool:
    """Convert ``1/yes/true/on`` and ``0/no/false/off`` (any case), or a native bool."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(value)


def mask(option: str, value: Any, secret: bool | None = None) -> Any:
    """Hide a secret value, and the password of any URL, for printing.

    ``secret`` comes from the declaration; None (an undeclared option) guesses from the
    name (``password``, ``secret``, ``token``, ``...key``).
    """
    if value is None:
        return None
    if secret or (secret is None and _SECRET_NAME_RE.search(option)):
        return "***"
    if isinstance(value, str):
        return _URL_PASSWORD_RE.sub(r"\1***@", value)
    return value
