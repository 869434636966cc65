"""Settings at the edges: --set, --config-path, unknown options, several services, config.

Everything runs in-process (typer's CliRunner, argparse, embedded mode): no servers.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from asynckarton import Config, Consumer, Option, Task
from asynckarton._errors import ConfigError
from asynckarton._settings._builtin import BUILTIN
from asynckarton._settings._check import check_config
from asynckarton._settings._flags import apply_sets, base_args_parser, parse_set
from asynckarton.cli._app import app
from asynckarton.cli._loader import CommonOptions, build_services

SECRET = "hunter2"


class Alpha(Consumer):
    """First service of the two-service tests."""

    identity: ClassVar[str] = "svc.alpha"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "a"}]
    options: ClassVar[list[Option]] = [Option("alpha", "size", int, default=10, help="size")]

    async def process(self, task: Task) -> None:
        return None


class Beta(Consumer):
    """Second service of the two-service tests."""

    identity: ClassVar[str] = "svc.beta"
    filters: ClassVar[list[dict[str, Any]]] = [{"type": "b"}]
    concurrency_limit: ClassVar[int | None] = 6

    async def process(self, task: Task) -> None:
        return None


ALPHA = f"{__name__}:Alpha"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No ini file and no KARTON_* variable from the machine reaches the commands."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("KARTON_"):
            monkeypatch.delenv(name)
    yield tmp_path


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def empty_config() -> Config:
    return Config(search_paths=[], environ={})


# -- --set -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("karton.max_retries=3", (None, "karton", "max_retries", "3")),
        ("svc.a:karton.max_retries=3", ("svc.a", "karton", "max_retries", "3")),
        ("my.svc.opt=a=b", (None, "my.svc", "opt", "a=b")),
        ("redis.url=", (None, "redis", "url", "")),
    ],
)
def test_parse_set(item: str, expected: tuple[str | None, str, str, str]) -> None:
    assert parse_set(item) == expected


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("karton.max_retries", "expected --set"),
        ("max_retries=3", "expected --set"),
        (":karton.max_retries=3", "expected --set"),
        ("karton.max_retry=3", "did you mean 'max_retries'"),
        ("svc:redis.port=1", "only [karton] options can be set per identity"),
        ("svc:karton.identity=x", "cannot be renamed"),
    ],
)
def test_bad_set_items(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        parse_set(item)
    assert item in str(info.value)


def test_set_reaches_options_without_a_flag_and_records_the_source() -> None:
    config = empty_config()
    parser = base_args_parser()
    args = parser.parse_args(["--set", "karton.lease_timeout=7", "--set", "x:karton.prefetch=2"])
    apply_sets(config, args.settings)
    assert config.get("karton", "lease_timeout") == "7"
    assert config.source("karton", "lease_timeout") == "argument --set karton.lease_timeout"
    entry = config.entry("karton", "prefetch", "x")
    assert entry is not None and entry.value == "2"
    assert config.entry("karton", "prefetch", "y") is None


@pytest.mark.parametrize("flag", ["--config-file", "--config-path"])
def test_config_path_is_an_alias(home: Path, flag: str) -> None:
    ini = home / "k.ini"
    ini.write_text("[karton]\nmax_retries = 4\n")
    args = Alpha.args_parser().parse_args([flag, str(ini)])
    service = Alpha.karton_from_args(args)
    assert isinstance(service, Alpha) and service.max_retries == 4
    result = invoke("config", ALPHA, flag, str(ini))
    assert result.exit_code == 0, result.output
    assert f"[karton] max_retries = 4  # {ini}:2" in result.output


# -- unknown options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "environ", "source"),
    [
        ("[karton]\nconcurency_limit = 2\n", {}, "k.ini:2"),
        ("", {"KARTON_KARTON_CONCURENCY_LIMIT": "2"}, "env KARTON_KARTON_CONCURENCY_LIMIT"),
        ("[karton:svc.alpha]\nconcurency_limit = 2\n", {}, "k.ini:2"),
    ],
)
def test_misspelt_builtin_option_is_an_error(
    tmp_path: Path, text: str, environ: dict[str, str], source: str
) -> None:
    ini = tmp_path / "k.ini"
    ini.write_text(text)
    config = Config(ini, environ=environ, search_paths=[])
    with pytest.raises(ConfigError) as info:
        Alpha(config)
    assert "did you mean 'concurrency_limit'?" in str(info.value)
    assert source in str(info.value)


def test_default_section_keys_are_not_checked(tmp_path: Path) -> None:
    ini = tmp_path / "k.ini"
    ini.write_text("[DEFAULT]\nhost = h\n[s3]\naddress = http://%(host)s\n")
    assert check_config(Config(ini, environ={}, search_paths=[])) == []


def test_identity_cannot_be_set_per_identity() -> None:
    config = empty_config()
    config.set("karton:svc.alpha", "identity", "other", source="here")
    with pytest.raises(ConfigError, match="cannot be renamed"):
        Alpha(config)


def test_undeclared_sections_and_options_are_warnings() -> None:
    config = Config(search_paths=[], environ={"KARTON_ALPHA_SISE": "1"})
    apply_sets(config, ["nobody.x=1"])
    config.set("smol", "how_smol", 5)  # code that sets it (Karton's config_from_args) reads it
    warnings = check_config(config, Alpha.options)
    assert any("[alpha] sise" in w and "did you mean 'size'" in w for w in warnings)
    assert any("[nobody]" in w and "no running service declares this section" in w
               for w in warnings)  # fmt: skip
    assert len(warnings) == 2
    assert check_config(config, [*Alpha.options, Option("nobody", "x")]) == [warnings[0]]


def test_service_option_is_validated_at_start() -> None:
    config = Config(search_paths=[], environ={"KARTON_ALPHA_SIZE": "abc"})
    with pytest.raises(ConfigError, match="env KARTON_ALPHA_SIZE"):
        Alpha(config)


# -- several services --------------------------------------------------------------------------


def test_run_two_services_with_two_policies(home: Path) -> None:
    (home / "karton.ini").write_text(
        "[karton]\nmax_retries = 1\n[karton:svc.beta]\nmax_retries = 2\n"
    )
    common = CommonOptions(
        values={"karton.concurrency_limit": 3},
        sets=("svc.alpha:karton.concurrency_limit=4",),
        embedded=True,
    )
    alpha, beta = build_services([Alpha, Beta], [], common)
    assert isinstance(alpha, Alpha) and isinstance(beta, Beta)
    assert (alpha.concurrency_limit, beta.concurrency_limit) == (4, 3)  # --set vs the flag
    assert (alpha.max_retries, beta.max_retries) == (1, 2)  # [karton] vs [karton:svc.beta]
    assert alpha.policy.sources["concurrency_limit"] == (
        "argument --set svc.alpha:karton.concurrency_limit"
    )


def test_run_two_services_through_the_command_line(home: Path) -> None:
    """`asynckarton run A B` parses per-service --set (the policy check stops before serving)."""
    result = invoke("run", ALPHA, f"{__name__}:Beta", "--embedded",
                    "--set", "svc.beta:karton.max_retries=-1")  # fmt: skip
    assert result.exit_code == 1
    assert "[karton] max_retries" in result.stderr
    assert "argument --set svc.beta:karton.max_retries" in result.stderr


@pytest.mark.parametrize(
    ("environ", "text"),
    [({"KARTON_KARTON_IDENTITY": "one"}, ""), ({}, "[karton]\nidentity = one\n")],
)
def test_karton_identity_with_two_services_is_refused(
    home: Path, monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], text: str
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    (home / "karton.ini").write_text(text)
    with pytest.raises(ConfigError, match="would rename all 2 services"):
        build_services([Alpha, Beta], [], CommonOptions(embedded=True))
    (one,) = build_services([Alpha], [], CommonOptions(embedded=True))
    assert one.identity == "one"
    system, one = build_services([Alpha], [], CommonOptions(embedded=True), with_system=True)
    assert (system.identity, one.identity) == ("karton.system", "one")  # the target's name


def test_build_services_warns_only_about_sections_nobody_declares(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (home / "karton.ini").write_text("[alpha]\nsize = 3\n[gamma]\nx = 1\n")
    with caplog.at_level(logging.WARNING, logger="asynckarton.config"):
        alpha, _ = build_services([Alpha, Beta], [], CommonOptions(embedded=True))
    assert alpha.option(Alpha.options[0]) == 3
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and "[gamma]" in messages[0]


# -- asynckarton config ------------------------------------------------------------------------


def test_config_shows_defaults_class_values_and_sources(home: Path) -> None:
    result = invoke("config", f"{__name__}:Beta", "--set", "karton.retry_backoff=2")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "[karton] identity = svc.beta  # class tests.unit.test_settings_cli.Beta" in out
    assert "[karton] concurrency_limit = 6  # class tests.unit.test_settings_cli.Beta." in out
    assert "[karton] prefetch = 6  # derived from concurrency_limit" in out
    assert "[karton] retry_backoff = 2.0  # argument --set karton.retry_backoff" in out
    assert "[redis] port = 6379  # default" in out
    assert "[system] gc_interval = 180.0  # default" in out
    assert len([line for line in out.splitlines() if line.startswith("[")]) >= sum(
        len(section) for name, section in BUILTIN.items() if name not in ("minio", "config")
    )


def test_config_for_an_identity_and_service_options(home: Path) -> None:
    (home / "karton.ini").write_text("[karton]\nmax_retries = 1\n[karton:svc.x]\nmax_retries = 5\n")
    result = invoke("config", "--identity", "svc.x")
    assert "[karton] max_retries = 5  # " in result.output
    result = invoke("config", ALPHA)
    assert "[karton] max_retries = 1  # " in result.output
    assert "[alpha] size = 10  # default" in result.output


def test_config_masks_secrets(home: Path) -> None:
    (home / "karton.ini").write_text(
        f"[redis]\nhost = h\npassword = {SECRET}\nurl = redis://u:{SECRET}@h\n"
        f"[s3]\naddress = http://s3\nbucket = b\naccess_key = {SECRET}\nsecret_key = {SECRET}\n"
    )
    result = invoke("config", "--set", f"redis.username={SECRET}x")
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output.replace(f"{SECRET}x", "")  # a user name is no secret
    assert "[redis] password = ***  # " in result.output
    assert "redis://u:***@h" in result.output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[karton]\nconcurency_limit = 2\n", "did you mean 'concurrency_limit'"),
        ("[karton]\ntask_timeout = -1\n", "at least 0"),
        ("[karton:svc.alpha]\nretry_for = nope.Nope\n", "cannot import exception 'nope.Nope'"),
    ],
)
def test_config_exits_non_zero_on_invalid_values(home: Path, text: str, message: str) -> None:
    (home / "karton.ini").write_text(text)
    result = invoke("config", ALPHA)
    assert result.exit_code == 1
    assert message in result.stderr
    assert f"{home / 'karton.ini'}:2" in result.stderr
