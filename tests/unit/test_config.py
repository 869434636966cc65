"""Config: layers and their precedence, provenance, Karton's accessors, typed views, options."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from asynckarton._errors import ConfigError
from asynckarton._settings._config import Config
from asynckarton._settings._declare import Option
from asynckarton._settings._flags import (
    add_consumer_arguments,
    add_options_to_parser,
    add_system_arguments,
    base_args_parser,
    base_config_from_args,
    consumer_config_from_args,
    options_from_args,
    system_config_from_args,
)
from asynckarton._settings._options import (
    KartonSettings,
    LoggingSettings,
    RedisSettings,
    S3Settings,
    SystemSettings,
)

LAYERS = ("etc", "user", "local")


def write(path: Path, text: str) -> Path:
    path.write_text(text.lstrip("\n"), encoding="utf-8")
    return path


def make(
    tmp_path: Path,
    *,
    files: dict[str, str] | None = None,
    environ: dict[str, str] | None = None,
    path: Path | None = None,
) -> Config:
    """A Config whose search paths are ``tmp_path/{etc,user,local}.ini`` (only those given)."""
    for name, text in (files or {}).items():
        write(tmp_path / f"{name}.ini", text)
    search = [str(tmp_path / f"{name}.ini") for name in LAYERS]
    return Config(path, environ=environ or {}, search_paths=search)


def karton_core_config(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], path: Path | None = None
) -> Any:
    """karton-core's Config over exactly ``environ`` (and ``path``), no default files."""
    from karton.core.config import Config as KartonConfig

    for name in list(os.environ):
        if name.startswith("KARTON_"):
            monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(KartonConfig, "SEARCH_PATHS", [])
    return KartonConfig(None if path is None else str(path), check_sections=False)


