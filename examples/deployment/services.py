"""The deployment example's two services: a Karton-style pipeline of two steps.

    asynckarton run services:Uppercase --config-file karton.ini   # from this directory
    asynckarton run services:Reporter --config-file karton.ini

``Uppercase`` takes ``{"type": "text", "stage": "raw"}`` tasks, upper-cases their ``text`` resource and
sends the result on as ``{"type": "text", "stage": "upper"}``; ``Reporter`` logs what it
receives.  ``send.py`` produces the first tasks.
"""

from __future__ import annotations

from asynckarton import Consumer, Karton, RemoteResource, Resource, Task


class Uppercase(Karton):
    """Upper-case a text resource and pass it on."""

    identity = "example.uppercase"
    version = "1.0.0"
    filters = [{"type": "text", "stage": "raw"}]

    async def process(self, task: Task) -> None:
        resource = task.get_resource("text")
        assert isinstance(resource, RemoteResource)
        data = await resource.download()
        self.log.info("upper-casing %d bytes", len(data))
        result = Task(
            {"type": "text", "stage": "upper"},
            payload={"text": Resource("upper.txt", data.upper())},
        )
        await self.send_task(result)


class Reporter(Consumer):
    """Log each upper-cased text."""

    identity = "example.reporter"
    version = "1.0.0"
    filters = [{"type": "text", "stage": "upper"}]

    async def process(self, task: Task) -> None:
        resource = task.get_resource("text")
        assert isinstance(resource, RemoteResource)
        data = await resource.download()
        self.log.info("received %r", data[:60].decode(errors="replace"))
