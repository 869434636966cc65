"""``[redis]`` Sentinel options: parsing, validation, and the connector they build."""

from __future__ import annotations

import pytest

from asynckarton import Config, ConfigError
from asynckarton.backend import ServerConnector
from asynckarton.backend._connect import FastSentinelConnection, parse_sentinels


def test_sentinel_addresses_are_parsed() -> None:
    assert parse_sentinels("10.0.0.1:26379, h2:26380,h3,[::1]:5000") == (
        ("10.0.0.1", 26379),
        ("h2", 26380),
        ("h3", 26379),
        ("::1", 5000),
    )


@pytest.mark.parametrize("value", ["a:1,,b:2", "a:x", "a:0", ":26379", "a:70000"])
def test_bad_sentinel_addresses_name_the_option(value: str) -> None:
    with pytest.raises(ConfigError, match=r"\[redis\] sentinels"):
        parse_sentinels(value)


def test_sentinel_settings_reach_the_connector_and_mask_the_password() -> None:
    config = Config(search_paths=[], environ={})
    config.load_from_dict(
        {
            "redis": {
                "sentinel_master": "mymaster",
                "sentinels": "s1:26379,s2:26379",
                "sentinel_password": "hunter2",
                "password": "master-secret",
                "db": "2",
            }
        }
    )
    assert config.has_redis and not config.embedded
    connector = ServerConnector.from_settings(config.redis_settings())
    assert connector.sentinel_master == "mymaster"
    assert connector.sentinels == (("s1", 26379), ("s2", 26379))
    assert connector.sentinel_password == "hunter2"
    assert connector.address == "redis+sentinel://s1:26379,s2:26379/mymaster/2"
    assert "hunter2" not in repr(connector) and "master-secret" not in repr(connector)


def test_a_master_name_without_sentinels_is_refused() -> None:
    with pytest.raises(ConfigError, match="no sentinels"):
        ServerConnector(sentinel_master="mymaster")
    with pytest.raises(ConfigError, match="sentinel_master"):
        ServerConnector(sentinels=(("s1", 26379),))


@pytest.mark.anyio
async def test_sentinel_clients_pack_with_hiredis_and_close() -> None:
    connector = ServerConnector(sentinel_master="m", sentinels=(("127.0.0.1", 1),))
    named, blocking = connector.named("svc"), connector.blocking()
    for client in (connector.pool(), named, blocking):
        assert client.connection_pool.connection_class is FastSentinelConnection
    await named.aclose()
    await blocking.aclose()
    await connector.aclose()
