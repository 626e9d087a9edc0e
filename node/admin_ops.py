"""The router's node-wide operations: flush and checkpoint (behind the 2PC barrier),
block heights, prune and stats, each sent to every shard and answered once all replied.

AdminOps is a part of node.router.Router (a mixin: it uses the router's links, oracle,
scatter and reply methods, and TxnCoordinator's barrier).
"""
import json
import os
import shutil
import time

from node.errors import err, file_error, shard_error, unavailable
from shard import messages as m
from shard.histogram import summary_ms


class AdminOps:
    """flush, checkpoint, block, prune, stats (a mixin of node.router.Router)."""

    def op_flush(self, ctx, req):
        if not self.all_up():
            return self.fail(ctx, unavailable("a shard is down or restarting"))

        def at_cut(S):
            def done(replies):
                keys = nbytes = 0
                for reply in replies.values():
                    if not reply.get("ok"):
                        return self.fail(ctx, shard_error(reply))
                    keys += int(reply.get("keys", 0))
                    nbytes += int(reply.get("bytes", 0))
                self.reply(ctx, flush_ts=S, keys=keys, bytes=nbytes)
            self.scatter({s: {"op": m.FLUSH, "ts": S} for s in range(self.nshards)}, done)
        self.barrier(at_cut)

    def checkpoints_dir(self) -> str:
        return os.path.join(self.data_dir, "checkpoints")

    def op_checkpoint(self, ctx, req):
        action = req.get("action")
        name = req.get("name")
        if name is not None and (not name or "/" in name or name.startswith(".")):
            return self.fail(ctx, err("bad_request", f"invalid checkpoint name {name!r}"))
        if action == "create":
            return self.checkpoint_create(ctx, name)
        if action == "list":
            return self.reply(ctx, checkpoints=self.checkpoint_list())
        if action == "delete":
            if name is None:
                return self.fail(ctx, err("bad_request", "delete needs a name"))
            path = os.path.join(self.checkpoints_dir(), name)
            if name in self.creating_checkpoints:
                # Deleting it under the create made the create fail to write its MANIFEST
                # and never answer; it is not in `list` yet, so it is not there to delete.
                return self.fail(ctx, unavailable(f"checkpoint {name!r} is still being created"))
            if not os.path.isdir(path):
                return self.fail(ctx, err("not_found", f"no checkpoint named {name!r}"))
            shutil.rmtree(path)
            return self.reply(ctx)
        self.fail(ctx, err("bad_request", f"unknown checkpoint action {action!r}"))

    def checkpoint_create(self, ctx, name):
        if name is None:
            name = self.default_checkpoint_name()
        path = os.path.join(self.checkpoints_dir(), name)
        if os.path.exists(path):
            return self.fail(ctx, err("bad_request", f"checkpoint {name!r} already exists"))
        if not self.all_up():
            return self.fail(ctx, unavailable("a shard is down or restarting"))
        try:
            os.makedirs(path, mode=0o700)
        except OSError as exc:
            return self.fail(ctx, file_error(f"checkpoint {name!r}: cannot create {path}", exc))
        self.creating_checkpoints.add(name)

        def at_cut(S):
            block = self.block_height

            def done(replies):
                self.creating_checkpoints.discard(name)
                for reply in replies.values():
                    if not reply.get("ok"):
                        shutil.rmtree(path, ignore_errors=True)
                        return self.fail(ctx, shard_error(reply))
                created = time.time()
                manifest = {"name": name, "ts": S, "block": block, "created_at": created,
                            "shards": self.nshards}
                tmp = os.path.join(path, "MANIFEST.json.tmp")
                try:
                    with open(tmp, "w") as f:
                        json.dump(manifest, f)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, os.path.join(path, "MANIFEST.json"))   # written last: now it exists
                except OSError as exc:     # the disk, or the directory gone: answer, never hang
                    shutil.rmtree(path, ignore_errors=True)
                    return self.fail(ctx, file_error(f"checkpoint {name!r}: writing its manifest failed", exc))
                self.reply(ctx, name=name, ts=S, block=block, created_at=created)
            self.scatter({s: {"op": m.CHECKPOINT, "dir": os.path.join(path, f"shard-{s}"), "ts": S}
                          for s in range(self.nshards)}, done)
        self.barrier(at_cut)

    def default_checkpoint_name(self) -> str:
        """ckpt-YYYYmmdd-HHMMSS-mmm, then -2, -3 ... while that is taken: two unnamed
        creates in one millisecond both succeed (the second was refused as existing)."""
        now = time.time()
        stamp = time.strftime("ckpt-%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{int(now * 1000) % 1000:03d}"
        name, n = stamp, 1
        while self.checkpoint_taken(name):
            n += 1
            name = f"{stamp}-{n}"
        return name

    def checkpoint_taken(self, name: str) -> bool:
        """On disk (also as an incomplete or foreign directory), or being created now."""
        return name in self.creating_checkpoints or os.path.exists(os.path.join(self.checkpoints_dir(), name))

    def checkpoint_list(self) -> list:
        out = []
        base = self.checkpoints_dir()
        if not os.path.isdir(base):
            return out
        for name in sorted(os.listdir(base)):
            try:
                with open(os.path.join(base, name, "MANIFEST.json")) as f:
                    man = json.load(f)
            except (OSError, ValueError):
                continue   # incomplete or foreign directory: not a checkpoint
            out.append({"name": man.get("name", name), "ts": man.get("ts"), "block": man.get("block"),
                        "created_at": man.get("created_at"), "bytes": disk_usage(os.path.join(base, name))})
        out.sort(key=lambda c: c["created_at"] or 0)
        return out

    # -- block, prune, stats

    def op_block(self, ctx, req):
        height = int(req["height"])
        if height <= self.block_height:
            return self.fail(ctx, err("bad_request", f"block height must increase (current {self.block_height})"))
        if not self.all_up():
            return self.fail(ctx, unavailable("a shard is down or restarting"))
        previous, self.block_height = self.block_height, height

        def done(replies):
            for reply in replies.values():
                if not reply.get("ok"):
                    if self.block_height == height:
                        self.block_height = previous
                    return self.fail(ctx, shard_error(reply))
            self.reply(ctx, height=height, flushed=any(r.get("flushed") for r in replies.values()))
        self.scatter({s: {"op": m.BLOCK, "height": height} for s in range(self.nshards)}, done)

    def op_prune(self, ctx, req):
        keep = req.get("keep_versions")
        keep = self.keep_versions if keep is None else int(keep)
        if keep < 1:
            return self.fail(ctx, err("bad_request", "keep_versions must be >= 1"))
        if not self.all_up():
            return self.fail(ctx, unavailable("a shard is down or restarting"))

        def done(replies):
            total = 0
            for reply in replies.values():
                if not reply.get("ok"):
                    return self.fail(ctx, shard_error(reply))
                total += int(reply.get("versions_removed", 0))
            self.reply(ctx, versions_removed=total)
        self.scatter({s: {"op": m.PRUNE, "keep_versions": keep} for s in range(self.nshards)}, done)

    def op_stats(self, ctx, req):
        up = [s for s in range(self.nshards) if self.links[s].state == "up" or self.links[s].readable]

        def done(replies):
            shards = []
            for s in range(self.nshards):
                reply = replies.get(s)
                if reply is None or not reply.get("ok"):
                    # every field PROTOCOL.md lists, zero: a client can read a down shard's
                    # entry like any other (it had only shard, pid and up)
                    shards.append({**shard_entry(s, {"pid": self.links[s].pid}), "up": False})
                    continue
                shards.append(shard_entry(s, reply))
            node = {"supervisor_pid": os.getppid(), "router_pid": os.getpid(), "ts": self.oracle.last,
                    "block_height": self.block_height, "shards": self.nshards,
                    "inflight": self.inflight, "twopc": dict(self.twopc),
                    "requests": {f"{op}:{res}": n for (op, res), n in self.results.items()},
                    **self.node_txn_figures()}
            self.reply(ctx, node=node, shards=shards)
        if not up:
            return done({})
        self.scatter({s: {"op": m.STATS} for s in up}, done)

    def node_txn_figures(self) -> dict:
        """TPS, success rate and end-to-end latency of the whole node, as a client sees it:
        latency is the router's `txn` request histogram (one transaction per request)."""
        done = sum(self.txn_outcomes.values())
        figures = {"tps": self.committed_rate.rate(),
                   "txn_committed": self.txn_outcomes["committed"],
                   "txn_conflict": self.txn_outcomes["conflict"],
                   "txn_error": self.txn_outcomes["error"],
                   "success_rate": self.txn_outcomes["committed"] / done if done else None}
        hist = self.req_hist.get("txn")
        if hist is not None:
            figures.update(summary_ms(hist.snapshot()))
        return figures

def shard_entry(s: int, st: dict) -> dict:
    txn = st.get("txn", {})
    flush = st.get("flush", {})
    prune = st.get("prune", {})
    return {"shard": s, "pid": st.get("pid"), "up": True, "inc": st.get("inc"),
            "keys": st.get("keys", 0), "versions": st.get("versions", 0),
            "txn_committed": txn.get("committed", 0), "txn_conflict": txn.get("conflict", 0),
            "tps": st.get("tps", 0.0), "latency_p50_ms": st.get("latency_p50_ms", 0.0),
            "latency_p90_ms": st.get("latency_p90_ms", 0.0), "latency_p99_ms": st.get("latency_p99_ms", 0.0),
            "flush": {k: flush.get(k, 0) for k in ("flush_count", "keys_flushed", "bytes_flushed",
                                                   "last_flush_ts", "last_flush_block")},
            "prune": {k: prune.get(k, 0) for k in ("prune_count", "versions_removed")},
            "horizon": st.get("horizon", 0), "max_ts": st.get("max_ts", 0),
            "block_height": st.get("block_height", 0), "prepared": st.get("prepared", 0),
            "outcomes": st.get("outcomes", 0),
            # free space and whether it takes writes ("ok", "low_space", "read_only")
            "disk": dict(st.get("disk") or {})}


def disk_usage(path: str) -> int:
    """Bytes used by files under path, each inode once (checkpoints are hard links)."""
    seen, total = set(), 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total
