"""A small, real analysis pipeline: what ``asynckarton demo`` runs, and reusable services.

Three services in the style of CERT Polska's karton-classifier and friends:

* :class:`Classifier` takes ``{"type": "sample", "kind": "raw"}``, reads the file's magic
  bytes and derives ``{"type": "sample", "stage": "recognized", "kind": <kind>, ...}``
  (``runnable``, ``archive``, ``document``, ``script``, ``text`` or ``unknown``);
* :class:`StringsExtractor` takes recognized ``runnable`` samples and reports their
  printable ASCII strings (at least 6 characters), extracted in a worker thread;
* :class:`Reporter` collects what the others found, per analysis (root uid).

They are ordinary services: ``asynckarton run asynckarton.demo:Classifier`` runs one
against a real deployment.  :func:`run_demo` wires all of them, plus a SystemService and
a producer, in one process on the embedded runtime.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio

from .._services._consumer import Consumer
from .._services._karton import Karton
from .._services._producer import Producer
from .._services._runtime import share_runtimes
from .._settings._config import Config
from .._wire._resource import LocalResource, RemoteResource, ResourceBase
from .._wire._task import Task
from ..system import SystemService
from ._magic import classify, extract_strings

__all__ = [
    "Classifier",
    "DemoResult",
    "Finding",
    "Reporter",
    "StringsExtractor",
    "classify",
    "demo_config",
    "extract_strings",
    "format_report",
    "run_demo",
    "sample_files",
]

HEAD_SIZE = 4096  # bytes the classifier looks at
STRINGS_MAX_BYTES = 16 << 20  # the strings extractor reads at most this much


# -- services ----------------------------------------------------------------------------


async def _read_head(resource: ResourceBase, limit: int) -> bytes:
    if not isinstance(resource, RemoteResource):
        raise TypeError(f"expected a stored resource, got {resource!r}")
    if resource.size is None:
        return (await resource.download())[:limit]
    if resource.size == 0:
        return b""
    return await resource.read_range(0, min(resource.size, limit) - 1)


class Classifier(Karton):
    """Recognise raw samples by their magic bytes (a tiny karton-classifier)."""

    identity = "karton.demo.classifier"
    filters = [{"type": "sample", "kind": "raw"}]

    async def process(self, task: Task) -> None:
        """Read the sample's first bytes and send the recognized sample on."""
        sample = task.get_resource("sample")
        headers, description = classify(await _read_head(sample, HEAD_SIZE))
        self.log.info("%s is %s", sample.name, description)
        derived = Task(
            {"type": "sample", "stage": "recognized", **headers},
            payload={"sample": sample, "magic": description},
        )
        await self.send_task(derived)


class StringsExtractor(Karton):
    """Extract printable ASCII strings from executables."""

    identity = "karton.demo.strings"
    filters = [{"type": "sample", "stage": "recognized", "kind": "runnable"}]
    min_length: ClassVar[int] = 6
    keep: ClassVar[int] = 100  # strings sent on (the count covers all of them)

    async def process(self, task: Task) -> None:
        """Download the sample (up to 16 MiB), extract strings off the loop, report them."""
        sample = task.get_resource("sample")
        if not isinstance(sample, RemoteResource):
            raise TypeError(f"expected a stored resource, got {sample!r}")
        data = bytearray()
        async for chunk in sample.iter_chunks():
            data += chunk
            if len(data) >= STRINGS_MAX_BYTES:
                break
        found = await anyio.to_thread.run_sync(extract_strings, bytes(data), self.min_length)
        self.log.info("%s: %d strings", sample.name, len(found))
        await self.send_task(
            Task(
                {"type": "analysis", "kind": "strings"},
                payload={"sample": sample, "strings": found[: self.keep], "count": len(found)},
            )
        )


@dataclass(slots=True)
class Finding:
    """One result the reporter received: who produced it, what it says, which tasks."""

    service: str
    summary: str
    consumed_uid: str | None  # the task the service processed
    produced_uid: str  # the task it sent
    received_uid: str  # the reporter's own copy
    headers: dict[str, Any]


def _summarize(task: Task) -> str:
    if task.headers.get("type") == "analysis":
        strings = task.get_payload("strings") or []
        shown = ", ".join(repr(s if len(s) <= 40 else s[:37] + "...") for s in strings[:4])
        more = ", ..." if len(strings) > 4 else ""
        return f"{task.get_payload('count', len(strings))} strings >= 6 chars: {shown}{more}"
    extra = " ".join(
        f"{k}={task.headers[k]}" for k in ("kind", "platform", "extension") if k in task.headers
    )
    return f"{task.get_payload('magic', '?')} -> {extra}"