def ini_config(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return make(tmp_path, files={"local": text}, environ=environ)


# -- layers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("top", range(7))
def test_each_layer_beats_the_ones_below(tmp_path: Path, top: int) -> None:
    """Layers 0..top all set [redis] port; the highest one wins and is reported as source."""
    files = {name: f"[redis]\nport = {i}\n" for i, name in enumerate(LAYERS) if i <= top}
    environ: dict[str, str] = {}
    path = None
    if top >= 3:
        environ["KARTON_CONFIG_FILE"] = str(write(tmp_path / "envfile.ini", "[redis]\nport = 3\n"))
    if top >= 4:
        path = write(tmp_path / "explicit.ini", "[redis]\nport = 4\n")
    if top >= 5:
        environ["KARTON_REDIS_PORT"] = "5"
    config = make(tmp_path, files=files, environ=environ, path=path)
    if top >= 6:
        config.load_from_dict({"redis": {"port": 6}})

    expected_source = [
        f"{tmp_path / 'etc.ini'}:2",
        f"{tmp_path / 'user.ini'}:2",
        f"{tmp_path / 'local.ini'}:2",
        f"{tmp_path / 'envfile.ini'}:2",
        f"{tmp_path / 'explicit.ini'}:2",
        "env KARTON_REDIS_PORT",
        "arguments",
    ][top]
    assert config.getint("redis", "port") == top
    assert config.source("redis", "port") == expected_source


def test_layers_merge_option_by_option(tmp_path: Path) -> None:
    config = make(
        tmp_path,
        files={"etc": "[redis]\nhost = etc-host\nport = 1\n", "local": "[redis]\nport = 2\n"},
        environ={"KARTON_REDIS_DB": "3"},
    )
    assert config["redis"] == {"host": "etc-host", "port": "2", "db": "3"}


def test_no_files_at_all_is_an_empty_embedded_config(tmp_path: Path) -> None:
    config = make(tmp_path)
    assert config.sections() == []
    assert config.embedded


@pytest.mark.parametrize("value", ["", None])
def test_empty_or_unset_karton_config_file_is_ignored(tmp_path: Path, value: str | None) -> None:
    environ = {} if value is None else {"KARTON_CONFIG_FILE": value}
    config = make(tmp_path, environ=environ)
    # like Karton, the variable itself also lands in the config as [config] file
    assert config.sections() == ([] if value is None else ["config"])


def test_missing_karton_config_file_names_the_variable(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.ini")
    with pytest.raises(ConfigError) as info:
        make(tmp_path, environ={"KARTON_CONFIG_FILE": missing})
    assert "KARTON_CONFIG_FILE" in str(info.value)
    assert missing in str(info.value)


def test_missing_explicit_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        make(tmp_path, path=tmp_path / "nope.ini")


def test_unparsable_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        ini_config(tmp_path, "[redis]\nhost = a\nhost = b\n")
    assert str(tmp_path / "local.ini") in str(info.value)


def test_interpolation_and_default_section_work_like_configparser(tmp_path: Path) -> None:
    config = ini_config(
        tmp_path,
        """
[DEFAULT]
bucket = shared
[s3]
address = http://%(host)s:9000
host = minio
secret_key = 100%%
""",
    )
    assert config.get("s3", "address") == "http://minio:9000"
    assert config.get("s3", "secret_key") == "100%"
    assert config.get("s3", "bucket") == "shared"
    assert config.source("s3", "bucket") == f"{tmp_path / 'local.ini'}:2"


def test_bad_interpolation_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[redis\] password"):
        ini_config(tmp_path, "[redis]\npassword = 50%\n")


def test_same_values_as_karton_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = """
[DEFAULT]
shared = yes
[redis]
host = localhost
port=6379
[karton]
identity = karton.test
multi = first
  second
[gateway-server]
secret_key = %(shared)s-%%
"""
    path = write(tmp_path / "karton.ini", text)
    environ = {"KARTON_REDIS_SOCKET_TIMEOUT": "5", "KARTON_GATEWAY-SERVER_PASSWORD": "pw"}
    theirs = karton_core_config(monkeypatch, environ, path)
    ours = Config(path, environ=environ, search_paths=[])
    for section in ("redis", "karton", "gateway-server"):
        assert ours[section] == theirs[section]


# -- environment -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("KARTON_REDIS_HOST", ("redis", "host")),
        ("KARTON_REDIS_SOCKET_TIMEOUT", ("redis", "socket_timeout")),
        ("KARTON_GATEWAY-SERVER_SECRET_KEY", ("gateway-server", "secret_key")),
        ("KARTON_MY.SVC_OPT", ("my.svc", "opt")),
        ("KARTON_S3_SECRET_KEY", ("s3", "secret_key")),
        ("KARTON_redis_HOST", None),  # lower case never matches
        ("KARTON_REDIS", None),  # no option part
        ("KARTON_REDIS_", None),
        ("XKARTON_REDIS_HOST", None),
        ("KARTON_REDIS_HOST!", None),
    ],
)
def test_environment_names_map_like_karton(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, expected: tuple[str, str] | None
) -> None:
    config = make(tmp_path, environ={name: "v"})
    if expected is None:
        assert config.sections() == []
    else:
        assert config.get(*expected) == "v"
        assert config.source(*expected) == f"env {name}"
    theirs = karton_core_config(monkeypatch, {name: "v"})  # karton-core agrees
    assert (theirs.get(*expected) if expected else theirs._config) == ("v" if expected else {})


def test_environment_is_a_snapshot(tmp_path: Path) -> None:
    environ = {"KARTON_REDIS_HOST": "a"}
    config = make(tmp_path, environ=environ)
    environ["KARTON_REDIS_HOST"] = "b"
    assert config.get("redis", "host") == "a"
    assert config.environ["KARTON_REDIS_HOST"] == "a"


# -- provenance ------------------------------------------------------------------------------


def test_source_reports_file_and_line(tmp_path: Path) -> None:
    config = ini_config(
        tmp_path,
        """
# comment
[redis]
host = localhost

; another comment
port: 6379
description = first line
  continuation = not an option
[S3]
Address = x
""",
    )
    ini = tmp_path / "local.ini"
    assert config.source("redis", "host") == f"{ini}:3"
    assert config.source("redis", "port") == f"{ini}:6"
    assert config.source("redis", "description") == f"{ini}:7"
    assert config.source("S3", "address") == f"{ini}:10"  # options are lower-cased
    assert not config.has_option("redis", "continuation")


@pytest.mark.parametrize(
    ("setter", "expected"),
    [
        (lambda c: c.set("redis", "port", 1), "set"),
        (lambda c: c.set("redis", "port", 1, source="argument --port"), "argument --port"),
        (lambda c: c.load_from_dict({"redis": {"port": 1}}, source="cli"), "cli"),
        (lambda c: None, "default"),
    ],
)
def test_source_of_programmatic_values(tmp_path: Path, setter: Any, expected: str) -> None:
    config = make(tmp_path)
    setter(config)
    assert config.source("redis", "port") == expected


# -- Karton accessors ------------------------------------------------------------------------


