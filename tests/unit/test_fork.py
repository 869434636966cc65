"""The router's document fork writes what Task.fork_task() (and karton-core) would."""

from __future__ import annotations

import json
from typing import Any

import pytest
from karton.core.task import Task as KTask
from karton.core.task import TaskState as KState

from asynckarton import InvalidTaskError, LocalResource, Task, TaskPriority, TaskState
from asynckarton._wire._document import RoutableTask

NOW = 1795349442.417694


def bodies() -> list[Any]:
    plain = Task({"type": "sample", "kind": "raw"}, payload={"n": 2**70})
    persistent = Task(
        {"type": "sample"},
        headers_persistent={"tlp": "amber"},
        payload_persistent={"uploader": "me"},
        payload={"file": LocalResource("f", b"x", uid="u-1", bucket="karton")},
        priority=TaskPriority.HIGH,
    )
    legacy = json.loads(Task({"type": "old"}, headers_persistent={"p": 1}).serialize())
    del legacy["headers_persistent"], legacy["priority"], legacy["orig_uid"], legacy["error"]
    return [
        pytest.param(plain.serialize(), id="plain-bigint"),
        pytest.param(persistent.serialize(), id="persistent-resource-high"),
        pytest.param(json.dumps(legacy), id="legacy-fields-missing"),
    ]


def _without_uid(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "uid"}


@pytest.mark.parametrize("body", bodies())
def test_fork_matches_task_fork(body: str) -> None:
    routable = RoutableTask.parse(body)
    uid, fork_json = routable.fork("karton.receiver", NOW)
    ours = json.loads(fork_json)

    task = Task.unserialize(body, parse_resources=False)
    expected = task.fork_task()
    expected.status, expected.last_update = TaskState.SPAWNED, NOW
    expected.headers["receiver"] = "karton.receiver"
    assert _without_uid(ours) == _without_uid(json.loads(expected.serialize()))
    assert uid.startswith("{" + task.root_uid + "}:") and ours["uid"] == uid

    theirs = KTask.unserialize(body, parse_resources=False).fork_task()
    theirs.status, theirs.last_update = KState.SPAWNED, NOW
    theirs.headers["receiver"] = "karton.receiver"
    assert _without_uid(ours) == _without_uid(json.loads(theirs.serialize()))


@pytest.mark.parametrize("body", bodies())
def test_finished_original_matches_task(body: str) -> None:
    ours = json.loads(RoutableTask.parse(body).finished(NOW))
    task = Task.unserialize(body, parse_resources=False)
    task.status, task.last_update = TaskState.FINISHED, NOW
    assert ours == json.loads(task.serialize())


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        pytest.param("{", "not valid JSON", id="malformed"),
        pytest.param('"x"', "JSON str", id="not-object"),
        pytest.param('{"uid": "a", "root_uid": "a"}', "headers", id="no-headers"),
        pytest.param(
            '{"uid": "a", "root_uid": "a", "headers": {}, "payload": {},'
            ' "payload_persistent": {}, "status": "Weird"}',
            "status",
            id="unknown-status",
        ),
    ],
)
def test_unroutable_bodies_name_the_problem(body: str, problem: str) -> None:
    with pytest.raises(InvalidTaskError, match=problem):
        RoutableTask.parse(body)


def test_fork_carries_the_retry_count_like_task() -> None:
    task = Task({"type": "sample"})
    task.attempt = 2
    _, fork_json = RoutableTask.parse(task.serialize()).fork("karton.receiver", NOW)
    assert json.loads(fork_json)["asynckarton"] == {"attempt": 2}
    assert Task.unserialize(fork_json).attempt == 2
    _, plain_json = RoutableTask.parse(Task({"type": "x"}).serialize()).fork("r", NOW)
    assert "asynckarton" not in json.loads(plain_json)


@pytest.mark.parametrize("body", bodies())
def test_every_copy_of_a_task_is_its_own_fork(body: str) -> None:
    routable = RoutableTask.parse(body)
    first_uid, first = routable.fork("karton.first", NOW)
    second_uid, second = routable.fork("karton.second", NOW)
    a, b = json.loads(first), json.loads(second)
    assert first_uid != second_uid and (a["uid"], b["uid"]) == (first_uid, second_uid)
    assert (a["headers"]["receiver"], b["headers"]["receiver"]) == ("karton.first", "karton.second")
    for doc in (a, b):
        del doc["uid"], doc["headers"]["receiver"]
    assert a == b
    later = json.loads(routable.fork("karton.third", NOW + 1)[1])
    assert later["last_update"] == NOW + 1
