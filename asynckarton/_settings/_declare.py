"""The one declaration of a setting: :class:`Option`.

Every built-in setting (``_builtin.py``) and every option a service declares is one
``Option``: section, name, type, default, help, whether it is secret, and the command-line
flag. Everything else derives from it: the ini key ``[section] name``, the variable
``KARTON_<SECTION>_<NAME>``, the argparse and typer flags, the ``asynckarton config``
row, the conversion and its range check.

``[karton]`` options can also be set for one identity: the ini section
``[karton:<identity>]``, the variable ``KARTON_KARTON__<IDENTITY>__<NAME>`` (the identity
mangled by :func:`mangle_identity`) and the flag ``--set <identity>:karton.<name>=<value>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeAlias

from .._errors import ConfigError
from ._values import Entry, SettingsSource, to_bool, to_float, to_int

__all__ = ["PER_IDENTITY_SECTION", "Option", "OptionType", "demangle_identity", "mangle_identity"]

OptionType: TypeAlias = type[str] | type[int] | type[float] | type[bool]

#: The one section whose options can be set per identity.
PER_IDENTITY_SECTION = "karton"

# What Karton's KARTON_<SECTION>_<OPTION> mapping can reach (it lower-cases both parts).
_SECTION_RE = re.compile(r"[a-z0-9\-\.]+")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_]*")
_CONVERT = {int: (to_int, "integer"), float: (to_float, "number"), bool: (to_bool, "boolean")}


@dataclass(frozen=True, slots=True)
class Option:
    """One setting, declared once; readable from ini, environment and command line.

    Attributes:
        section: The ini section; lower-case letters, digits, ``-`` and ``.`` only (no
            ``_``: Karton's environment mapping splits the section at the first ``_``).
        name: The option; lower-case letters, digits and ``_`` (not starting with ``_``
            and without ``__``: that is the per-identity separator of variable names).
        type: ``str``, ``int``, ``float`` or ``bool``.
        default: Returned by :meth:`read` when no layer (and no class attribute) sets it.
        help: The ``--help`` and ``asynckarton config`` text.
        flag: The command-line flag; None derives ``--<section>-<name>``, ``""`` means no
            flag of its own (``--set section.name=value`` still reaches it).
        flag_value: For a bool, the value its flag stores (Karton's ``--non-persistent``
            stores False); None gives ``--x`` / ``--no-x``.
        secret: Masked by ``asynckarton config`` and :meth:`Config.explain`.
        minimum: Smallest allowed number (inclusive unless ``exclusive``).

    Raises:
        ConfigError: The section or name cannot be reached through the environment.
        TypeError: ``type`` is not one of the four supported types.
    """

    section: str
    name: str
    type: OptionType = str
    default: Any = None
    help: str = ""
    flag: str | None = None
    flag_value: bool | None = None
    secret: bool = False
    minimum: float | None = None
    exclusive: bool = False

    def __post_init__(self) -> None:
        if not _SECTION_RE.fullmatch(self.section):
            raise ConfigError(
                "option section must match [a-z0-9.-]+", section=self.section, option=self.name
            )
        if not _NAME_RE.fullmatch(self.name) or "__" in self.name:
            raise ConfigError(
                "option name must match [a-z0-9][a-z0-9_]* without '__'",
                section=self.section,
                option=self.name,
            )
        if self.type not in (str, int, float, bool):
            raise TypeError(f"unsupported option type {self.type!r}")

    @property
    def key(self) -> str:
        """``section.name``, as ``--set`` spells it."""
        return f"{self.section}.{self.name}"

    @property
    def env_var(self) -> str:
        """The environment variable, e.g. ``KARTON_SMOL_HOW_SMOL``."""
        return f"KARTON_{self.section}_{self.name}".upper()

    @property
    def per_identity(self) -> bool:
        """Whether the option can be set for one identity (``[karton]`` options)."""
        return self.section == PER_IDENTITY_SECTION

    def identity_env_var(self, identity: str) -> str:
        """The per-identity variable, e.g. ``KARTON_KARTON__KARTON_SMOL__TASK_TIMEOUT``."""
        return f"KARTON_{self.section.upper()}__{mangle_identity(identity)}__{self.name.upper()}"

    @property
    def cli_flag(self) -> str:
        """The command-line flag, e.g. ``--smol-how-smol`` (``_`` and ``.`` become ``-``);
        ``""`` when the option has no flag of its own."""
        if self.flag is not None:
            return self.flag
        return "--" + re.sub(r"[_.]", "-", f"{self.section}-{self.name}")

    @property
    def dest(self) -> str:
        """The :class:`argparse.Namespace` attribute, e.g. ``smol_how_smol``."""
        return re.sub(r"[-.]", "_", f"{self.section}_{self.name}")

    def convert(self, value: Any, source: str) -> Any:
        """Return ``value`` as :attr:`type`, checked against :attr:`minimum`.

        Raises:
            ConfigError: Naming the option, the value and ``source``.
        """
        if value is None:
            return None
        if self.type is str:
            return str(value)
        convert, what = _CONVERT[self.type]
        try:
            typed = convert(value)
        except (TypeError, ValueError):
            raise self.error(f"invalid {what}", value, source) from None
        if self.minimum is not None and self.type is not bool:
            low = self.minimum
            if typed < low or (self.exclusive and typed == low):
                rule = f"greater than {low:g}" if self.exclusive else f"at least {low:g}"
                raise self.error(f"value must be {rule}", value, source)
        return typed

    def error(self, message: str, value: Any, source: str) -> ConfigError:
        """A :class:`ConfigError` about this option (the value masked when secret)."""
        shown = "***" if self.secret else value
        return ConfigError(
            message, section=self.section, option=self.name, value=shown, source=source
        )

    def lookup(self, config: SettingsSource, identity: str | None = None) -> Entry | None:
        """The winning entry for ``identity`` (None: no layer sets the option)."""
        return config.entry(self.section, self.name, identity if self.per_identity else None)

    def read(self, config: SettingsSource, identity: str | None = None) -> Any:
        """Return the typed value from ``config``, or :attr:`default` when unset.

        Raises:
            ConfigError: The value cannot be converted (names its source).
        """
        entry = self.lookup(config, identity)
        if entry is None or entry.value is None:
            return self.default
        return self.convert(entry.value, entry.source)


# -- identities in variable names -------------------------------------------------------------
#
# A POSIX shell exports names made of [A-Za-z0-9_]. Identity letters become upper case,
# ``.`` (the usual separator of Karton identities) becomes ``_``; everything else is an
# escape that starts with ``_`` and a lower-case letter, so nothing is ambiguous:
# ``-`` -> ``_h``, ``_`` -> ``_u``, an upper-case letter X -> ``_cX``, any other character
# -> ``_x`` and six hex digits. ``karton.mwdb-reporter`` -> ``KARTON_MWDB_hREPORTER``.

_ESCAPES = {"-": "_h", "_": "_u"}
_UNESCAPES = {"h": "-", "u": "_"}


def mangle_identity(identity: str) -> str:
    """The identity as it appears in a per-identity environment variable (reversible)."""
    out: list[str] = []
    for char in identity:
        if char.isascii() and (char.islower() or char.isdigit()):
            out.append(char.upper())
        elif char == ".":
            out.append("_")
        elif char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char.isascii() and char.isupper():
            out.append("_c" + char)
        else:
            out.append(f"_x{ord(char):06X}")
    return "".join(out)


def demangle_identity(mangled: str) -> str:
    """Invert :func:`mangle_identity`.

    Raises:
        ValueError: ``mangled`` is not something :func:`mangle_identity` produces.
    """
    out: list[str] = []
    index = 0
    while index < len(mangled):
        char = mangled[index]
        nxt = mangled[index + 1] if index + 1 < len(mangled) else ""
        if char != "_":
            if not (char.isascii() and (char.isupper() or char.isdigit())):
                raise ValueError(f"unexpected {char!r} in {mangled!r}")
            out.append(char.lower())
            index += 1
        elif nxt in _UNESCAPES:
            out.append(_UNESCAPES[nxt])
            index += 2
        elif nxt == "c" and index + 2 < len(mangled) and mangled[index + 2].isupper():
            out.append(mangled[index + 2])
            index += 3
        elif nxt == "x" and len(mangled) >= index + 8:
            out.append(chr(int(mangled[index + 2 : index + 8], 16)))
            index += 8
        elif nxt.islower():
            raise ValueError(f"unknown escape '_{nxt}' in {mangled!r}")
        else:
            out.append(".")
            index += 1
    return "".join(out)
