"""The one precedence rule as a table: every layer against every other, per identity too.

Layers, lowest first: the class attribute, /etc, ~/.config, ./karton.ini,
$KARTON_CONFIG_FILE, --config-file, the environment, command-line flags. Each test builds a
real Consumer subclass through its own argparse hooks, so the values go the way
``Service.main()`` sends them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from asynckarton import Config, Consumer, Task
from asynckarton._errors import ConfigError
from asynckarton._settings._declare import demangle_identity, mangle_identity
from asynckarton._settings._policy import ConsumerPolicy, resolve_policy

LAYERS = ("class", "etc", "user", "local", "env_file", "path", "env", "flag")
FILES = ("etc", "user", "local", "env_file", "path")
IDENTITY = "svc.x-1"  # a dot and a dash: the variable name mangles both
OTHER = "svc.other"


async def _process(self: Consumer, task: Task) -> None:
    return None


@dataclass
class Setup:
    """Values per layer for one option; ``mine`` ones are for :data:`IDENTITY` only."""

    tmp: Path
    option: str = "concurrency_limit"
    flag: str = "--concurrency-limit"
    generic: dict[str, object] = field(default_factory=dict)
    mine: dict[str, object] = field(default_factory=dict)

    def policy(self, identity: str = IDENTITY) -> ConsumerPolicy:
        return self.consumer(identity).policy

    def consumer(self, identity: str = IDENTITY) -> Consumer:
        attrs: dict[str, Any] = {
            "identity": identity,
            "filters": [{"type": "x"}],
            "process": _process,
            "__module__": "tests.unit.fake",
        }
        if "class" in self.generic:
            attrs[self.option] = self.generic["class"]
        cls = cast(type[Consumer], type("Svc", (Consumer,), attrs))
        environ: dict[str, str] = {}
        argv: list[str] = []
        path: Path | None = None
        for layer in FILES:
            text = ""
            if layer in self.generic:
                text += f"[karton]\n{self.option} = {self.generic[layer]}\n"
            if layer in self.mine:
                text += f"[karton:{IDENTITY}]\n{self.option} = {self.mine[layer]}\n"
            file = self.tmp / f"{layer}.ini"
            if text:
                file.write_text(text, encoding="utf-8")
            if layer == "env_file" and text:
                environ["KARTON_CONFIG_FILE"] = str(file)
            if layer == "path" and text:
                path = file
        if "env" in self.generic:
            environ[f"KARTON_KARTON_{self.option.upper()}"] = str(self.generic["env"])
        if "env" in self.mine:
            name = f"KARTON_KARTON__{mangle_identity(IDENTITY)}__{self.option.upper()}"
            environ[name] = str(self.mine["env"])
        if "flag" in self.generic:
            argv += [self.flag, str(self.generic["flag"])]
        if "flag" in self.mine:
            argv += ["--set", f"{IDENTITY}:karton.{self.option}={self.mine['flag']}"]
        search = [str(self.tmp / f"{name}.ini") for name in ("etc", "user", "local")]
        config = Config(path, environ=environ, search_paths=search)
        cls.config_from_args(config, cls.args_parser().parse_args(argv))
        return cls(config)


def marker(layer: str, tmp: Path) -> str:
    """A piece of the source string each layer reports."""
    if layer == "class":
        return "class tests.unit.fake.Svc."
    if layer in FILES:
        return f"{tmp / layer}.ini:"
    if layer == "env":
        return "env KARTON_KARTON_"
    return "argument --"


@pytest.mark.parametrize(("low", "high"), list(itertools.combinations(LAYERS, 2)))
def test_higher_layer_wins(tmp_path: Path, low: str, high: str) -> None:
    setup = Setup(tmp_path, generic={low: 2, high: 3})
    policy = setup.policy()
    assert policy.concurrency_limit == 3
    assert marker(high, tmp_path) in policy.sources["concurrency_limit"]


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_alone_is_used(tmp_path: Path, layer: str) -> None:
    policy = Setup(tmp_path, generic={layer: 4}).policy()
    assert policy.concurrency_limit == 4
    assert marker(layer, tmp_path) in policy.sources["concurrency_limit"]


def test_nothing_set_gives_the_declared_default(tmp_path: Path) -> None:
    policy = Setup(tmp_path).policy()
    assert policy.concurrency_limit == 1
    assert policy.sources["concurrency_limit"] == "default"


@pytest.mark.parametrize("layer", LAYERS[1:])
def test_identity_value_beats_generic_one_within_a_layer(tmp_path: Path, layer: str) -> None:
    setup = Setup(tmp_path, generic={layer: 2}, mine={layer: 5})
    assert setup.policy(IDENTITY).concurrency_limit == 5
    assert setup.policy(OTHER).concurrency_limit == 2  # not for anybody else


@pytest.mark.parametrize(("low", "high"), list(itertools.combinations(LAYERS[1:], 2)))
def test_across_layers_the_later_layer_wins(tmp_path: Path, low: str, high: str) -> None:
    """Identity-specific in a lower layer loses to generic in a higher one, and vice versa.

    cistell resolves a per-task key of a lower source above a generic key of a higher one
    for env only; here rank decides, whichever of the two the value is.
    """
    generic_on_top = Setup(tmp_path / "a", generic={high: 3}, mine={low: 7})
    (tmp_path / "a").mkdir()
    assert generic_on_top.policy().concurrency_limit == 3
    mine_on_top = Setup(tmp_path / "b", generic={low: 3}, mine={high: 7})
    (tmp_path / "b").mkdir()
    assert mine_on_top.policy().concurrency_limit == 7


def test_identity_section_beats_class_attribute(tmp_path: Path) -> None:
    setup = Setup(tmp_path, generic={"class": 8}, mine={"local": 2})
    assert setup.policy().concurrency_limit == 2
    assert setup.policy(OTHER).concurrency_limit == 8


@pytest.mark.parametrize("layer", LAYERS[1:])
def test_class_task_timeout_beats_every_layer_as_in_karton(tmp_path: Path, layer: str) -> None:
    """karton-core 5.9.1 reads [karton] task_timeout only when the class leaves it None."""
    setup = Setup(tmp_path, option="task_timeout", flag="--task-timeout",
                  generic={"class": 7, layer: 3}, mine={layer: 4})  # fmt: skip
    policy = setup.policy()
    assert policy.task_timeout == 7
    assert "karton-core 5.9.1" in policy.sources["task_timeout"]
    without_class = Setup(tmp_path, option="task_timeout", flag="--task-timeout",
                          generic={layer: 3})  # fmt: skip
    assert without_class.policy().task_timeout == 3


@pytest.mark.parametrize("layer", LAYERS[1:])
def test_class_lease_timeout_loses_to_every_layer(tmp_path: Path, layer: str) -> None:
    """It used to beat ini, env and flags; now it follows the one rule."""
    setup = Setup(tmp_path, option="lease_timeout", flag="--set",
                  generic={"class": 9.0, layer: 2.5})  # fmt: skip
    if layer == "flag":
        setup.generic.pop("flag")
        setup.mine["flag"] = 2.5  # lease_timeout has no flag of its own: --set
    assert setup.policy().lease_timeout == 2.5


def test_debug_mode_turns_persistence_off(tmp_path: Path) -> None:
    setup = Setup(tmp_path, option="debug", flag="--debug")
    consumer = setup.consumer()
    assert consumer.policy.persistent is True
    (tmp_path / "local.ini").write_text(f"[karton:{IDENTITY}]\ndebug = yes\n")
    consumer = Setup(tmp_path).consumer()
    assert consumer.debug and consumer.policy.persistent is False
    assert consumer.identity.startswith(IDENTITY + "-")
    assert consumer.config_identity == IDENTITY


# -- the environment names --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("identity", "mangled"),
    [
        ("karton.classifier", "KARTON_CLASSIFIER"),
        ("karton.mwdb-reporter", "KARTON_MWDB_hREPORTER"),
        ("my_svc", "MY_uSVC"),
        ("Svc.A", "_cSVC__cA"),
        ("a..b", "A__B"),
        ("a.", "A_"),
        ("x:y", "X_x00003AY"),
        ("karton.ü", "KARTON__x0000FC"),
    ],
)
def test_identity_mangling_is_reversible(identity: str, mangled: str) -> None:
    assert mangle_identity(identity) == mangled
    assert demangle_identity(mangled) == identity
    assert mangled.replace("_", "a").isalnum() and mangled.isascii()  # a shell can export it


@pytest.mark.parametrize("identity", ["a..b", "a.", "karton.mwdb-reporter", "Svc.A"])
def test_tricky_identity_variables_reach_the_identity(identity: str) -> None:
    name = f"KARTON_KARTON__{mangle_identity(identity)}__MAX_RETRIES"
    config = Config(environ={name: "4"}, search_paths=[])
    entry = config.entry("karton", "max_retries", identity)
    assert entry is not None and entry.value == "4" and entry.source == f"env {name}"
    assert config.entry("karton", "max_retries", "other") is None


@pytest.mark.parametrize("name", ["KARTON_KARTON__A_zB__MAX_RETRIES", "KARTON_KARTON____X"])
def test_malformed_identity_variable_names_the_variable(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Config(environ={name: "1"}, search_paths=[])


# -- the resolved policy ----------------------------------------------------------------------


class Flaky(Exception):
    """An exception of this module, for retry_for."""


def test_policy_json_round_trip(tmp_path: Path) -> None:
    config = Config(search_paths=[], environ={
        "KARTON_KARTON_RETRY_FOR": f"ValueError, {__name__}.Flaky",
        "KARTON_KARTON_TASK_TIMEOUT": "2.5",
        "KARTON_KARTON_CONCURRENCY_LIMIT": "3",
    })  # fmt: skip
    policy = resolve_policy(config, object, "svc")
    text = policy.to_json()
    assert '"retry_for":["builtins.ValueError","' + __name__ + '.Flaky"]' in text
    assert '"task_timeout":2.5' in text
    again = ConsumerPolicy.from_json(text)
    assert again == policy
    assert again.retry_for == (ValueError, Flaky)
    assert again.to_json() == text  # stable
    assert ConsumerPolicy.from_json('{"future_option": 1}') == ConsumerPolicy()


@pytest.mark.parametrize(
    ("raw", "message"),
    [("no.such.module.Error", "cannot import exception"), ("builtins.len", "not an exception")],
)
def test_retry_for_error_names_option_and_source(raw: str, message: str) -> None:
    config = Config(search_paths=[], environ={"KARTON_KARTON__SVC__RETRY_FOR": raw})
    with pytest.raises(ConfigError) as info:
        resolve_policy(config, object, "svc")
    assert message in str(info.value)
    assert info.value.option == "retry_for"
    assert info.value.source == "env KARTON_KARTON__SVC__RETRY_FOR"


def test_policy_from_json_rejects_garbage() -> None:
    with pytest.raises(ConfigError, match="not JSON"):
        ConsumerPolicy.from_json("{")
    with pytest.raises(ConfigError, match="cannot import"):
        ConsumerPolicy.from_json('{"retry_for": ["nope.Nope"]}')


def test_class_values_of_shipped_subclasses_count_as_code() -> None:
    """Only the class that introduces an attribute (Consumer) holds the default."""
    from asynckarton.demo import Reporter

    policy = resolve_policy(Config(search_paths=[], environ={}), Reporter, Reporter.identity)
    assert policy.concurrency_limit == 8
    assert policy.sources["concurrency_limit"] == (
        "class asynckarton.demo.Reporter.concurrency_limit"
    )
    assert policy.sources["max_retries"] == "default"  # Consumer's None: not code
    assert (
        resolve_policy(Config(search_paths=[], environ={}), Consumer, "c").sources["persistent"]
        == "default"
    )  # Consumer's own True is the default, not a class value
