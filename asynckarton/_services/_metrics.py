"""Prometheus metrics (placeholder: filled in below)."""

from __future__ import annotations

__all__ = ["last_loop_lag"]

_LOOP_LAG = [0.0]


def last_loop_lag() -> float:
    """The event-loop lag the consumers' probe measured last (seconds)."""
    return _LOOP_LAG[0]
