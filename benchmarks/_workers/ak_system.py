"""asynckarton's system service (router; GC as configured), as its own process."""

from __future__ import annotations

import argparse

import anyio

from asynckarton import Config, SystemService
from benchmarks._workers._common import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    setup_logging()

    async def run() -> None:
        service = SystemService(Config(args.config))
        async with service:
            await service.run()

    anyio.run(run)


if __name__ == "__main__":
    main()
