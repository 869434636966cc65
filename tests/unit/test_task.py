"""Task model and wire format, checked against karton-core 5.9.1's own Task."""

from __future__ import annotations

import json

import pytest
from karton.core.task import Task as KTask

from asynckarton import (
    InvalidTaskError,
    LocalResource,
    RemoteResource,
    Task,
    TaskPriority,
    TaskState,
)


def make_task() -> Task:
    return Task(
        {"type": "sample", "kind": "runnable"},
        payload={"n": 1, "nested": {"list": [1, "a"]}},
        headers_persistent={"tlp": "amber"},
        payload_persistent={"uploader": "me"},
        priority=TaskPriority.HIGH,
    )


def test_new_uid_has_root_prefix() -> None:
    task = Task({"type": "x"})
    assert task.uid == "{" + task.root_uid + "}:" + task.root_uid
    assert task.task_uid == task.root_uid
    assert task.status is TaskState.DECLARED
    assert task.priority is TaskPriority.NORMAL


def test_uid_requires_root_uid() -> None:
    with pytest.raises(ValueError, match="root_uid"):
        Task({"type": "x"}, uid="abc")


@pytest.mark.parametrize("field", ["payload", "payload_persistent", "headers_persistent"])
def test_non_dict_bags_are_rejected(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Task({"type": "x"}, **{field: ["not", "a", "dict"]})  # type: ignore[arg-type]


def test_persistent_headers_written_twice() -> None:
    doc = json.loads(make_task().serialize())
    assert doc["headers_persistent"] == {"tlp": "amber"}
    assert doc["payload_persistent"]["__headers_persistent"] == {"tlp": "amber"}
    assert doc["headers"]["tlp"] == "amber"
    assert doc["priority"] == "high"
    assert doc["error"] is None
    assert set(doc) == {
        "uid", "root_uid", "parent_uid", "orig_uid", "status", "priority", "last_update",
        "payload", "payload_persistent", "headers", "headers_persistent", "error",
    }  # fmt: skip


def test_karton_core_reads_our_json_identically() -> None:
    ours = make_task()
    ours.error = ["Traceback...\n", "ValueError: x\n"]
    theirs = KTask.unserialize(ours.serialize())
    assert theirs.uid == ours.uid and theirs.root_uid == ours.root_uid
    assert theirs.headers == ours.headers
    assert theirs.headers_persistent == ours.headers_persistent
    assert theirs.payload == ours.payload
    assert theirs.priority.value == "high"
    assert theirs.error == ours.error
    assert json.loads(theirs.serialize()) == json.loads(ours.serialize())


def test_we_read_karton_core_json_identically() -> None:
    theirs = KTask({"type": "a"}, payload={"x": [1, 2]}, headers_persistent={"p": 1})
    ours = Task.unserialize(theirs.serialize())
    assert json.loads(ours.serialize()) == json.loads(theirs.serialize())


def test_resources_round_trip_as_karton_resources() -> None:
    task = Task(
        {"type": "x"}, payload={"files": [LocalResource("a", b"abc", uid="u-1", bucket="b")]}
    )
    doc = json.loads(task.serialize())
    spec = doc["payload"]["files"][0]["__karton_resource__"]
    assert spec["uid"] == "u-1" and spec["name"] == "a" and spec["bucket"] == "b"
    back = Task.unserialize(task.serialize())
    [resource] = back.payload["files"]
    assert isinstance(resource, RemoteResource)
    assert resource.uid == "u-1"
    theirs = KTask.unserialize(task.serialize())
    assert theirs.payload["files"][0].uid == "u-1"


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param({"priority": None}, id="no-priority"),
        pytest.param({"orig_uid": None, "error": None, "last_update": None}, id="minimal"),
    ],
)
def test_legacy_variants_are_read(doc: dict[str, object]) -> None:
    body: dict[str, object] = {
        "uid": "bare-uuid",
        "root_uid": "bare-uuid",
        "parent_uid": None,
        "status": "Spawned",
        "headers": {"type": "x"},
        "payload": {},
        "payload_persistent": {"__headers_persistent": {"type": "x"}},
    }
    body.update({k: v for k, v in doc.items() if v is not None})
    task = Task.unserialize(json.dumps(body))
    assert task.uid == "bare-uuid"
    assert task.priority is TaskPriority.NORMAL
    assert task.headers_persistent == {"type": "x"}  # fallback to the embedded copy


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(
            '{"uid": "x", "root_uid": "x", "status": ["Started"], "headers": {}, "payload": {},'
            ' "payload_persistent": {}, "priority": {"a": 1}, "last_update": "soon"}',
            r"invalid status \['Started'\], priority \{'a': 1\}, last_update 'soon'",
            id="wrong-types",
        ),
        pytest.param("{not json", "not valid JSON", id="malformed"),
        pytest.param("[1, 2]", "JSON list", id="array"),
        pytest.param('{"uid": "x"}', "no root_uid, no status, no headers", id="missing-fields"),
        pytest.param(
            '{"uid": "x", "root_uid": "x", "status": "Weird", "headers": {}, "payload": {},'
            ' "payload_persistent": {}}',
            "invalid status 'Weird'",
            id="unknown-status",
        ),
    ],
)
def test_bad_bodies_raise_clear_errors(body: str, message: str) -> None:
    with pytest.raises(InvalidTaskError, match=message):
        Task.unserialize(body)


