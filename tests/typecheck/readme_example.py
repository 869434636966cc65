"""The README's first example, verbatim: it must pass ``mypy --strict`` as it is.

``Task.get_resource`` returns ``RemoteResource`` for handlers, so
``await task.get_resource("sample").download()`` needs no ``isinstance``.
Checked by mypy (pyproject ``files``), never run.
"""

# Verbatim from the README, long line included.
# fmt: off
from asynckarton import Karton, Task


class Reverser(Karton):
    """Reverses text files."""

    identity = "example.reverser"
    filters = [{"type": "sample", "kind": "text"}]

    async def process(self, task: Task) -> None:
        data = await task.get_resource("sample").download()
        self.log.info("reversing %d bytes", len(data))
        await self.send_task(Task({"type": "text", "kind": "reversed"}, payload={"text": data[::-1].decode()}))


if __name__ == "__main__":
    Reverser.main()