def test_karton_accessors(tmp_path: Path) -> None:
    config = ini_config(tmp_path, "[redis]\nhost = h\n")
    config.load_from_dict({"karton": {"identity": "x", "persistent": None, "task_timeout": 5}})
    assert config.has_section("redis") and not config.has_section("s3")
    assert config.has_option("redis", "host") and not config.has_option("redis", "port")
    assert config.has_option("karton", "identity")
    assert not config.has_option("karton", "persistent")  # None means "not set"
    assert config.get("karton", "task_timeout") == 5  # native types are kept
    assert config.get("redis", "port", "fallback") == "fallback"
    assert config.sections() == ["redis", "karton"]
    section = config["redis"]
    section["host"] = "changed"
    assert config.get("redis", "host") == "h"  # __getitem__ returns a copy
    with pytest.raises(KeyError):
        config["nope"]


def test_append_to_list(tmp_path: Path) -> None:
    config = make(tmp_path)
    config.append_to_list("x", "items", 1)
    config.append_to_list("x", "items", 2)
    assert config.get("x", "items") == [1, 2]
    config.set("x", "scalar", "a")
    with pytest.raises(ConfigError, match="expected a list"):
        config.append_to_list("x", "scalar", 3)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        *[(word, True) for word in ("1", "yes", "true", "on", "TRUE", "Yes", " on ")],
        *[(word, False) for word in ("0", "no", "false", "off", "FALSE", "No", "OFF")],
        (True, True),
        (False, False),
        (1, True),
        (0, False),
    ],
)
def test_getboolean_accepts(tmp_path: Path, raw: object, expected: bool) -> None:
    config = make(tmp_path)
    config.set("s", "o", raw)
    assert config.getboolean("s", "o") is expected


@pytest.mark.parametrize("raw", ["2", "enabled", "", "y", "tru", 2, 1.0])
def test_getboolean_rejects(tmp_path: Path, raw: object) -> None:
    config = make(tmp_path)
    config.set("s", "o", raw, source="here")
    with pytest.raises(ConfigError) as info:
        config.getboolean("s", "o")
    assert (info.value.section, info.value.option, info.value.value) == ("s", "o", raw)
    assert info.value.source == "here"


@pytest.mark.parametrize(
    ("method", "raw", "expected"),
    [
        ("getint", "42", 42),
        ("getint", " -3 ", -3),
        ("getint", 7, 7),
        ("getint", 8.0, 8),
        ("getfloat", "1.5", 1.5),
        ("getfloat", "2", 2.0),
        ("getfloat", 3, 3.0),
    ],
)
def test_numbers_accept(tmp_path: Path, method: str, raw: object, expected: object) -> None:
    config = make(tmp_path)
    config.set("s", "o", raw)
    assert getattr(config, method)("s", "o") == expected


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("getint", "abc"),
        ("getint", "1.5"),
        ("getint", 1.5),
        ("getint", True),
        ("getfloat", "abc"),
        ("getfloat", "nan"),
        ("getfloat", "inf"),
        ("getfloat", [1]),
    ],
)
def test_numbers_reject(tmp_path: Path, method: str, raw: object) -> None:
    config = make(tmp_path)
    config.set("s", "o", raw)
    with pytest.raises(ConfigError, match=r"invalid (integer|number)"):
        getattr(config, method)("s", "o")


@pytest.mark.parametrize("method", ["getint", "getfloat", "getboolean"])
def test_typed_accessors_fall_back(tmp_path: Path, method: str) -> None:
    config = make(tmp_path)
    assert getattr(config, method)("s", "o") is None
    assert getattr(config, method)("s", "o", 5) == 5


def test_bad_value_from_a_file_names_option_value_and_line(tmp_path: Path) -> None:
    config = ini_config(tmp_path, "[redis]\nhost = h\nport = abc\n")
    with pytest.raises(ConfigError) as info:
        config.getint("redis", "port")
    message = str(info.value)
    assert "invalid integer" in message
    assert "[redis] port" in message
    assert "'abc'" in message
    assert f"{tmp_path / 'local.ini'}:3" in message