class Reporter(Consumer):
    """Collect what the other demo services found, per analysis (root uid)."""

    identity = "karton.demo.reporter"
    filters = [{"type": "sample", "stage": "recognized"}, {"type": "analysis"}]
    concurrency_limit = 8

    def __init__(self, config: Config | None = None, identity: str | None = None) -> None:
        super().__init__(config, identity)
        self.findings: dict[str, list[Finding]] = {}
        self.samples: dict[str, ResourceBase] = {}
        self._changed: anyio.Event | None = None

    async def process(self, task: Task) -> None:
        """Record the finding (and log it, for deployments without a demo around)."""
        finding = Finding(
            service=str(task.headers.get("origin", "?")),
            summary=_summarize(task),
            consumed_uid=task.parent_uid,
            produced_uid=task.orig_uid or task.uid,
            received_uid=task.uid,
            headers=dict(task.headers),
        )
        self.findings.setdefault(task.root_uid, []).append(finding)
        if task.has_payload("sample"):
            self.samples.setdefault(task.root_uid, task.get_resource("sample"))
        self.log.info("[%s] %s: %s", task.root_uid, finding.service, finding.summary)
        if self._changed is not None:
            self._changed.set()

    def is_complete(self, root_uid: str) -> bool:
        """Whether an analysis is done: recognized, and strings too for executables."""
        found = self.findings.get(root_uid, [])
        kinds = [f.headers.get("kind") for f in found if f.headers.get("stage") == "recognized"]
        if not kinds:
            return False
        return kinds[0] != "runnable" or any(f.headers.get("type") == "analysis" for f in found)

    async def wait_complete(self, root_uids: Sequence[str], timeout: float) -> bool:
        """Wait until every analysis is complete; False if ``timeout`` passed first."""
        with anyio.move_on_after(timeout):
            while True:
                self._changed = anyio.Event()
                if all(self.is_complete(uid) for uid in root_uids):
                    return True
                await self._changed.wait()
        return False


# -- the demo ----------------------------------------------------------------------------


@dataclass(slots=True)
class DemoResult:
    """What :func:`run_demo` observed."""

    files: list[tuple[Path, str]]  # (file, root uid), in the order sent
    reporter: Reporter
    complete: bool
    elapsed: float
    data_dir: Path


def sample_files() -> list[Path]:
    """The sample files shipped in ``asynckarton/samples``."""
    folder = Path(__file__).with_name("samples")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def demo_config(data_dir: Path, log_level: str = "WARNING") -> Config:
    """An embedded, self-contained configuration (no ini files, no ``KARTON_*`` variables).

    ``log_level`` becomes ``[logging] level``, which the services' loggers follow.
    """
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KARTON_")}
    config = Config(environ=environ, search_paths=())
    config.set("asynckarton", "embedded", "1", source="demo")
    config.set("asynckarton", "data_dir", str(data_dir), source="demo")
    config.set("logging", "enable_publish", "0", source="demo")
    config.set("logging", "level", log_level.upper(), source="demo")
    config.set("asynckarton", "share_embedded", "0", source="demo")  # one process
    return config


async def run_demo(files: Sequence[Path], config: Config, timeout: float = 30.0) -> DemoResult:
    """Send one raw sample task per file through the whole pipeline and collect reports."""
    reporter = Reporter(config)
    services: list[Consumer | SystemService] = [
        SystemService(config),
        Classifier(config),
        StringsExtractor(config),
        reporter,
    ]
    started = time.monotonic()
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(share_runtimes(services))  # one pool for all
        for service in services:
            await stack.enter_async_context(service)
        producer = await stack.enter_async_context(Producer(config, identity="karton.demo.cli"))
        async with anyio.create_task_group() as group:
            for service in services:
                await group.start(service.run)
            tasks = [
                Task({"type": "sample", "kind": "raw"},
                     payload={"sample": LocalResource(path.name, path=path)})
                for path in files
            ]  # fmt: skip
            await producer.send_tasks(tasks)
            complete = await reporter.wait_complete([t.root_uid for t in tasks], timeout)
            for service in services:
                service.stop(grace=5.0)
    return DemoResult(
        files=[(path, task.root_uid) for path, task in zip(files, tasks, strict=True)],
        reporter=reporter,
        complete=complete,
        elapsed=time.monotonic() - started,
        data_dir=config.data_dir,
    )


def _file_report(path: Path, root_uid: str, reporter: Reporter) -> list[str]:
    sample = reporter.samples.get(root_uid)
    facts = f"{sample.size} bytes, sha256 {sample.sha256}" if sample else "no report"
    lines = [f"{path.name}  ({facts})", f"  analysis (root uid)      {root_uid}"]
    for finding in reporter.findings.get(root_uid, []):
        consumed = Task.fquid_to_uid(finding.consumed_uid or "?")
        sent = Task.fquid_to_uid(finding.produced_uid)
        lines.append(f"  {finding.service:<24} {finding.summary}")
        lines.append(f"  {'':<24} processed task {consumed}, sent task {sent}")
    received = [Task.fquid_to_uid(f.received_uid) for f in reporter.findings.get(root_uid, [])]
    status = "complete" if reporter.is_complete(root_uid) else "INCOMPLETE"
    lines.append(f"  {Reporter.identity:<24} collected {len(received)} result(s), {status}")
    lines.extend(f"  {'':<24} received task {uid}" for uid in received)
    return lines


def format_report(result: DemoResult) -> str:
    """Render a readable per-file report of what every service did."""
    lines = ["(task uids are shown without their '{root}:' prefix)", ""]
    for path, root_uid in result.files:
        lines.extend(_file_report(path, root_uid, result.reporter))
        lines.append("")
    done = sum(1 for _, uid in result.files if result.reporter.is_complete(uid))
    lines.append(f"{done}/{len(result.files)} file(s) fully reported in {result.elapsed:.2f} s")
    return "\n".join(lines)
