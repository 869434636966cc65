"""asynckarton's system service (router; GC as configured), as its own process."""

from __future__ import annotations

import argparse

import anyio

from asynckarton import Config, SystemService
from asynckarton._services._run import event_loop_options, tune_gc
from benchmarks._workers._common import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    setup_logging()

    config = Config(args.config)

    async def run() -> None:
        service = SystemService(config)
        async with service:
            await service.run()

    tune_gc(config)  # as `asynckarton run` does, with its loop:
    anyio.run(run, backend_options=event_loop_options(config))


if __name__ == "__main__":
    main()
