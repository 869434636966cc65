"""The idle grid: a consumer's upkeep rounds and its blocking pop end together."""

from __future__ import annotations

import time

import pytest

from asynckarton._services._upkeep import BIND_CHECK_INTERVAL, aligned_wait, idle_round


def _offset(wait: float, interval: float) -> float:
    """Where ``wait`` from now ends on a grid of ``interval`` (0 <= result < interval)."""
    return (time.time() + wait) % interval


@pytest.mark.parametrize("interval", [0.3, 10.0, 15.0])
def test_waits_end_on_one_grid(interval: float) -> None:
    round_wait = aligned_wait(interval)
    pop_wait = aligned_wait(interval, 25.0)
    assert 0.05 <= round_wait <= interval + 0.05
    assert 25.0 - interval <= pop_wait <= 25.0
    assert abs(_offset(round_wait, interval) - _offset(pop_wait, interval)) < 0.01 or (
        abs(abs(_offset(round_wait, interval) - _offset(pop_wait, interval)) - interval) < 0.01
    )


def test_a_wait_never_exceeds_its_limit() -> None:
    # A socket timeout shorter than a round: the pop waits its limit, off the grid.
    assert aligned_wait(15.0, 0.02) == pytest.approx(0.02, abs=1e-6)


def test_idle_rounds_follow_the_lease_and_the_bind_check() -> None:
    assert idle_round(60.0) == BIND_CHECK_INTERVAL
    assert idle_round(3.0) == pytest.approx(1.0)  # a third of a short lease
    assert idle_round(0.3) == 0.2


def test_blocking_waits_stay_within_the_socket_timeout() -> None:
    """A wait longer than the read timeout would end in a TimeoutError, not a reply."""
    from asynckarton.backend import KartonBackend, ServerConnector

    short = ServerConnector(port=1, socket_timeout=5.0).named("x")
    default = ServerConnector(port=1).named("x")
    unbounded = ServerConnector(port=1, socket_timeout=None).named("x")
    assert KartonBackend.block_limit(short, 24.0) == pytest.approx(4.0)
    assert KartonBackend.block_limit(default, 24.0) == pytest.approx(24.0)
    assert KartonBackend.block_limit(unbounded, 24.0) == 24.0
