"""Per-shard checkpoints: create (RocksDB Checkpoint: hard links, cheap), verify, restore.

A checkpoint of a shard is a RocksDB directory holding all three column families, so it
includes the unflushed commit log: opening it replays the log and yields exactly the
state at the moment it was taken (deleted keys stay deleted: tombstones are rows too).
`CHECKPOINT.json` inside it is the small per-shard manifest, written last.
"""
from __future__ import annotations

import json
import os
import shutil
import time

from . import commitlog as cl
from .errors import StorageMismatch
from .storage import open_db

MANIFEST = "CHECKPOINT.json"


def dir_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def create_checkpoint(engine, dest_dir: str, ts: int) -> dict:
    """Checkpoint the engine's database into dest_dir (must not exist). The caller (a
    barrier) ensures no commit above `ts` is in flight; everything synced is included."""
    if os.path.exists(dest_dir):
        raise FileExistsError(f"{dest_dir} already exists")
    engine.sync()
    os.makedirs(os.path.dirname(os.path.abspath(dest_dir)), exist_ok=True)
    engine.storage.checkpoint(dest_dir)
    manifest = {"shard": engine.shard_id, "shards": engine.shard_count, "ts": ts,
                "block": engine.block_height, "created_at": time.time(),
                "bytes": dir_bytes(dest_dir)}
    tmp = os.path.join(dest_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(dest_dir, MANIFEST))
    return manifest


def read_manifest(checkpoint_shard_dir: str) -> dict | None:
    try:
        with open(os.path.join(checkpoint_shard_dir, MANIFEST)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def verify_shard_dir(path: str, shard_id: int, shard_count: int) -> None:
    """Raise StorageMismatch unless `path` opens as a RocksDB shard of this id and count.
    Opens read-write (RocksDB replays its WAL), so use it on copies, not on checkpoints."""
    if not os.path.isdir(path):
        raise StorageMismatch(f"{path}: not a directory")
    try:
        storage = open_db(path, {"block_cache_bytes": 1 << 20}, create=False)
    except Exception as exc:
        raise StorageMismatch(f"{path}: does not open as a RocksDB database: {exc}") from None
    try:
        stored_id = cl.unpack(storage.get("meta", cl.SHARD_ID))
        stored_count = cl.unpack(storage.get("meta", cl.SHARD_COUNT))
    finally:
        storage.close()
    if (stored_id, stored_count) != (shard_id, shard_count):
        raise StorageMismatch(f"{path} holds shard {stored_id} of {stored_count}, "
                              f"expected shard {shard_id} of {shard_count}")


def _copy_db(src: str, dst: str) -> None:
    """SST files are immutable: hard-link them; copy (and fsync) everything else."""
    os.makedirs(dst, mode=0o700)
    for entry in os.scandir(src):
        target = os.path.join(dst, entry.name)
        if entry.name.endswith(".sst"):
            try:
                os.link(entry.path, target)
                continue
            except OSError:
                pass
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target)
            continue
        shutil.copy2(entry.path, target)
        with open(target, "rb") as f:
            os.fsync(f.fileno())


def restore_shard(checkpoint_shard_dir: str, shard_dir: str,
                  shard_id: int | None = None, shard_count: int | None = None) -> None:
    """Replace shard_dir (engine closed) by a copy of the checkpoint. The old data stays
    until the copy has opened successfully: copy to `<shard_dir>.restore-tmp`, verify,
    rename the old dir aside, rename the copy in, delete the old dir."""
    if not os.path.isfile(os.path.join(checkpoint_shard_dir, "CURRENT")):
        raise StorageMismatch(f"{checkpoint_shard_dir}: not a shard checkpoint (no RocksDB CURRENT file)")
    manifest = read_manifest(checkpoint_shard_dir) or {}
    if shard_id is None:
        shard_id = manifest.get("shard")
    if shard_count is None:
        shard_count = manifest.get("shards")
    if shard_id is None or shard_count is None:
        raise StorageMismatch(f"{checkpoint_shard_dir}: no {MANIFEST}; pass shard_id and shard_count")
    shard_dir = os.path.abspath(shard_dir)
    tmp, old = shard_dir + ".restore-tmp", shard_dir + ".restore-old"
    shutil.rmtree(tmp, ignore_errors=True)
    _copy_db(checkpoint_shard_dir, tmp)
    try:
        verify_shard_dir(tmp, shard_id, shard_count)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(shard_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(shard_dir, old)
    os.rename(tmp, shard_dir)
    _fsync_dir(os.path.dirname(shard_dir))
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
