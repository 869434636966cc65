"""Command-line flags, derived from the declarations, and ``--set``.

Every flag comes from an :class:`Option`: its name (``Option.cli_flag``), type, help and,
for a bool, the value it stores (Karton's ``--non-persistent`` stores False). A flag that
was not given is None and leaves the lower layers alone, as in Karton's
``config_from_args``. The source recorded for each value is ``argument --flag``.

``--set [IDENTITY:]SECTION.OPTION=VALUE`` (repeatable) reaches every setting, declared or
not; with ``IDENTITY:`` it sets a ``[karton]`` option for that identity only. It belongs
to the same top layer as the other flags: of two values for the same key, the one applied
last wins (``--set`` is applied before the flags of its own).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import Protocol

from .._errors import ConfigError
from ._builtin import BASE_FLAGS, BUILTIN, CONSUMER_FLAGS, SYSTEM_FLAGS, suggest
from ._declare import PER_IDENTITY_SECTION, Option

__all__ = [
    "SetItem",
    "add_consumer_arguments",
    "add_options_to_parser",
    "add_system_arguments",
    "apply_sets",
    "base_args_parser",
    "base_config_from_args",
    "consumer_config_from_args",
    "flag_help",
    "options_from_args",
    "parse_set",
    "system_config_from_args",
]


class _Settable(Protocol):
    def set(self, section: str, option: str, value: object, source: str = "set") -> None: ...


SetItem = tuple[str | None, str, str, str]  # identity, section, option, value


def flag_help(option: Option) -> str:
    """``help ([section] name, env VAR, default X)``, safe for argparse's ``%``."""
    default = "" if option.default is None else f", default {option.default!r}"
    where = f"[{option.section}] {option.name}, env {option.env_var}{default}"
    sets = "" if option.flag_value is None else f"; this flag sets it to {option.flag_value}"
    return f"{option.help} ({where}{sets})".strip().replace("%", "%%")


def add_options_to_parser(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """Add one flag per option that has one; unset flags stay None."""
    for option in options:
        if not option.cli_flag:
            continue
        text = flag_help(option)
        if option.type is bool and option.flag_value is not None:
            parser.add_argument(option.cli_flag, dest=option.dest, action="store_const",
                                const=option.flag_value, default=None, help=text)  # fmt: skip
        elif option.type is bool:
            parser.add_argument(option.cli_flag, dest=option.dest, default=None, help=text,
                                action=argparse.BooleanOptionalAction)  # fmt: skip
        else:
            parser.add_argument(option.cli_flag, dest=option.dest, default=None, help=text,
                                type=option.type, metavar=option.name.upper())  # fmt: skip


def options_from_args(
    config: _Settable, options: Iterable[Option], args: argparse.Namespace
) -> None:
    """Copy the flags that were given on the command line into ``config``."""
    for option in options:
        value = getattr(args, option.dest, None)
        if value is None or not option.cli_flag:
            continue
        flag = option.cli_flag
        if value is False and option.type is bool and option.flag_value is None:
            flag = "--no-" + flag[2:]
        config.set(option.section, option.name, value, source=f"argument {flag}")


def parse_set(item: str) -> SetItem:
    """Split ``[IDENTITY:]SECTION.OPTION=VALUE``.

    Raises:
        ConfigError: The item is malformed, names an unknown option of a built-in section,
            or sets something other than a ``[karton]`` option per identity.
    """
    key, eq, value = item.partition("=")
    identity, colon, dotted = key.strip().rpartition(":")
    section, dot, option = dotted.rpartition(".")
    source = f"argument --set {item}"
    if not eq or not dot or not section or not option or (colon and not identity):
        raise ConfigError("expected --set [IDENTITY:]SECTION.OPTION=VALUE", source=source)
    if identity and section != PER_IDENTITY_SECTION:
        raise ConfigError(
            f"only [{PER_IDENTITY_SECTION}] options can be set per identity",
            section=section, option=option, source=source,
        )  # fmt: skip
    if section in BUILTIN and option not in BUILTIN[section]:
        raise ConfigError(
            f"unknown option{suggest(option, BUILTIN[section])}",
            section=section, option=option, source=source,
        )  # fmt: skip
    if identity and option == "identity":
        raise ConfigError("an identity cannot be renamed per identity", source=source)
    return (identity or None), section, option, value


def apply_sets(config: _Settable, items: Sequence[str] | None) -> None:
    """Apply ``--set`` items in order (``IDENTITY:`` ones to ``[karton:IDENTITY]``)."""
    for item in items or ():
        identity, section, option, value = parse_set(item)
        target = section if identity is None else f"{section}:{identity}"
        config.set(target, option, value, source=f"argument --set {item.partition('=')[0]}")


def base_args_parser(description: str | None = None) -> argparse.ArgumentParser:
    """A parser with Karton's base flags, ``--config-path`` and ``--set`` (the caller adds
    ``--version``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config-file",
        "--config-path",
        dest="config_file",
        help="ini file read after all the others (it must exist)",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=None,
        metavar="[IDENTITY:]SECTION.OPTION=VALUE",
        help="set any option (repeatable); IDENTITY: limits a [karton] option to one service",
    )
    add_options_to_parser(parser, BASE_FLAGS)
    return parser


def base_config_from_args(config: _Settable, args: argparse.Namespace) -> None:
    """Apply ``--set``, then ``--identity``, ``--log-level`` and ``--debug``."""
    apply_sets(config, getattr(args, "settings", None))
    options_from_args(config, BASE_FLAGS, args)


def add_consumer_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the consumer flags: Karton's two plus concurrency, grace and retries."""
    add_options_to_parser(parser, CONSUMER_FLAGS)


def consumer_config_from_args(config: _Settable, args: argparse.Namespace) -> None:
    """Map the consumer flags into ``[karton]``."""
    options_from_args(config, CONSUMER_FLAGS, args)


def add_system_arguments(parser: argparse.ArgumentParser) -> None:
    """Add karton-system's flags (``--crash-started-task-on-timeout`` actually works)."""
    add_options_to_parser(parser, SYSTEM_FLAGS)


def system_config_from_args(config: _Settable, args: argparse.Namespace) -> None:
    """Map the system flags into ``[system]``."""
    options_from_args(config, SYSTEM_FLAGS, args)
