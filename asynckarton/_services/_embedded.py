"""The embedded default across processes: a system service shares its in-process Redis.

The rule, in two sentences: on the embedded default, a system service serves its
in-process Redis on a free loopback port and writes the address to
``<data_dir>/embedded-redis.json``; every other process on the embedded default with the
same ``data_dir`` connects to that server while its process lives.  A process that
neither runs a system service nor found one serving keeps a private in-process Redis
that nothing else can reach, so its services warn, naming the way out, when they start
or first send.

The server is fakeredis's RESP server, run in one daemon thread of the serving process
over the very same in-process data the local services use.  It is for development on a
machine without Redis (two shells, no installation); deployments configure ``[redis]``.
Resources need no sharing: they live in ``<data_dir>/resources`` on the same disk.
``[asynckarton] share_embedded = 0`` keeps a system service from serving (the test kit
and the demo run everything in one process and turn it off).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

__all__ = [
    "ADDRESS_FILE",
    "find_served",
    "has_local_system",
    "register_local_system",
    "serve",
    "served_here",
    "warn_private",
]

log = logging.getLogger("asynckarton.embedded")

#: Where a serving process records the address of its in-process Redis.
ADDRESS_FILE = "embedded-redis.json"

# data_dir -> port, for the in-process servers this process serves.
_SERVED: dict[str, int] = {}
# data_dirs a system service of this process routes (served to others or not).
_LOCAL_SYSTEMS: set[str] = set()
# data_dirs already warned about (one warning per process and data_dir).
_WARNED: set[str] = set()
_LOCK = threading.Lock()


def _key(data_dir: str | Path) -> str:
    return str(Path(data_dir).resolve())


def served_here(data_dir: str | Path) -> bool:
    """Whether this process serves the in-process Redis of ``data_dir``."""
    return _key(data_dir) in _SERVED


def register_local_system(data_dir: str | Path) -> None:
    """Record that a system service of this process routes ``data_dir``'s tasks."""
    _LOCAL_SYSTEMS.add(_key(data_dir))


def has_local_system(data_dir: str | Path) -> bool:
    """Whether a system service of this process routes ``data_dir``'s tasks."""
    return _key(data_dir) in _LOCAL_SYSTEMS


def warn_private(data_dir: str | Path, who: str) -> None:
    """Warn once per process and data_dir that ``who`` runs on a private in-process Redis.

    On this module's logger, not the service's: the service logger's records are
    published to Karton's log channel, where nobody would read this one.
    """
    key = _key(data_dir)
    if key in _WARNED:
        return
    _WARNED.add(key)
    log.warning(
        "%s runs on the embedded default with a private in-process Redis: no system service "
        "runs in this process and none serves %s, so tasks sent from here are never routed "
        "and tasks sent elsewhere never arrive. Start 'asynckarton system' (same data "
        "directory, no [redis] configured) before the other processes, or configure "
        "[redis] and [s3].",
        who,
        data_dir,
    )


def serve(data_dir: str | Path, server: Any) -> int:
    """Serve ``server`` (a fakeredis ``FakeServer``) on loopback; return the port.

    Idempotent per data directory.  Blocking (binds a socket, writes a file): call it
    from a worker thread.  The address file is written atomically and removed at exit
    when it still names this process.
    """
    from fakeredis import TcpFakeServer

    key = _key(data_dir)
    with _LOCK:
        if key in _SERVED:
            return _SERVED[key]
        _slow_down_idle_polls()
        tcp = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
        tcp.fake_server = server  # the very data this process's services use
        tcp.daemon_threads = True  # connected clients never keep the process from exiting
        tcp.block_on_close = False
        port = int(tcp.server_address[1])
        thread = threading.Thread(
            target=tcp.serve_forever, name=f"asynckarton-embedded-redis-{port}", daemon=True
        )
        thread.start()
        path = Path(key) / ADDRESS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{ADDRESS_FILE}.{os.getpid()}")
        record = {"host": "127.0.0.1", "port": port, "pid": os.getpid()}
        partial.write_text(json.dumps(record), encoding="utf-8")
        os.replace(partial, path)
        atexit.register(_forget, path, port)
        _SERVED[key] = port
        return port


#: Seconds each served connection's thread waits for input before it looks for pub/sub
#: messages to push (fakeredis polls every 10 ms: 100 wake-ups a second per connection,
#: about 9% of a core for one idle consumer).  Commands are answered as soon as they
#: arrive either way; only pub/sub deliveries (log tailing) may wait this long.
EMBEDDED_POLL = 0.05


def _slow_down_idle_polls() -> None:
    """Raise fakeredis's per-connection poll interval to :data:`EMBEDDED_POLL`."""
    from fakeredis._clients import _tcp_server

    current = getattr(_tcp_server, "_POLL_INTERVAL", None)
    if isinstance(current, float) and current < EMBEDDED_POLL:
        _tcp_server._POLL_INTERVAL = EMBEDDED_POLL


def _forget(path: Path, port: int) -> None:
    """Remove the address file at exit if it still names this process's server."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("pid") == os.getpid() and record.get("port") == port:
            path.unlink()
    except (OSError, ValueError):
        pass


def find_served(data_dir: str | Path, timeout: float = 0.5) -> str | None:
    """Return ``redis://`` URL of another process serving ``data_dir``'s Redis, or None.

    None when no address file exists, when it names this process, a process that is gone,
    or a port that does not accept connections.  Blocking: call it from a worker thread.
    """
    path = Path(_key(data_dir)) / ADDRESS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        host, port, pid = str(record["host"]), int(record["port"]), int(record["pid"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("Ignoring unreadable %s: %s", path, exc)
        return None
    if pid == os.getpid() or host not in ("127.0.0.1", "::1", "localhost"):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a stale file: its process died without cleaning up
    except PermissionError:
        pass  # alive, owned by someone else
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError:
        return None
    return f"redis://{host}:{port}/0"
