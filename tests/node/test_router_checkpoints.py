"""A checkpoint create that is still waiting for its shards, driven in process: a Router
with two shard links marked up, its shard messages read from the outboxes and answered by
hand (no shard processes), so the window between the create and its answer is exact.
Every request gets an answer, and a delete cannot pull the directory out from under a
create (which then failed to write its MANIFEST and never answered)."""
import os

import pytest

from node import admin_ops
from node.router import Router
from shard import messages as m


@pytest.fixture
def router(inproc_router):
    r = inproc_router
    r.answers = []
    r.reply = lambda ctx, **fields: r.answers.append((ctx, "ok", fields))
    r.fail = lambda ctx, error: r.answers.append((ctx, error["code"], error))
    return r


def answer_checkpoints(r: Router) -> None:
    """Each shard answers its checkpoint message ok."""
    for link in r.links:
        msg = link.outbox.pop()
        assert msg["op"] == m.CHECKPOINT
        r.complete(msg["rid"], m.ok(msg["rid"], bytes=0))


def test_a_checkpoint_being_created_cannot_be_deleted_and_the_create_answers(router):
    router.op_checkpoint("create", {"action": "create", "name": "c1"})
    assert router.answers == []                                   # waiting for the shards
    router.op_checkpoint("delete", {"action": "delete", "name": "c1"})
    assert router.answers[-1][:2] == ("delete", "unavailable")
    assert router.answers[-1][2]["retryable"] is True
    answer_checkpoints(router)
    ctx, code, fields = router.answers[-1]
    assert (ctx, code, fields["name"]) == ("create", "ok", "c1")
    assert [c["name"] for c in router.checkpoint_list()] == ["c1"]
    router.op_checkpoint("delete2", {"action": "delete", "name": "c1"})   # done: now it can go
    assert router.answers[-1][:2] == ("delete2", "ok")
    assert router.checkpoint_list() == [] and not router.creating_checkpoints


def test_a_create_whose_manifest_cannot_be_written_answers_internal(router, tmp_path):
    router.op_checkpoint("create", {"action": "create", "name": "c2"})
    os.rmdir(tmp_path / "checkpoints" / "c2")        # the directory is gone (no shard wrote yet)
    answer_checkpoints(router)
    ctx, code, error = router.answers[-1]
    assert (ctx, code) == ("create", "internal") and "manifest" in error["message"]
    assert router.checkpoint_list() == [] and not router.creating_checkpoints


def test_unnamed_creates_in_one_millisecond_get_distinct_names(router, monkeypatch):
    """The default name is the time to the millisecond: a second unnamed create within it
    was answered bad_request "already exists". Pipelined here: the second comes while the
    first is being created, the third once both are on disk."""
    monkeypatch.setattr(admin_ops.time, "time", lambda: 1795685717.478)   # one millisecond
    router.op_checkpoint("first", {"action": "create"})
    router.op_checkpoint("second", {"action": "create"})
    assert router.answers == []                                   # both waiting for the shards
    answer_checkpoints(router)
    answer_checkpoints(router)
    router.op_checkpoint("third", {"action": "create"})
    answer_checkpoints(router)
    stamp = "ckpt-20261126-093517-478"
    assert sorted((ctx, code, fields.get("name")) for ctx, code, fields in router.answers) == [
        ("first", "ok", stamp), ("second", "ok", f"{stamp}-2"), ("third", "ok", f"{stamp}-3")]
    assert sorted(c["name"] for c in router.checkpoint_list()) == [stamp, f"{stamp}-2", f"{stamp}-3"]
