"""A FastAPI app that sends uploads to Karton and hashes them in the same process.

    uvicorn examples.fastapi_app:app

``POST /tasks`` (multipart ``file``) sends an ``{"type": "upload"}`` task with the file as
a resource; the :class:`Hasher` consumer, running in the app's event loop, downloads it
and records its SHA-256 and size under the task's root uid; ``GET /results/{root_uid}``
returns them.  With no ``[redis]``/``[s3]`` configured everything is embedded (an
in-process Redis, resources under ``~/.local/share/asynckarton``), so the app also runs
the router; point ``karton.ini`` at a real deployment and the router is left to
karton-system.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import FastAPI, File, HTTPException, UploadFile

from asynckarton import Config, Consumer, LocalResource, RemoteResource, Task
from asynckarton.fastapi import ProducerDep, lifespan

#: root uid -> what the hasher found (a real app would use a database).
results: dict[str, dict[str, Any]] = {}


class Hasher(Consumer):
    """Hash uploaded files (SHA-256, size)."""

    identity = "example.fastapi.hasher"
    filters = [{"type": "upload"}]
    concurrency_limit = 8

    async def process(self, task: Task) -> None:
        resource = task.get_resource("file")
        if not isinstance(resource, RemoteResource):
            raise TypeError("expected a stored resource")
        digest, size = hashlib.sha256(), 0
        async for chunk in resource.iter_chunks():
            digest.update(chunk)  # chunks are at most 1 MiB: cheap enough on the loop
            size += len(chunk)
        results[task.root_uid] = {
            "name": resource.name,
            "sha256": digest.hexdigest(),
            "size": size,
            "task_uid": task.uid,
        }
        self.log.info("Hashed %s: %s", resource.name, results[task.root_uid]["sha256"])


config = Config()
app = FastAPI(
    title="asynckarton upload hasher",
    lifespan=lifespan(
        config,
        consumers=[Hasher(config)],
        system=config.embedded,
        producer_identity="example.fastapi",
        grace=10.0,
    ),
)


@app.post("/tasks")
async def send_upload(
    file: Annotated[UploadFile, File(description="The file to analyse.")],
    producer: ProducerDep,
) -> dict[str, str]:
    """Send the uploaded file as an ``upload`` task; returns its uid and root uid."""
    content = await file.read()
    task = Task(
        {"type": "upload"},
        payload={"file": LocalResource(file.filename or "upload", content=content)},
    )
    await producer.send_task(task)
    return {"uid": task.uid, "root_uid": task.root_uid}


@app.get("/results/{root_uid}")
async def get_result(root_uid: str) -> dict[str, Any]:
    """Return what the hasher found for an analysis (404 until it is done)."""
    if root_uid not in results:
        raise HTTPException(status_code=404, detail="not processed yet")
    return results[root_uid]


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the app serves only after its consumers are running."""
    return {"status": "ok"}
