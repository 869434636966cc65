"""Every built-in setting, declared once: Karton's sections and asynckarton's own.

A row here is the only place a built-in setting's type, default, help, secrecy and flag
are written. ``BASE_FLAGS``, ``CONSUMER_FLAGS`` and ``SYSTEM_FLAGS`` say which of them get
a flag of their own on which command line (Karton's flags, exactly, plus ours); every
other one is reached with ``--set section.option=value``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from ._declare import Option

__all__ = [
    "ALIAS_SECTIONS",
    "BASE_FLAGS",
    "BUILTIN",
    "CONSUMER_FLAGS",
    "KARTON",
    "SYSTEM",
    "SYSTEM_FLAGS",
    "builtin",
    "suggest",
]

# fmt: off
REDIS = (
    Option("redis", "host", str, None, "Redis host name (Redis is configured when set)"),
    Option("redis", "port", int, 6379, "Redis port", flag="", minimum=1),
    Option("redis", "db", int, 0, "Redis database number", flag="", minimum=0),
    Option("redis", "username", str, None, "Redis AUTH user name", flag=""),
    Option("redis", "password", str, None, "Redis AUTH password", flag="", secret=True),
    Option("redis", "ssl", bool, False, "connect with TLS", flag=""),
    Option("redis", "ssl_ca_certs", str, None, "TLS: CA file that signed Redis's certificate "
           "(default: the system's CAs)", flag=""),
    Option("redis", "ssl_certfile", str, None, "TLS: client certificate file", flag=""),
    Option("redis", "ssl_keyfile", str, None, "TLS: client private key file", flag=""),
    Option("redis", "ssl_cert_reqs", str, "required", "TLS: check Redis's certificate: "
           "required, optional or none", flag=""),
    Option("redis", "ssl_check_hostname", bool, True, "TLS: check that the certificate "
           "names the host", flag=""),
    Option("redis", "url", str, None, "redis:// URL; replaces host, port, db, ssl", flag=""),
    Option(
        "redis", "socket_timeout", float, 30.0, "socket timeout, s (0: none)", flag="", minimum=0
    ),
    Option("redis", "sentinel_master", str, None, "Redis Sentinel service name; connect "
           "to its master through the sentinels (replaces host, port, url)", flag=""),
    Option("redis", "sentinels", str, None, "Sentinel addresses, host:port[,host:port...]",
           flag=""),
    Option("redis", "sentinel_username", str, None, "AUTH user name for the sentinels",
           flag=""),
    Option("redis", "sentinel_password", str, None, "AUTH password for the sentinels",
           flag="", secret=True),
)
S3 = (
    Option("s3", "address", str, None, "S3 endpoint, http(s)://host:port", flag=""),
    Option("s3", "access_key", str, None, "S3 access key", flag="", secret=True),
    Option("s3", "secret_key", str, None, "S3 secret key", flag="", secret=True),
    Option("s3", "bucket", str, None, "default bucket of resources", flag=""),
    Option("s3", "iam_auth", bool, False, "authenticate with AWS IAM", flag=""),
)
MINIO = (  # Karton < 5: read as [s3] when there is no [s3] section
    Option("minio", "address", str, None, "deprecated [s3] address (host:port)", flag=""),
    Option("minio", "access_key", str, None, "deprecated [s3] access_key", flag="", secret=True),
    Option("minio", "secret_key", str, None, "deprecated [s3] secret_key", flag="", secret=True),
    Option("minio", "bucket", str, None, "deprecated [s3] bucket", flag=""),
    Option("minio", "secure", bool, True, "https for a bare [minio] address", flag=""),
    Option("minio", "iam_auth", bool, False, "deprecated [s3] iam_auth", flag=""),
)
KARTON = (
    Option("karton", "identity", str, None, "service identity (one service only)", "--identity"),
    Option("karton", "debug", bool, False, "development mode: throw-away identity, queue, "
           "no log publishing", "--debug", flag_value=True),
    Option("karton", "persistent", bool, True, "keep the queue when the service goes away",
           "--non-persistent", flag_value=False),
    Option("karton", "task_timeout", float, 0.0, "seconds a handler may run (0: no limit)",
           "--task-timeout", minimum=0),
    Option("karton", "concurrency_limit", int, 1, "tasks handled at once",
           "--concurrency-limit", minimum=1),
    Option("karton", "prefetch", int, None, "tasks taken ahead of free handlers "
           "(default: concurrency_limit, 0 when that is 1)", flag="", minimum=0),
    Option("karton", "shutdown_grace", float, 30.0, "seconds running tasks get to finish on "
           "shutdown", "--grace", minimum=0),
    Option("karton", "max_retries", int, 0, "attempts after the first failure",
           "--max-retries", minimum=0),
    Option("karton", "retry_for", str, None, "exceptions that are retried: dotted names, "
           "comma-separated (default: Exception)", flag=""),
    Option("karton", "retry_backoff", float, 1.0, "first retry delay, s", flag="", minimum=0),
    Option("karton", "retry_backoff_max", float, 300.0, "longest retry delay, s", flag="",
           minimum=0),
    Option("karton", "lease_timeout", float, 60.0, "seconds before a dead consumer's task is "
           "redelivered", flag="", minimum=0, exclusive=True),
    Option("karton", "parallel_batch_size", int, 0, "tasks send_tasks writes per Redis round "
           "trip (0: the whole call at once)", flag="", minimum=0),
    Option("karton", "force_new_workflow", bool, False, "tasks this service sends start a new "
           "analysis (root_uid) linked to the parent's", flag=""),
    Option("karton", "call_result_cache", bool, False, "a task equal to one this identity "
           "finished within call_result_cache_ttl is not run again: its outputs are resent",
           flag=""),
    Option("karton", "call_result_cache_ttl", float, 86400.0, "seconds a cached result (and "
           "the resources its outputs reference) is kept", flag="", minimum=0, exclusive=True),
    Option("karton", "disable_cache_args", str, None, "arguments the result cache ignores: "
           "headers.X / payload.X, comma-separated ('*': no caching)", flag=""),
    Option("karton", "running_concurrency", str, "disabled", "at most one running task of "
           "this identity per scope: disabled, task, arguments or keys", flag=""),
    Option("karton", "registration_concurrency", str, "disabled", "a routed copy equal (per "
           "scope) to a pending one is not queued: disabled, task, arguments or keys",
           flag=""),
    Option("karton", "key_arguments", str, None, "the arguments of the 'keys' scope: dotted "
           "paths such as headers.kind, payload.sample (comma-separated)", flag=""),
    Option("karton", "on_diff_non_key_args_raise", bool, False, "equal keys but other "
           "arguments different: the newcomer crashes naming them", flag=""),
    Option("karton", "reroute_on_concurrency_control", bool, False, "a blocked task runs "
           "later (parked until the holder releases) instead of ending Crashed", flag=""),
    Option("karton", "event_loop", str, "auto", "the event loop of 'asynckarton run' and "
           "Service.main(): auto (uvloop where it is installed, else asyncio's), uvloop or "
           "asyncio", flag=""),
    Option("karton", "gc_threshold", str, "auto", "the garbage collector of 'asynckarton "
           "run' and Service.main(): auto (first generation at least 10000 objects), python "
           "(the interpreter's own) or up to three integers, as gc.set_threshold takes",
           flag=""),
    Option("karton", "metrics_port", int, None, "serve this process's Prometheus metrics on "
           "this port", "--metrics-port", minimum=0),
    Option("karton", "metrics_host", str, "0.0.0.0", "address the metrics port listens on",
           flag=""),
)
LOGGING = (
    Option("logging", "level", str, "INFO", "DEBUG, INFO, WARNING...", "--log-level"),
    Option("logging", "enable_publish", bool, True, "publish logs to Karton's channel", flag=""),
)
SIGNALING = (
    Option("signaling", "status", bool, False, "send karton.signaling.status tasks", flag=""),
)
SYSTEM = (
    Option("system", "setup_bucket", bool, False, "create the S3 bucket when it does not exist",
           "--setup-bucket", flag_value=True),
    Option("system", "enable_gc", bool, True, "collect garbage (off: leave it to another "
           "instance)", "--disable-gc", flag_value=False),
    Option("system", "enable_router", bool, True, "route tasks (off: leave it to another "
           "instance)", "--disable-router", flag_value=False),
    Option("system", "route_batch_size", int, 500, "most tasks the router takes per round",
           flag="", minimum=1),
    Option("system", "gc_interval", float, 180.0, "seconds between garbage collections",
           "--gc-interval", minimum=0),
    Option("system", "task_dispatched_timeout", float, 86400.0, "seconds before a Dispatched "
           "task is dropped", "--task-dispatched-timeout", minimum=0),
    Option("system", "task_started_timeout", float, 86400.0, "seconds before a Started task "
           "is given up", "--task-started-timeout", minimum=0),
    Option("system", "task_crashed_timeout", float, 259200.0, "seconds a Crashed task is "
           "kept", "--task-crashed-timeout", minimum=0),
    Option("system", "task_spawned_timeout", float, 3600.0, "seconds before an orphaned "
           "Spawned task is requeued", "--task-spawned-timeout", minimum=0),
    Option("system", "crash_started_tasks_on_timeout", bool, False, "mark timed-out Started "
           "tasks Crashed instead of deleting them", "--crash-started-task-on-timeout",
           flag_value=True),
    Option("system", "enable_null_version_deletion", bool, False, "also delete null-version "
           "objects", flag=""),
    Option("system", "enable_task_tracking", bool, True, "keep finished tasks' status",
           flag=""),
    Option("system", "task_tracking_ttl", int, 2592000, "seconds a tracked status is kept",
           flag="", minimum=1),
    Option("system", "gc_extra_buckets", str, None, "more buckets to collect, "
           "comma-separated", flag=""),
    Option("system", "metrics_port", int, None, "serve the deployment's Prometheus metrics "
           "on this port", "--metrics-port", minimum=0),
    Option("system", "metrics_host", str, "0.0.0.0", "address the metrics port listens on",
           flag=""),
    Option("system", "metrics_scan_interval", float, 0.0, "seconds between the metrics' own "
           "task counts by status (each reads every task; 0: off, use the GC pass's count)",
           flag="", minimum=0),
)
ASYNCKARTON = (
    Option("asynckarton", "embedded", bool, None, "in-process Redis and local storage "
           "(default: when neither Redis nor S3 is configured)", "--embedded",
           flag_value=True),
    Option("asynckarton", "data_dir", str, None, "where embedded mode keeps its data "
           "(default: $XDG_DATA_HOME/asynckarton)", flag=""),
    Option("asynckarton", "share_embedded", bool, True, "a system service on the embedded "
           "default serves its in-process Redis to other processes on loopback", flag=""),
    Option("asynckarton", "deduplicate", bool, False, "store resources under their sha256 and "
           "upload each content once (a resource's own deduplicate= wins)", flag=""),
)
CONFIG = (  # Karton's mapping turns $KARTON_CONFIG_FILE into [config] file
    Option("config", "file", str, None, "extra ini file ($KARTON_CONFIG_FILE)", flag=""),
)
# fmt: on

#: ``{section: {name: Option}}`` of every built-in setting, in display order.
BUILTIN: Mapping[str, Mapping[str, Option]] = MappingProxyType(
    {
        group[0].section: MappingProxyType({option.name: option for option in group})
        for group in (REDIS, S3, KARTON, LOGGING, SIGNALING, SYSTEM, ASYNCKARTON, MINIO, CONFIG)
    }
)
#: Sections that only matter when present (aliases and bookkeeping).
ALIAS_SECTIONS = frozenset({"minio", "config"})

#: Flags every service's command line has; then consumers' and karton-system's own.
BASE_FLAGS = (BUILTIN["karton"]["identity"], BUILTIN["logging"]["level"], KARTON[1])
CONSUMER_FLAGS = tuple(
    BUILTIN["karton"][name]
    for name in (
        "persistent",
        "task_timeout",
        "concurrency_limit",
        "shutdown_grace",
        "max_retries",
        "metrics_port",
    )
)
SYSTEM_FLAGS = tuple(option for option in SYSTEM if option.flag != "")


def builtin(section: str, name: str) -> Option | None:
    """The declaration of a built-in setting, or None."""
    return BUILTIN.get(section, {}).get(name)


def suggest(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or ``""``."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