@pytest.mark.parametrize(
    ("environ", "extra", "source"),
    [
        ({"KARTON_REDIS_PORT": "abc"}, None, "env KARTON_REDIS_PORT"),
        ({}, {"redis": {"port": "abc"}}, "arguments"),
    ],
)
def test_bad_value_from_env_or_dict_names_its_source(
    tmp_path: Path, environ: dict[str, str], extra: dict[str, Any] | None, source: str
) -> None:
    config = make(tmp_path, environ=environ)
    if extra:
        config.load_from_dict(extra)
    with pytest.raises(ConfigError) as info:
        config.getint("redis", "port")
    assert "[redis] port" in str(info.value)
    assert "'abc'" in str(info.value)
    assert source in str(info.value)


def test_explain_masks_secrets(tmp_path: Path) -> None:
    config = ini_config(
        tmp_path,
        "[redis]\nurl = redis://user:hunter2@h:6379\npassword = hunter2\n"
        "[s3]\nsecret_key = hunter2\naccess_key = hunter2\nbucket = b\n",
    )
    text = "\n".join(config.explain())
    assert "hunter2" not in text
    assert "[s3] bucket = b  # " in text
    assert "redis://user:***@h:6379" in text


# -- [minio] ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("minio", "address"),
    [
        ("address = minio:9000\n", "https://minio:9000"),
        ("address = minio:9000\nsecure = 1\n", "https://minio:9000"),
        ("address = minio:9000\nsecure = false\n", "http://minio:9000"),
        ("address = http://minio:9000\nsecure = 1\n", "http://minio:9000"),
    ],
)
def test_minio_section_becomes_s3(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, minio: str, address: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="asynckarton.config"):
        config = ini_config(tmp_path, f"[minio]\nbucket = b\naccess_key = a\n{minio}")
    assert config.get("s3", "address") == address
    assert config.get("s3", "bucket") == "b"
    assert config.source("s3", "bucket") == f"{tmp_path / 'local.ini'}:2"
    assert "[minio]" in caplog.text
    assert config.has_s3


def test_minio_is_ignored_when_s3_exists(tmp_path: Path) -> None:
    config = ini_config(tmp_path, "[minio]\naddress = m\n[s3]\naddress = http://s3\n")
    assert config.get("s3", "address") == "http://s3"


# -- embedded and data_dir -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "environ", "embedded"),
    [
        ("", {}, True),
        ("[karton]\nidentity = x\n", {}, True),
        ("[redis]\nhost = h\n", {}, False),
        ("[redis]\nurl = redis://h\n", {}, False),
        ("[s3]\naddress = http://s3\n", {}, False),
        ("[s3]\nbucket = b\n", {}, True),
        ("[s3]\nbucket = b\n", {"AWS_ENDPOINT_URL": "http://s3"}, False),
        ("[s3]\nbucket = b\niam_auth = 1\n", {}, False),
        ("", {"AWS_ENDPOINT_URL": "http://s3"}, True),
        ("", {"KARTON_REDIS_HOST": "h"}, False),
        ("[redis]\nhost = h\n[asynckarton]\nembedded = yes\n", {}, True),
        ("[asynckarton]\nembedded = no\n", {}, False),
    ],
)
def test_embedded_detection(
    tmp_path: Path, text: str, environ: dict[str, str], embedded: bool
) -> None:
    assert ini_config(tmp_path, text, environ).embedded is embedded


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("", {"HOME": "/home/u"}, "/home/u/.local/share/asynckarton"),
        ("", {"HOME": "/home/u", "XDG_DATA_HOME": "/xdg"}, "/xdg/asynckarton"),
        ("", {"HOME": "/home/u", "XDG_DATA_HOME": "relative"}, "/home/u/.local/share/asynckarton"),
        ("[asynckarton]\ndata_dir = /srv/ak\n", {"HOME": "/home/u"}, "/srv/ak"),
        ("[asynckarton]\ndata_dir = ~/ak\n", {"HOME": "/home/u"}, "/home/u/ak"),
    ],
)
def test_data_dir(tmp_path: Path, text: str, environ: dict[str, str], expected: str) -> None:
    assert ini_config(tmp_path, text, environ).data_dir == Path(expected)


# -- typed views -----------------------------------------------------------------------------


def test_redis_settings_defaults(tmp_path: Path) -> None:
    settings = ini_config(tmp_path, "[redis]\nhost = h\n").redis_settings()
    assert settings == RedisSettings(host="h")
    assert (settings.port, settings.db, settings.socket_timeout) == (6379, 0, 30.0)
    assert (settings.username, settings.password, settings.url, settings.ssl) == (
        None,
        None,
        None,
        False,
    )


