"""One consumer process alone: CPU per delivery on a pre-filled queue, variants alternated.

``python -m benchmarks.consumer_cpu [--tasks N] [--rounds R] VARIANT [VARIANT ...]``

Each variant is ``name`` or ``name:KEY=VALUE,KEY=VALUE``: ``handler`` (``incr``, the
default, awaits one INCR on its own client as plain-await's does; ``noop``; ``sleep``,
one ``anyio.sleep`` of 1 us, i.e. one suspension and nothing else) and ``level``
(``[logging] level``, default INFO), ``publish`` (``[logging] enable_publish``, default 1),
``concurrency`` (default 64), ``keys`` (N: running_concurrency = keys on ``headers.key``,
N values, rerouted, as the keys scenario); any other ``KEY`` is put in the worker's environment, e.g. ``KARTON_KARTON_EVENT_LOOP=
asyncio`` or ``SPY=/tmp/stacks.txt`` (run the worker under ``py-spy record``, raw stacks;
its CPU figure is then meaningless).

For every round and variant: a fresh redis-server holds ``N`` Spawned tasks in the
consumer's queue (Karton 5 bodies, no router, no producer), the benchmark consumer worker
(concurrency 64) drains it, and its CPU (``/proc/<pid>/stat``) from registration to the
last delivery is divided by ``N``.  Variants alternate within a round, so a busy machine
slows them alike; the medians are what to compare.  A development tool, for A/B of
consumer changes: RESULTS.md comes from ``benchmarks.run`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from benchmarks._harness import cpu_seconds
from benchmarks._servers import RedisServer

IDENTITY = "bench.await"
REPO = Path(__file__).resolve().parent.parent


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    settings = dict(item.split("=", 1) for item in rest.split(",") if item)
    return name, settings


def _fill(client: redis.Redis, n: int, keys: int = 0) -> None:
    """``n`` Spawned tasks in the consumer's queue, as a router leaves them.

    With ``keys``, ``headers.key`` cycles through that many values (the keys scenario).
    """
    root = str(uuid.uuid4())
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        uid = str(uuid.uuid4())
        now = time.time()
        body = {
            "uid": uid, "root_uid": root, "parent_uid": None, "orig_uid": uid,
            "headers": {"type": "bench-await", "receiver": IDENTITY}
            | ({"key": f"k{i % keys}"} if keys else {}),
            "status": "Spawned",
            "last_update": now, "payload": {"sent": now}, "payload_persistent": {},
            "priority": "normal", "error": None,
        }  # fmt: skip
        pipe.set(f"karton.task:{uid}", json.dumps(body, sort_keys=True))
        pipe.rpush(f"karton.queue.normal:{IDENTITY}", uid)
    pipe.execute()


def _ini(path: Path, port: int, settings: dict[str, str]) -> None:
    path.write_text(
        f"[redis]\nhost = 127.0.0.1\nport = {port}\n"
        "[s3]\naddress = http://127.0.0.1:1\naccess_key = a\nsecret_key = b\nbucket = c\n"
        f"[logging]\nlevel = {settings.get('level', 'INFO')}\n"
        f"enable_publish = {settings.get('publish', '1')}\n"
        "[system]\nenable_gc = 0\nenable_task_tracking = 1\n"
        + (
            "[karton]\nrunning_concurrency = keys\nkey_arguments = headers.key\n"
            "reroute_on_concurrency_control = 1\n"
            if settings.get("keys")
            else ""
        )
    )


def _run_one(server: RedisServer, workdir: Path, n: int, settings: dict[str, str]) -> float:
    """CPU us per delivery of one drain of ``n`` tasks."""
    client = redis.Redis(port=server.port)
    client.flushall()
    _fill(client, n, int(settings.get("keys", "0")))
    ini = workdir / "bench.ini"
    _ini(ini, server.port, settings)
    handler = settings.get("handler", "incr")
    args = [
        "--config", str(ini), "--identity", IDENTITY,
        "--filters", json.dumps([{"type": "bench-await"}]),
        "--concurrency", settings.get("concurrency", "64"),
    ]  # fmt: skip
    if handler == "incr":
        args += ["--incr-url", server.url]
    elif handler == "sleep":
        args += ["--sleep-ms", "0.001"]
    elif handler != "noop":
        raise SystemExit(f"unknown handler {handler!r} (incr, noop or sleep)")
    own = {"handler", "level", "publish", "concurrency", "keys"}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.update({k: v for k, v in settings.items() if k not in own})
    spy = env.pop("SPY", "")
    prefix = ["py-spy", "record", "--nonblocking", "-r", "1000", "-f", "raw", "-o", spy, "--"]
    command = [*(prefix if spy else []), sys.executable, "-m", "benchmarks._workers.ak_consumer"]
    with open(workdir / "consumer.log", "w") as log:
        worker = subprocess.Popen([*command, *args], env=env, stderr=log, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not client.hexists("karton.binds", IDENTITY):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the consumer did not start; see {workdir / 'consumer.log'}")
            time.sleep(0.02)
        before = cpu_seconds(worker.pid)
        while sum(int(v) for v in client.hvals("karton.metrics.consumed")) < n:
            if worker.poll() is not None or time.monotonic() > deadline + 600:
                raise SystemExit(f"the consumer stopped early; see {workdir / 'consumer.log'}")
            time.sleep(0.01)
        return (cpu_seconds(worker.pid) - before) / n * 1e6
    finally:
        worker.send_signal(2 if spy else 15)
        worker.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="name[:KEY=VALUE,...]")
    parser.add_argument("--tasks", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    variants = [_variant(text) for text in args.variants]
    results: dict[str, list[float]] = {name: [] for name, _ in variants}
    with tempfile.TemporaryDirectory(prefix="consumer-cpu-") as tmp:
        workdir = Path(tmp)
        server = RedisServer(workdir)
        server.start()
        try:
            for round_no in range(args.rounds):
                for name, settings in variants:
                    us = _run_one(server, workdir, args.tasks, settings)
                    results[name].append(us)
                    print(f"round {round_no + 1}  {name:24s} {us:7.1f} us CPU per delivery")
        finally:
            server.stop()
    print()
    for name, values in results.items():
        print(f"{name:24s} median {statistics.median(values):7.1f} us  (min {min(values):.1f})")


if __name__ == "__main__":
    main()