def test_huge_integers_fall_back_to_json() -> None:
    task = Task({"type": "x"}, payload={"modulus": 2**200})
    assert Task.unserialize(task.serialize()).payload["modulus"] == 2**200


def test_non_serialisable_payload_is_an_invalid_task() -> None:
    with pytest.raises(InvalidTaskError, match="serialisable"):
        Task({"type": "x"}, payload={"x": object()}).serialize()


def test_fork_keeps_tree_and_points_back() -> None:
    task = make_task()
    fork = task.fork_task()
    assert fork.uid != task.uid and fork.root_uid == task.root_uid
    assert fork.orig_uid == task.uid
    assert fork.headers == task.headers and fork.priority is task.priority
    assert fork.headers_persistent == {"tlp": "amber"}


def test_derive_drops_priority_keeps_persistent() -> None:
    derived = make_task().derive_task({"type": "other"})
    assert derived.headers == {"type": "other", "tlp": "amber"}
    assert derived.priority is TaskPriority.NORMAL
    assert derived.payload_persistent == {"uploader": "me"}


def test_merge_rules_match_karton() -> None:
    parent = make_task()
    for cls in (Task, KTask):
        child = cls({"type": "child"}, payload={"uploader": "overridden"})
        child.set_task_parent(parent)  # type: ignore[arg-type]
        child.merge_persistent_payload(parent)  # type: ignore[arg-type]
        child.merge_persistent_headers(parent)  # type: ignore[arg-type]
        assert child.payload == {}
        assert child.payload_persistent == {"uploader": "me"}
        assert child.headers == {"type": "child", "tlp": "amber"}
        assert child.parent_uid == parent.uid and child.root_uid == parent.root_uid


def test_payload_access() -> None:
    task = make_task()
    with pytest.raises(ValueError, match="already exists"):
        task.add_payload("n", 2)
    with pytest.raises(ValueError, match="persistent"):
        task.add_payload("uploader", 2)
    task.add_payload("p", 3, persistent=True)
    assert task.get_payload("p") == 3 and task.is_payload_persistent("p")
    assert task.get_payload("missing", "d") == "d"
    with pytest.raises(TypeError):
        task.get_resource("n")
    task.remove_payload("n")
    with pytest.raises(KeyError):
        task.remove_payload("p")
    assert dict(task.walk_payload_items())["payload.nested.list.1"] == "a"


def test_a_read_task_serialises_as_the_text_it_was_read_from_until_its_state_changes() -> None:
    stored = KTask({"type": "a"}, payload={"x": [1, 2]}).serialize()  # json.dumps' spaces
    task = Task.unserialize(stored)
    assert task.serialize_state() is stored  # e.g. Karton's "Received new task" line
    task.status, task.last_update = TaskState.STARTED, task.last_update + 1
    started = task.serialize_state()
    assert started == task.serialize() and json.loads(started)["status"] == "Started"
    from_bytes = Task.unserialize(stored.encode())  # bytes: serialised afresh
    assert from_bytes.serialize_state() == from_bytes.serialize() != stored


def test_attempt_travels_in_our_own_field() -> None:
    task = make_task()
    task.attempt = 2
    doc = json.loads(task.serialize())
    assert doc["asynckarton"] == {"attempt": 2}
    assert Task.unserialize(task.serialize()).attempt == 2
    KTask.unserialize(task.serialize())  # karton-core ignores the extra field


def test_get_resource_returns_received_resources_typed() -> None:
    sent = Task({"type": "x"}, payload={"file": LocalResource("f", b"x", uid="u-1")})
    received = Task.unserialize(sent.serialize())
    resource: RemoteResource = received.get_resource("file")  # no isinstance needed
    assert isinstance(resource, RemoteResource) and resource.uid == "u-1"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        pytest.param("file", "LocalResource added in this process.*get_payload", id="local"),
        pytest.param("n", "'n' .* is a int, not a resource", id="not-a-resource"),
        pytest.param("missing", "has no payload 'missing'", id="absent"),
    ],
)
def test_get_resource_names_what_it_found_instead(name: str, message: str) -> None:
    task = Task({"type": "x"}, payload={"file": LocalResource("f", b"x"), "n": 1})
    with pytest.raises(TypeError, match=message):
        task.get_resource(name)
    assert task.get_payload("file").name == "f"  # a local resource stays readable