def test_redis_settings_values(tmp_path: Path) -> None:
    config = ini_config(
        tmp_path,
        "[redis]\nurl = rediss://h:1/2\npassword = p\nsocket_timeout = 0\nssl = on\nusername =\n",
    )
    settings = config.redis_settings()
    assert settings.url == "rediss://h:1/2"
    assert settings.host is None
    assert settings.socket_timeout is None  # 0 disables it, as in Karton
    assert settings.ssl is True
    assert settings.username is None  # empty means unset
    assert settings.password == "p"


@pytest.mark.parametrize(
    ("text", "option"),
    [
        ("port = abc\n", "port"),
        ("port = 0\n", "port"),
        ("port = 70000\n", "port"),
        ("db = -1\n", "db"),
        ("socket_timeout = -1\n", "socket_timeout"),
        ("ssl = maybe\n", "ssl"),
    ],
)
def test_redis_settings_validation(tmp_path: Path, text: str, option: str) -> None:
    config = ini_config(tmp_path, "[redis]\nhost = h\n" + text)
    with pytest.raises(ConfigError) as info:
        config.redis_settings()
    assert info.value.option == option
    assert info.value.source == f"{tmp_path / 'local.ini'}:3"


def test_redis_settings_when_not_configured(tmp_path: Path) -> None:
    config = make(tmp_path)
    assert not config.has_redis
    with pytest.raises(ConfigError, match="Redis is not configured"):
        config.redis_settings()


def test_s3_settings_from_ini(tmp_path: Path) -> None:
    config = ini_config(
        tmp_path,
        "[s3]\naddress = http://localhost:9000\naccess_key = a\nsecret_key = s\nbucket = karton\n",
    )
    assert config.s3_settings() == S3Settings(
        address="http://localhost:9000", access_key="a", secret_key="s", bucket="karton"
    )


def test_s3_settings_fall_back_to_aws_variables(tmp_path: Path) -> None:
    environ = {
        "AWS_ENDPOINT_URL": "https://aws.example",
        "AWS_ACCESS_KEY_ID": "aws-a",
        "AWS_SECRET_ACCESS_KEY": "aws-s",
    }
    config = ini_config(tmp_path, "[s3]\nbucket = b\naccess_key = ini-a\n", environ)
    settings = config.s3_settings()
    assert settings.address == "https://aws.example"
    assert settings.access_key == "ini-a"  # the option wins over the fallback
    assert settings.secret_key == "aws-s"


def test_s3_settings_iam_without_address(tmp_path: Path) -> None:
    settings = ini_config(tmp_path, "[s3]\nbucket = b\niam_auth = true\n").s3_settings()
    assert settings.address is None
    assert settings.iam_auth is True


@pytest.mark.parametrize(
    ("text", "environ", "match"),
    [
        ("[s3]\naddress = http://s3\n", {}, "bucket"),
        ("[s3]\nbucket = b\n", {}, "S3 is not configured"),
        ("[s3]\nbucket = b\naddress = s3:9000\n", {}, "http:// or https://"),
        ("[s3]\nbucket = b\n", {"AWS_ENDPOINT_URL": "s3:9000"}, "env AWS_ENDPOINT_URL"),
        ("[s3]\nbucket = b\naddress = http://s3\naccess_key = a\n", {}, "secret_key"),
        ("[s3]\nbucket = b\naddress = http://s3\niam_auth = perhaps\n", {}, "iam_auth"),
    ],
)
def test_s3_settings_validation(
    tmp_path: Path, text: str, environ: dict[str, str], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        ini_config(tmp_path, text, environ).s3_settings()


def test_karton_settings_defaults(tmp_path: Path) -> None:
    assert make(tmp_path).karton_settings() == KartonSettings()
    defaults = KartonSettings()
    assert defaults.shutdown_grace == 30.0
    assert defaults.lease_timeout == 60.0
    assert defaults.debug is False
    assert defaults.retry_for == ()


def test_karton_settings_values(tmp_path: Path) -> None:
    config = ini_config(
        tmp_path,
        """
[karton]
identity = karton.test
persistent = no
task_timeout = 1.5
concurrency_limit = 4
debug = yes
shutdown_grace = 0
max_retries = 0
retry_for = builtins.ValueError, mypkg.errors.Flaky,
retry_backoff = 0.5
retry_backoff_max = 10
lease_timeout = 2.5
""",
    )
    assert config.karton_settings() == KartonSettings(
        identity="karton.test",
        persistent=False,
        task_timeout=1.5,
        concurrency_limit=4,
        debug=True,
        shutdown_grace=0.0,
        max_retries=0,
        retry_for=("builtins.ValueError", "mypkg.errors.Flaky"),
        retry_backoff=0.5,
        retry_backoff_max=10.0,
        lease_timeout=2.5,
    )


def test_karton_task_timeout_zero_means_unlimited(tmp_path: Path) -> None:
    config = make(tmp_path, environ={"KARTON_KARTON_TASK_TIMEOUT": "0"})
    assert config.karton_settings().task_timeout is None


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("identity", "has space"),
        ("identity", "what?"),
        ("task_timeout", "-1"),
        ("task_timeout", "soon"),
        ("concurrency_limit", "0"),
        ("concurrency_limit", "1.5"),
        ("max_retries", "-1"),
        ("retry_for", "not a.name"),
        ("retry_for", "a..b"),
        ("lease_timeout", "0"),
        ("shutdown_grace", "-0.1"),
        ("persistent", "sometimes"),
    ],
)
def test_karton_settings_validation(tmp_path: Path, option: str, value: str) -> None:
    name = f"KARTON_KARTON_{option.upper()}"
    config = make(tmp_path, environ={name: value})
    with pytest.raises(ConfigError) as info:
        config.karton_settings()
    assert info.value.option == option
    assert info.value.source == f"env {name}"
    assert repr(value) in str(info.value)


