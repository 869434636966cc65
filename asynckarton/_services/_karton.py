"""Karton: a Consumer that can also send tasks (Karton's ``Karton(Consumer, Producer)``)."""

from __future__ import annotations

from .._settings._config import Config
from .._wire._task import Task
from ._consumer import Consumer
from ._producer import Producer
from ._runtime import Runtime

__all__ = ["Karton"]


class Karton(Consumer, Producer):
    """A consumer that produces tasks from ``process()`` with ``await self.send_task(t)``.

    With ``[signaling] status = 1`` it sends ``karton.signaling.status`` tasks when each
    task begins and ends, as Karton does.
    """

    with_service_info = True
    default_identity = ""  # a service must name itself (Producer's default is not one)

    def __init__(
        self,
        config: Config | None = None,
        identity: str | None = None,
        *,
        runtime: Runtime | None = None,
    ) -> None:
        super().__init__(config, identity, runtime=runtime)
        if self.config.signaling_status():
            self.add_pre_hook(self._signal_begin, "karton.signaling.status")
            self.add_post_hook(self._signal_end, "karton.signaling.status")

    async def _signal_begin(self, task: Task) -> None:
        await self.send_task(Task({"type": "karton.signaling.status", "status": "task_begin"}))

    async def _signal_end(self, task: Task, error: BaseException | None) -> None:
        await self.send_task(Task({"type": "karton.signaling.status", "status": "task_end"}))
