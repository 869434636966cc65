"""SystemService: the router and the garbage collector as one async supervisor.

Router and GC are separate tasks of one task group, so a long collection never stalls
routing; either can be switched off (``--disable-router`` / ``--disable-gc``) to run them
in separate processes, and several routers may run at once.
"""

from __future__ import annotations

import argparse
from typing import ClassVar

import anyio
from anyio.abc import TaskStatus

from .._errors import ConfigError
from .._services import _embedded, _metrics
from .._services._runtime import Runtime
from .._services._service import ServiceBase
from .._services._upkeep import keep_presence
from .._settings._builtin import BUILTIN
from .._settings._config import Config
from .._settings._flags import add_system_arguments, system_config_from_args
from .._version import __version__
from ..backend._guard import until_done
from ._gc import GarbageCollector
from ._router import Router

__all__ = ["SystemService"]


class SystemService(ServiceBase):
    """karton-system's job, asynchronously: route tasks and collect garbage.

    Args:
        config: configuration; ``[system]`` holds the GC timeouts and switches.
        identity: defaults to ``karton.system``.
        runtime: the runtime to use (default: its own, see :class:`~asynckarton.Runtime`).
        setup_bucket: create the default bucket when it is missing.
        batch_size: most tasks routed per round (default ``[system] route_batch_size``).
    """

    identity: ClassVar[str] = "karton.system"
    #: Shown by karton-dashboard, as karton-system reports karton-core's version.
    version: ClassVar[str | None] = __version__

    def __init__(
        self,
        config: Config | None = None,
        identity: str | None = None,
        *,
        runtime: Runtime | None = None,
        setup_bucket: bool = False,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(config, identity, runtime=runtime)
        self.settings = self.config.system_settings()
        self.setup_bucket = setup_bucket or self.settings.setup_bucket
        # None: ``[system] route_batch_size`` (the router's half of parallel_batch_size)
        self.batch_size = batch_size or int(self.option(BUILTIN["system"]["route_batch_size"]))
        self.router: Router | None = None
        self.gc: GarbageCollector | None = None
        self._scope: anyio.CancelScope | None = None

    @classmethod
    def args_description(cls) -> str:
        """Karton's description of karton-system."""
        return "Karton message broker."

    @classmethod
    def args_parser(cls) -> argparse.ArgumentParser:
        """karton-system's flags, exactly (plus asynckarton's additions)."""
        parser = super().args_parser()
        add_system_arguments(parser)
        return parser

    @classmethod
    def config_from_args(cls, config: Config, args: argparse.Namespace) -> None:
        """Copy system flags into ``[system]``."""
        super().config_from_args(config, args)
        system_config_from_args(config, args)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Route and collect until :meth:`stop` or cancellation."""
        if self._stack is None:
            async with self:
                await self._run(task_status)
        else:
            await self._run(task_status)

    @property
    def extra_buckets(self) -> tuple[str, ...]:
        """Buckets the GC collects besides the default one (``[system] gc_extra_buckets``)."""
        raw = str(self.config.get("system", "gc_extra_buckets") or "")
        return tuple(bucket.strip() for bucket in raw.split(",") if bucket.strip())

    def stop(self, *, grace: float | None = None) -> None:
        """Stop routing and collecting (a routing round in progress completes first)."""
        if self._scope is not None:
            self._scope.cancel()

    async def _share_embedded(self) -> None:
        """On the embedded default, serve the in-process Redis to other processes."""
        runtime = self._runtime
        if runtime is None or runtime.data_dir is None:
            return
        _embedded.register_local_system(runtime.data_dir)
        if not self.config.getboolean("asynckarton", "share_embedded", True):
            return
        port = await runtime.serve_embedded()
        if port is not None:
            self.log.info(
                "Embedded Redis served on 127.0.0.1:%d for other processes using %s",
                port,
                runtime.data_dir,
            )

    async def _run(self, task_status: TaskStatus[None]) -> None:
        await self._check_bucket()
        presence = self.backend.connector.named(self.client_name)
        try:
            await until_done(lambda: self.backend.ping(presence), log=self.log, what="connect")
            await self._share_embedded()
            with anyio.CancelScope() as self._scope:
                async with anyio.create_task_group() as group:
                    if self.settings.enable_router:
                        self.router = Router(
                            self.backend,
                            self.log,
                            instance=self.instance_id,
                            batch_size=self.batch_size,
                            publish_logs=self.config.logging_settings().enable_publish,
                            tracking_ttl=(
                                self.settings.task_tracking_ttl
                                if self.settings.enable_task_tracking
                                else 0
                            ),
                            presence=presence,  # its idle waits keep the connection open
                        )
                        await group.start(self.router.run)
                    if self.settings.enable_gc:
                        self.gc = GarbageCollector(
                            self.backend,
                            self.storage,
                            self.runtime.bucket,
                            self.settings,
                            self.log,
                            extra_buckets=self.extra_buckets,
                        )
                        group.start_soon(self.gc.run)
                    if self.router is None:
                        group.start_soon(keep_presence, self.backend, presence, self.log)
                    await group.start(_metrics.serve_system, self)  # metrics
                    self.log.info("Manager %s started", self.identity)
                    task_status.started()
        finally:
            self._scope = None
            with anyio.CancelScope(shield=True):
                await presence.aclose()

    async def _check_bucket(self) -> None:
        bucket = self.runtime.bucket
        exists = await self.storage.ensure_bucket(bucket, create=self.setup_bucket)
        if not exists and self.setup_bucket:  # False means "was missing": it is created now
            self.log.info("Bucket %s was missing. Created a new one.", bucket)
        elif not exists:
            raise ConfigError(
                f"bucket {bucket!r} does not exist; run with --setup-bucket to create it",
                section="s3",
                option="bucket",
                source=self.config.source("s3", "bucket"),
            )