def test_retry_for_from_a_list(tmp_path: Path) -> None:
    config = make(tmp_path)
    config.load_from_dict({"karton": {"retry_for": ["a.B", "C"]}})
    assert config.karton_settings().retry_for == ("a.B", "C")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, "INFO"), ("debug", "DEBUG"), (" Warning ", "WARNING"), ("10", "DEBUG"), (40, "ERROR")],
)
def test_logging_level(tmp_path: Path, raw: object, expected: str) -> None:
    config = make(tmp_path)
    config.load_from_dict({"logging": {"level": raw}})
    assert config.logging_settings() == LoggingSettings(level=expected, enable_publish=True)


@pytest.mark.parametrize("raw", ["verbose", "15", ""])
def test_logging_level_validation(tmp_path: Path, raw: str) -> None:
    config = make(tmp_path, environ={"KARTON_LOGGING_LEVEL": raw})
    with pytest.raises(ConfigError, match="KARTON_LOGGING_LEVEL"):
        config.logging_settings()


def test_logging_enable_publish(tmp_path: Path) -> None:
    config = ini_config(tmp_path, "[logging]\nenable_publish = 0\n")
    assert config.logging_settings().enable_publish is False


@pytest.mark.parametrize(("text", "expected"), [("", False), ("[signaling]\nstatus = 1\n", True)])
def test_signaling_status(tmp_path: Path, text: str, expected: bool) -> None:
    assert ini_config(tmp_path, text).signaling_status() is expected


def test_system_settings_defaults_match_karton_system(tmp_path: Path) -> None:
    from karton.system.system import SystemService

    settings = make(tmp_path).system_settings()
    assert settings == SystemSettings()
    assert settings.gc_interval == SystemService.GC_INTERVAL
    assert settings.task_dispatched_timeout == SystemService.TASK_DISPATCHED_TIMEOUT
    assert settings.task_started_timeout == SystemService.TASK_STARTED_TIMEOUT
    assert settings.task_crashed_timeout == SystemService.TASK_CRASHED_TIMEOUT
    assert settings.task_tracking_ttl == SystemService.TASK_TRACKING_TTL
    assert settings.crash_started_tasks_on_timeout is SystemService.CRASH_STARTED_TASKS_ON_TIMEOUT
    assert (settings.enable_gc, settings.enable_router, settings.enable_task_tracking) == (
        True,
        True,
        True,
    )
    assert settings.enable_null_version_deletion is False
    assert settings.task_spawned_timeout == 3600


