"""Every setting of one service with its value and source: what ``asynckarton config`` prints.

Unlike :meth:`Config.explain` (only the values some layer set), this lists every declared
setting (defaults, class attributes and the service's own options included), then the
values no declaration covers. Secrets are masked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._builtin import ALIAS_SECTIONS, BUILTIN
from ._declare import Option
from ._policy import ConsumerPolicy, exception_name
from ._values import SettingsSource, mask

__all__ = ["Row", "describe"]


@dataclass(frozen=True, slots=True)
class Row:
    """One line of ``asynckarton config``."""

    section: str
    name: str
    value: Any
    source: str

    def __str__(self) -> str:
        value = "<unset>" if self.value is None else self.value
        return f"[{self.section}] {self.name} = {value}  # {self.source}"


def _policy_value(policy: ConsumerPolicy, name: str) -> Any:
    value = getattr(policy, name)
    if name == "retry_for":
        return ", ".join(exception_name(exc) for exc in value)
    return value


def describe(
    config: SettingsSource,
    *,
    identity: str | None = None,
    identity_source: str = "default",
    policy: ConsumerPolicy | None = None,
    options: Iterable[Option] = (),
    present: Iterable[tuple[str, str]] = (),
) -> list[Row]:
    """Rows for every built-in setting, then ``options``, then undeclared ``present`` keys.

    Args:
        config: Where values come from.
        identity: The identity whose ``[karton]`` values are shown (its own ones win).
        identity_source: Where the identity came from (class, flag, ini...).
        policy: A consumer's resolved policy: its values and sources replace the plain
            lookup of the policy options (class attributes are only known there).
        options: The service's own declared options.
        present: ``(section, option)`` keys some layer set (to list the undeclared ones).

    Raises:
        ConfigError: A value cannot be converted.
    """
    sources: Mapping[str, str] = {} if policy is None else policy.sources
    rows: list[Row] = []
    seen: set[tuple[str, str]] = set()
    declared = [opt for section in BUILTIN.values() for opt in section.values()]
    for option in [*declared, *options]:
        key = (option.section, option.name)
        if key in seen or (option.section in ALIAS_SECTIONS and not config.has_section(key[0])):
            continue
        seen.add(key)
        if option.section == "karton" and option.name == "identity":
            rows.append(Row("karton", "identity", identity, identity_source))
            continue
        if policy is not None and option.section == "karton" and option.name in sources:
            value, source = _policy_value(policy, option.name), sources[option.name]
        else:
            entry = option.lookup(config, identity)
            if entry is None or entry.value is None:
                value, source = option.default, "default"
            else:
                value, source = option.convert(entry.value, entry.source), entry.source
        rows.append(Row(option.section, option.name, mask(option.name, value, option.secret),
                        source))  # fmt: skip
    for section, name in present:
        if (section, name) not in seen and ":" not in section:
            seen.add((section, name))
            value = mask(name, config.get(section, name))
            rows.append(Row(section, name, value, f"{config.source(section, name)}, undeclared"))
    return rows
