"""Run the benchmark suite: ``python -m benchmarks.run [--smoke] [--strict]``.

Starts its own redis-server and SeaweedFS S3 server on free loopback ports, runs every
scenario for asynckarton and karton-core 5.9.1 (see ``benchmarks/scenarios.py``), prints
the tables and writes ``benchmarks/RESULTS.md`` (full mode; ``--output`` to choose).

Exit status: 1 if any scenario errored; with ``--strict`` (full mode only) also 1 when
a speed target is missed; otherwise 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from benchmarks import report
from benchmarks._harness import Context, ping_rtt_us, s3_rates
from benchmarks._servers import servers
from benchmarks.scenarios import Result, plan

HERE = Path(__file__).resolve().parent


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few hundred tasks per scenario: checks the suite, not speed",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a target is missed (full mode)"
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios (plain,plain-await,fanout,binds,io,resource,latency,"
        "plain-await-warning,plain-quiet,router,producer,pending,idle,soak)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="report path (default: benchmarks/RESULTS.md in full mode, none in smoke mode)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also dump raw results")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="attach py-spy to every worker and write raw stacks to this directory "
        "(slows the run: use for diagnosis, not for RESULTS.md)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (worker logs) afterwards"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    steps = plan(only, smoke=args.smoke)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t0 = time.monotonic()
    results: list[Result] = []
    with servers(keep=args.keep) as (redis_server, s3_server, workdir):
        ctx = Context(redis_server.port, s3_server.url, workdir, smoke=args.smoke)
        ctx.profile_dir = args.profile
        ctx.s3_pid = s3_server.process.pid if s3_server.process else None
        print(f"redis {redis_server.url}  s3 {s3_server.url}  work {workdir}", flush=True)
        conditions = {
            "rtt_start": ping_rtt_us(ctx.redis_url),
            "load_start": os.getloadavg(),
            "s3_start": s3_rates(s3_server.url, 20 if args.smoke else 100),
        }
        for step in steps:
            t = time.monotonic()
            print(f"-> {step.scenario:<9} {step.system:<20}", end=" ", flush=True)
            load = os.getloadavg()[0]
            try:
                ran = step.run(ctx)
                step_results = ran if isinstance(ran, list) else [ran]
            except Exception as exc:  # noqa: BLE001 - any failure is reported, run goes on
                error = f"{type(exc).__name__}: {exc}"
                step_results = [Result(step.scenario, step.system, error=error)]
                print(
                    f"ERROR after {time.monotonic() - t:.1f}s\n{traceback.format_exc()}", flush=True
                )
            else:
                for result in step_results:
                    rate = result.rate if result.unit else result.redis_bytes_per_task or 0
                    print(
                        f"{rate:>10,.1f} {result.unit or 'Redis B/task':<15} "
                        f"({result.seconds:.1f}s measured, {time.monotonic() - t:.1f}s wall)",
                        flush=True,
                    )
            for result in step_results:
                result.extra["load"] = (load, os.getloadavg()[0])
                results.append(result)
        conditions["rtt_end"] = ping_rtt_us(ctx.redis_url)
        conditions["load_end"] = os.getloadavg()
        conditions["s3_end"] = s3_rates(s3_server.url, 20 if args.smoke else 100)
    wall = time.monotonic() - t0
    text = report.render(
        results,
        command=command,
        smoke=args.smoke,
        started=started,
        wall_seconds=wall,
        conditions=conditions,
    )
    print()
    print(text)
    output = args.output or (None if args.smoke else HERE / "RESULTS.md")
    if output is not None:
        output.write_text(text)
        print(f"wrote {output}")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))
    errors = [r for r in results if r.error]
    if errors:
        print(f"{len(errors)} scenario run(s) failed", file=sys.stderr)
        return 1
    missed = [t for t in report.targets(results) if t.ok is False]
    if missed:
        print(f"{len(missed)} target(s) missed: " + ", ".join(t.name for t in missed))
        if args.strict and not args.smoke:
            return 1
    print(f"done in {wall:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