def test_system_settings_values(tmp_path: Path) -> None:
    config = ini_config(
        tmp_path,
        """
[system]
gc_interval = 0.5
task_dispatched_timeout = 10
task_started_timeout = 20
task_crashed_timeout = 30
task_spawned_timeout = 40
enable_gc = 0
enable_router = off
crash_started_tasks_on_timeout = 1
enable_null_version_deletion = true
enable_task_tracking = no
task_tracking_ttl = 60
""",
    )
    assert config.system_settings() == SystemSettings(
        gc_interval=0.5,
        task_dispatched_timeout=10,
        task_started_timeout=20,
        task_crashed_timeout=30,
        task_spawned_timeout=40,
        enable_gc=False,
        enable_router=False,
        crash_started_tasks_on_timeout=True,
        enable_null_version_deletion=True,
        enable_task_tracking=False,
        task_tracking_ttl=60,
    )


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("gc_interval", "-1"),
        ("task_started_timeout", "abc"),
        ("task_tracking_ttl", "0"),
        ("task_tracking_ttl", "1.5"),
        ("enable_gc", "2"),
    ],
)
def test_system_settings_validation(tmp_path: Path, option: str, value: str) -> None:
    config = ini_config(tmp_path, f"[system]\n{option} = {value}\n")
    with pytest.raises(ConfigError) as info:
        config.system_settings()
    assert info.value.option == option
    assert info.value.source == f"{tmp_path / 'local.ini'}:2"


def test_secrets_are_not_in_repr() -> None:
    redis = RedisSettings(password="hunter2", url="redis://u:hunter2@h")
    s3 = S3Settings(address="http://s3", access_key="akey42", secret_key="hunter2", bucket="b")
    assert "hunter2" not in repr(redis)
    assert "hunter2" not in repr(s3)
    assert "akey42" not in repr(s3)
    assert "bucket='b'" in repr(s3)


def test_config_repr_shows_no_values(tmp_path: Path) -> None:
    config = ini_config(tmp_path, "[redis]\npassword = hunter2\n")
    assert "hunter2" not in repr(config)


# -- service options -------------------------------------------------------------------------


def test_option_names() -> None:
    option = Option("smol", "how_smol", int)
    assert option.env_var == "KARTON_SMOL_HOW_SMOL"
    assert option.cli_flag == "--smol-how-smol"
    assert option.dest == "smol_how_smol"
    dotted = Option("my-svc.x", "a_b")
    assert dotted.env_var == "KARTON_MY-SVC.X_A_B"
    assert dotted.cli_flag == "--my-svc-x-a-b"
    assert dotted.dest == "my_svc_x_a_b"


@pytest.mark.parametrize(
    ("section", "name", "kind"),
    [("my_svc", "x", str), ("Smol", "x", str), ("smol", "How", str), ("smol", "x", list)],
)
def test_option_declaration_is_checked(section: str, name: str, kind: Any) -> None:
    with pytest.raises((ConfigError, TypeError)):
        Option(section, name, kind)


OPTIONS = [
    Option("smol", "how_smol", int, default=10, help="size limit, 100% smol"),
    Option("smol", "ratio", float, default=0.5),
    Option("smol", "enabled", bool, default=True),
    Option("smol", "label", str, default="tiny"),
]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = base_args_parser("test")
    add_options_to_parser(parser, OPTIONS)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("ini", "environ", "argv", "expected", "source"),
    [
        ("", {}, "", [10, 0.5, True, "tiny"], "default"),
        (
            "[smol]\nhow_smol = 1\nratio = 1.5\nenabled = no\nlabel = ini\n",
            {},
            "",
            [1, 1.5, False, "ini"],
            "local.ini:2",
        ),
        (
            "[smol]\nhow_smol = 1\n",
            {
                "KARTON_SMOL_HOW_SMOL": "2",
                "KARTON_SMOL_RATIO": "2.5",
                "KARTON_SMOL_ENABLED": "off",
                "KARTON_SMOL_LABEL": "env",
            },
            "",
            [2, 2.5, False, "env"],
            "env KARTON_SMOL_HOW_SMOL",
        ),
        (
            "[smol]\nhow_smol = 1\nenabled = no\n",
            {"KARTON_SMOL_HOW_SMOL": "2"},
            "--smol-how-smol 3 --smol-ratio 3.5 --smol-enabled --smol-label cli",
            [3, 3.5, True, "cli"],
            "argument --smol-how-smol",
        ),
    ],
)
def test_option_round_trip(
    tmp_path: Path,
    ini: str,
    environ: dict[str, str],
    argv: str,
    expected: list[object],
    source: str,
) -> None:
    config = ini_config(tmp_path, ini, environ)
    options_from_args(config, OPTIONS, parse(argv.split()))
    assert [option.read(config) for option in OPTIONS] == expected
    assert config.source("smol", "how_smol").endswith(source)


