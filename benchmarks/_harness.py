"""Driver-side plumbing: configuration, worker processes, Redis measurements.

The driver never produces or consumes itself: it starts worker processes
(``benchmarks/_workers``), watches Redis, and reads ``/proc`` for their memory.  Every
command the driver sends after ``CONFIG RESETSTAT`` goes through :class:`CountingRedis`
so it can be subtracted from the server's ``INFO commandstats`` exactly.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from benchmarks._servers import ACCESS_KEY, BUCKET, SECRET_KEY

REPO = Path(__file__).resolve().parent.parent
KARTON_SYSTEM = str(Path(sys.executable).with_name("karton-system"))

#: Commands the driver itself uses around a measurement window (never counted).
_ADMIN_COMMANDS = frozenset({"config|resetstat", "info", "config|get"})


class ScenarioError(RuntimeError):
    """A scenario could not complete (timeout, a worker died, lost tasks)."""


@dataclass
class Context:
    """Where the servers are and how the run is configured."""

    redis_port: int
    s3_url: str
    workdir: Path
    smoke: bool
    publish: bool = True
    s3_pid: int | None = None  # the S3 server process, whose CPU the resource runs report
    tracking: bool = True
    log_level: str = ""  # [logging] level for both systems ("" = their default, INFO)
    timeout_scale: float = 1.0
    profile_dir: Path | None = None  # attach py-spy to every worker, write raw stacks here
    config_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config_path = self.workdir / "bench.ini"
        self.write_config()
        (self.workdir / "logs").mkdir(exist_ok=True)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def write_config(self) -> None:
        """One ini for both systems (neither reads a file named bench.ini by itself)."""
        self.config_path.write_text(
            "[redis]\n"
            "host = 127.0.0.1\n"
            f"port = {self.redis_port}\n"
            "[s3]\n"
            f"address = {self.s3_url}\n"
            f"access_key = {ACCESS_KEY}\n"
            f"secret_key = {SECRET_KEY}\n"
            f"bucket = {BUCKET}\n"
            "[logging]\n"
            f"enable_publish = {int(self.publish)}\n"
            + (f"level = {self.log_level}\n" if self.log_level else "")
            + "[system]\n"
            "enable_gc = 0\n"
            f"enable_task_tracking = {int(self.tracking)}\n"
        )

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """Rewrite the ini with log publishing and task tracking off, for one run."""
        saved = self.publish, self.tracking
        self.publish = self.tracking = False
        self.write_config()
        try:
            yield
        finally:
            self.publish, self.tracking = saved
            self.write_config()

    @contextmanager
    def logging_level(self, level: str) -> Iterator[None]:
        """Rewrite the ini with ``[logging] level``, for one run."""
        saved, self.log_level = self.log_level, level
        self.write_config()
        try:
            yield
        finally:
            self.log_level = saved
            self.write_config()

    def client(self) -> CountingRedis:
        return CountingRedis(self.redis_url)


def resp_size(value: Any) -> int:
    """Bytes of ``value`` encoded in RESP2 (a command's arguments, or a decoded reply).

    Replies are estimated from what redis-py decoded: a status reply (``+OK``) is counted
    as a bulk string, a few bytes more than the server sent.
    """
    if value is None:
        return 5  # $-1\r\n
    if isinstance(value, int):
        return len(str(value)) + 3
    if isinstance(value, (list, tuple)):
        return len(str(len(value))) + 3 + sum(resp_size(item) for item in value)
    data = value if isinstance(value, bytes) else str(value).encode()
    return len(str(len(data))) + 5 + len(data)


class CountingRedis:
    """A sync Redis client that counts the commands it sends, by commandstats name.

    It also adds up the RESP bytes of those commands and of their replies (``net_in``,
    ``net_out``, as Redis's ``total_net_input_bytes``/``total_net_output_bytes`` count
    them), so the driver's own traffic can be subtracted from the server's.
    """

    def __init__(self, url: str) -> None:
        self.raw = redis.Redis.from_url(url, decode_responses=True)
        self.counts: collections.Counter[str] = collections.Counter()
        self.net_in = self.net_out = 0

    def reset_counts(self) -> None:
        self.counts.clear()
        self.net_in = self.net_out = 0

    def call(self, *args: Any) -> Any:
        self.counts[str(args[0]).lower()] += 1
        reply = self.raw.execute_command(*args)  # type: ignore[no-untyped-call]
        self.net_in += resp_size(list(args))
        self.net_out += resp_size(reply)
        return reply

    def pipeline_calls(self, calls: Sequence[Sequence[Any]]) -> list[Any]:
        pipe = self.raw.pipeline(transaction=False)
        for args in calls:
            self.counts[str(args[0]).lower()] += 1
            self.net_in += resp_size(list(args))
            pipe.execute_command(*args)  # type: ignore[no-untyped-call]
        result: list[Any] = pipe.execute()
        self.net_out += sum(resp_size(reply) for reply in result)
        return result

    # -- measurements (admin commands: excluded from counts by name) -------------------

    def reset_stats(self) -> None:
        self.raw.config_resetstat()
        self.reset_counts()

    def commandstats(self) -> dict[str, int]:
        """Calls per command since RESETSTAT, minus the driver's own commands."""
        info = self.raw.info("commandstats")
        calls: dict[str, int] = {}
        for key, value in info.items():
            name = key.removeprefix("cmdstat_")
            if name in _ADMIN_COMMANDS:
                continue
            count = int(value["calls"]) - self.counts.get(name, 0)
            if count > 0:
                calls[name] = count
        return calls

    def net_bytes(self) -> tuple[int, int]:
        """Bytes Redis received and sent since RESETSTAT, minus the driver's own traffic.

        Client traffic only (``total_net_input_bytes`` / ``total_net_output_bytes``; the
        replication counters are separate).  The INFO requests themselves (a few dozen
        bytes) are left in.
        """
        info = self.raw.info("stats")
        received = int(info["total_net_input_bytes"]) - self.net_in
        sent = int(info["total_net_output_bytes"]) - self.net_out
        return max(received, 0), max(sent, 0)

    def cpu_seconds(self) -> float:
        """CPU time the redis-server process has used (user + sys)."""
        info = self.raw.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def used_memory(self) -> int:
        return int(self.raw.info("memory")["used_memory"])

    def flush(self) -> None:
        self.raw.flushall()


# -- processes ------------------------------------------------------------------------


@dataclass
class Worker:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    finite: bool = False  # expected to exit (with status 0) on its own, like producers

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


def _status_kib(pid: int, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds_exact(pid: int) -> float:
    """CPU seconds ``pid`` has run so far, to the nanosecond (0 if it is gone).

    The sum of its threads' ``/proc/<pid>/task/<tid>/schedstat`` run times: exact where
    ``/proc/<pid>/stat`` counts 10 ms ticks (what idle processes use in a minute).  Threads
    that exited are not counted (the workers' threads live as long as they do).
    """
    total = 0
    for path in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


class CpuMeter:
    """CPU seconds used by groups of workers and by redis-server between two points."""

    def __init__(
        self,
        client: CountingRedis,
        groups: dict[str, list[Worker]],
        servers: dict[str, int] | None = None,
    ) -> None:
        self.client = client
        self.groups = groups
        self.servers = servers or {}  # name -> pid of another server process to meter
        self.start: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        now = {name: sum(cpu_seconds(w.pid) for w in ws) for name, ws in self.groups.items()}
        now["redis"] = self.client.cpu_seconds()
        for name, pid in self.servers.items():
            now[name] = cpu_seconds(pid)
        return now

    def begin(self) -> None:
        self.start = self._read()

    def end(self) -> dict[str, float]:
        """CPU seconds per group since :meth:`begin`."""
        return {name: value - self.start[name] for name, value in self._read().items()}


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the process's peak resident set size."""
    return _status_kib(pid, "VmHWM")


def rss_kib(pid: int) -> int:
    """VmRSS: the current resident set size."""
    return _status_kib(pid, "VmRSS")


class Processes:
    """Worker processes of one scenario run; all are stopped when the block exits."""

    def __init__(self, ctx: Context, run_name: str) -> None:
        self.ctx = ctx
        self.run_name = run_name
        self.workers: list[Worker] = []
        self.profilers: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, argv: Sequence[str], *, finite: bool = False) -> Worker:
        log = self.ctx.workdir / "logs" / f"{self.run_name}.{name}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        env.pop("KARTON_CONFIG_FILE", None)
        with open(log, "wb") as out:
            process = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=self.ctx.workdir,
                env=env, start_new_session=True,
            )  # fmt: skip
        worker = Worker(name, process, log, finite)
        self.workers.append(worker)
        if self.ctx.profile_dir is not None:
            self._profile(worker)
        return worker

    def _profile(self, worker: Worker) -> None:
        """Sample ``worker`` with py-spy (non-blocking, 100 Hz) until it exits or stops."""
        assert self.ctx.profile_dir is not None
        self.ctx.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.ctx.profile_dir / f"{self.run_name}.{worker.name}.txt"
        spy = str(Path(sys.executable).with_name("py-spy"))
        self.profilers.append(subprocess.Popen(
            [spy, "record", "--pid", str(worker.pid), "--rate", "100", "--format", "raw",
             "--nonblocking", "--idle", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip

    def python(self, name: str, module: str, *args: str) -> Worker:
        argv = [sys.executable, "-m", f"benchmarks._workers.{module}", *args]
        return self.spawn(name, argv, finite=module == "producer")

    def check(self) -> None:
        """Raise if a worker died (finite workers may exit with status 0)."""
        for worker in self.workers:
            code = worker.process.poll()
            if code is None or (code == 0 and worker.finite):
                continue
            raise ScenarioError(f"worker {worker.name} exited with {code}:\n{worker.tail()}")

    def tails(self, lines: int = 4) -> str:
        return "\n".join(f"--- {w.name}:\n{w.tail(lines)}" for w in self.workers)

    def stop_all(self) -> None:
        """SIGKILL every worker: everything measured was read before, and karton-core's
        graceful shutdown would wait out a 5 s BLPOP."""
        for spy in self.profilers:  # first let py-spy write what it sampled
            spy.send_signal(signal.SIGINT)
        for spy in self.profilers:
            try:
                spy.wait(timeout=15)
            except subprocess.TimeoutExpired:
                spy.kill()
        for worker in self.workers:
            if worker.alive():
                _signal(worker, signal.SIGKILL)
        for worker in self.workers:
            worker.process.wait(timeout=10)


def _signal(worker: Worker, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, sig)  # its own session: children go too


@contextmanager
def processes(ctx: Context, run_name: str) -> Iterator[Processes]:
    procs = Processes(ctx, run_name)
    try:
        yield procs
    finally:
        procs.stop_all()


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    procs: Processes | None = None,
    interval: float = 0.05,
) -> None:
    """Poll ``predicate`` until true; raise ScenarioError on timeout or a dead worker."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if procs is not None:
            procs.check()
        if time.monotonic() > deadline:
            tails = f"\n{procs.tails()}" if procs is not None else ""
            raise ScenarioError(f"timed out after {timeout:.0f}s waiting for {what}{tails}")
        time.sleep(interval)


def producer_result(worker: Worker, timeout: float) -> dict[str, Any]:
    """Wait for a producer worker and parse the JSON line it printed last."""
    try:
        worker.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ScenarioError(f"producer still running after {timeout:.0f}s") from None
    if worker.process.returncode != 0:
        raise ScenarioError(f"producer failed ({worker.process.returncode}):\n{worker.tail()}")
    for line in reversed(worker.log.read_text().splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise ScenarioError(f"producer printed no result:\n{worker.tail()}")


# -- reading results out of Redis ------------------------------------------------------


@dataclass
class Deliveries:
    """Finished consumer copies found in Redis after a run."""

    finished: int
    crashed: int
    latencies: list[float]  # seconds, send -> Finished
    first_sent: float
    last_finish: float


def scan_deliveries(client: CountingRedis, receivers: set[str]) -> Deliveries:
    """SCAN every task key and collect the Finished copies received by ``receivers``."""
    raw = client.raw
    finished = crashed = 0
    latencies: list[float] = []
    first_sent, last_finish = float("inf"), 0.0
    for keys in _scan_batches(raw, "karton.task:*"):
        for body in raw.mget(keys):
            if body is None:
                continue
            doc = orjson.loads(body)
            if doc.get("headers", {}).get("receiver") not in receivers:
                continue
            status = doc.get("status")
            if status == "Crashed":
                crashed += 1
            if status != "Finished":
                continue
            finished += 1
            sent = float(doc["payload"]["sent"])
            done = float(doc["last_update"])
            latencies.append(done - sent)
            first_sent = min(first_sent, sent)
            last_finish = max(last_finish, done)
    return Deliveries(finished, crashed, latencies, first_sent, last_finish)


def _scan_batches(raw: redis.Redis, pattern: str) -> Iterator[list[str]]:
    cursor = 0
    while True:
        cursor, keys = raw.scan(cursor, match=pattern, count=2000)
        if keys:
            yield [str(key) for key in keys]
        if cursor == 0:
            return


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def ping_rtt_us(url: str, count: int = 1000) -> float:
    """Median round trip of a sync PING to ``url``, in microseconds."""
    client = redis.Redis.from_url(url)
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        client.ping()
        samples.append((time.perf_counter() - start) * 1e6)
    client.close()
    return percentile(samples, 50)


def s3_rates(url: str, count: int = 100, size: int = 4096) -> tuple[float, float]:
    """Sequential boto3 PUTs/s and GETs/s of ``size``-byte objects against ``url``."""
    import boto3  # type: ignore[import-untyped]

    s3 = boto3.client(
        "s3", endpoint_url=url, aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
    )  # fmt: skip
    body = os.urandom(size)
    start = time.perf_counter()
    for i in range(count):
        s3.put_object(Bucket=BUCKET, Key=f"rate-probe-{i}", Body=body)
    puts = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(count):
        s3.get_object(Bucket=BUCKET, Key=f"rate-probe-{i}")["Body"].read()
    gets = count / (time.perf_counter() - start)
    return puts, gets


def bind_json(filters: list[dict[str, Any]], *, is_async: bool) -> str:
    """A Karton 5 bind value (docs/wire-format.md) for an identity with no running process."""
    return json.dumps(
        {"filters": filters, "info": None, "is_async": is_async, "persistent": True,
         "service_version": None, "version": "5.9.1"},
        sort_keys=True,
    )  # fmt: skip
