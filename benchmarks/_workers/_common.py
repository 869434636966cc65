"""What the worker processes share: consumer arguments and logging set-up."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

LOG_FORMAT = "[%(asctime)s][%(levelname)s] %(message)s"


@dataclass(frozen=True)
class ConsumerArgs:
    config: str
    identity: str
    filters: list[dict[str, Any]]
    concurrency: int
    sleep: float  # seconds the handler awaits / sleeps
    download: bool  # download the task's "blob" resource
    incr_url: str  # Redis URL: the handler awaits one INCR on its own client ("" = none)
    start_log: str  # file to append "<sent> <handler start>" lines to ("" = none)


def consumer_args(description: str) -> ConsumerArgs:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="karton.ini path")
    parser.add_argument("--identity", required=True)
    parser.add_argument("--filters", required=True, help="JSON list of filters")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--sleep-ms", type=float, default=0.0)
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--incr-url", default="", help="INCR a counter on this Redis per task")
    parser.add_argument("--start-log", default="", help="append send/start stamps here")
    args = parser.parse_args()
    return ConsumerArgs(
        config=args.config,
        identity=args.identity,
        filters=json.loads(args.filters),
        concurrency=args.concurrency,
        sleep=args.sleep_ms / 1000.0,
        download=args.download,
        incr_url=args.incr_url,
        start_log=args.start_log,
    )


#: The counter the plain-await handlers increment (one round trip of their own).
COUNTER = "bench.await.counter"


def setup_logging() -> None:
    """INFO to stderr (redirected to a file by the driver), as asynckarton's CLI does.

    ``asynckarton run`` and ``Service.main()`` set logging up with this function: Karton's
    format on stderr, as karton-core services print it.
    """
    from asynckarton._services._run import configure_logging  # not in the kc workers

    configure_logging("INFO")