def test_bool_option_negative_flag(tmp_path: Path) -> None:
    config = ini_config(tmp_path, "[smol]\nenabled = yes\n")
    options_from_args(config, OPTIONS, parse(["--no-smol-enabled"]))
    assert OPTIONS[2].read(config) is False
    assert config.source("smol", "enabled") == "argument --no-smol-enabled"


def test_option_bad_value_names_its_source(tmp_path: Path) -> None:
    config = make(tmp_path, environ={"KARTON_SMOL_HOW_SMOL": "lots"})
    with pytest.raises(ConfigError, match="env KARTON_SMOL_HOW_SMOL"):
        OPTIONS[0].read(config)


def test_option_help_mentions_env_and_survives_percent() -> None:
    parser = argparse.ArgumentParser()
    add_options_to_parser(parser, OPTIONS)
    text = parser.format_help()
    assert "KARTON_SMOL_HOW_SMOL" in text
    assert "100% smol" in text
    assert "--no-smol-enabled" in text


# -- Karton's flags --------------------------------------------------------------------------


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def test_base_flags(tmp_path: Path) -> None:
    parser = base_args_parser("svc")
    config = ini_config(tmp_path, "[karton]\nidentity = from-ini\ndebug = 0\n")
    base_config_from_args(config, parser.parse_args([]))
    assert config.get("karton", "identity") == "from-ini"  # None means not set
    assert config.get("karton", "debug") == "0"

    args = parser.parse_args(
        ["--config-file", "x.ini", "--identity", "cli", "--log-level", "DEBUG", "--debug"]
    )
    assert args.config_file == "x.ini"
    base_config_from_args(config, args)
    assert config.get("karton", "identity") == "cli"
    assert config.source("karton", "identity") == "argument --identity"
    assert config.logging_settings().level == "DEBUG"
    assert config.karton_settings().debug is True


def test_base_flags_match_karton() -> None:
    from karton.core import Karton

    parser = base_args_parser(None)
    parser.add_argument("--version", action="version", version="1")
    assert option_strings(parser) >= option_strings(Karton.args_parser()) - {
        "--non-persistent",
        "--task-timeout",
    }


def test_consumer_flags(tmp_path: Path) -> None:
    from karton.core import Karton

    parser = base_args_parser(None)
    parser.add_argument("--version", action="version", version="1")
    add_consumer_arguments(parser)
    assert option_strings(parser) >= option_strings(Karton.args_parser())

    config = make(tmp_path, environ={"KARTON_KARTON_PERSISTENT": "1"})
    consumer_config_from_args(config, parser.parse_args([]))
    assert config.karton_settings().persistent is True
    argv = "--non-persistent --task-timeout 2.5 --concurrency-limit 3 --grace 4 --max-retries 5"
    consumer_config_from_args(config, parser.parse_args(argv.split()))
    settings = config.karton_settings()
    assert (settings.persistent, settings.task_timeout, settings.concurrency_limit) == (
        False,
        2.5,
        3,
    )
    assert (settings.shutdown_grace, settings.max_retries) == (4.0, 5)
    assert config.source("karton", "shutdown_grace") == "argument --grace"


def test_system_flags_are_a_superset_of_karton_system() -> None:
    from karton.system.system import SystemService

    parser = base_args_parser("broker")
    parser.add_argument("--version", action="version", version="1")
    add_system_arguments(parser)
    theirs = option_strings(SystemService.args_parser())
    assert option_strings(parser) >= theirs


def test_system_flags_map_into_system_section(tmp_path: Path) -> None:
    parser = base_args_parser(None)
    add_system_arguments(parser)
    config = ini_config(tmp_path, "[system]\nenable_gc = 1\ngc_interval = 5\n")
    system_config_from_args(config, parser.parse_args([]))
    assert config.system_settings() == SystemSettings(gc_interval=5)  # nothing overridden

    argv = (
        "--setup-bucket --disable-gc --disable-router --gc-interval 7 "
        "--task-dispatched-timeout 1 --task-started-timeout 2 --task-crashed-timeout 3 "
        "--task-spawned-timeout 4 --crash-started-task-on-timeout"
    )
    system_config_from_args(config, parser.parse_args(argv.split()))
    assert config.system_settings() == SystemSettings(
        gc_interval=7,
        task_dispatched_timeout=1,
        task_started_timeout=2,
        task_crashed_timeout=3,
        task_spawned_timeout=4,
        enable_gc=False,
        enable_router=False,
        crash_started_tasks_on_timeout=True,
        setup_bucket=True,
    )
    assert config.source("system", "enable_gc") == "argument --disable-gc"
