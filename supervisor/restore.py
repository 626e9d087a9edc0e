"""Offline restore: `scripts/node restore NAME --data-dir DIR`.

All shards are restored together or not at all:
  1. stage: copy `checkpoints/NAME/shard-<i>` to `.restore-staging/shard-<i>` for every i
     (SST files hard-linked, they are immutable; the rest copied) and check each opens;
  2. write the journal `RESTORE.json` (fsynced): from here on the restore rolls forward;
  3. swap each shard: `shard-<i>` -> `.restore-old/shard-<i>`, staged copy -> `shard-<i>`;
  4. only after every swap: delete `.restore-old`, the staging dir, then the journal.
A run interrupted before step 2 leaves only a staging dir, which the next run (restore
or node start) deletes; interrupted after it, the next run finishes the swaps.
The `timestamp` file is kept: commit_ts stays strictly increasing after a restore.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

from supervisor import datadir

log = logging.getLogger("shardkv.restore")

JOURNAL = "RESTORE.json"
STAGING = ".restore-staging"
OLD = ".restore-old"


def valid_name(name: str) -> bool:
    """The router's rule for checkpoint names: one path component, not hidden."""
    return (0 < len(name) <= 255 and "/" not in name and "\0" not in name
            and not name.startswith("."))


class RestoreError(RuntimeError):
    """The restore was refused or failed before changing live data; the message says why."""


def restore(data_dir: str, name: str, verify=None) -> dict:
    """Replace every shard of `data_dir` by checkpoint `name`; returns its manifest.
    `verify(path, shard, shards)` checks a staged copy (default: the engine's check)."""
    if not valid_name(name):
        raise RestoreError(f"invalid checkpoint name {name!r}: a checkpoint name is one plain "
                           f"name (no '/', not starting with '.')")
    if not os.path.isdir(data_dir):
        raise RestoreError(f"data dir {data_dir} does not exist")
    lock = datadir.DataDirLock(data_dir).acquire("restoring a checkpoint")
    try:
        finish_interrupted(data_dir)
        node = datadir.read_node_file(data_dir)
        if node is None:
            raise RestoreError(f"{data_dir} is not a shardkv data dir (no {datadir.NODE_FILE})")
        manifest = read_manifest(data_dir, name)
        if manifest.get("shards") != node["shards"]:
            raise RestoreError(f"checkpoint {name!r} has {manifest.get('shards')} shards but "
                               f"data dir {data_dir} has {node['shards']}; refusing to restore it")
        stage_all(data_dir, name, node["shards"], verify)
        datadir.write_json_atomic(os.path.join(data_dir, JOURNAL),
                                  {"name": name, "shards": node["shards"]})
        roll_forward(data_dir, node["shards"])
        log.info("restored checkpoint %r (ts %s) into %s", name, manifest.get("ts"), data_dir)
        return manifest
    finally:
        lock.release()


def available(data_dir: str) -> list[str]:
    root = os.path.join(data_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root)
                  if os.path.isfile(os.path.join(root, n, "MANIFEST.json")))


def read_manifest(data_dir: str, name: str) -> dict:
    path = os.path.join(data_dir, "checkpoints", name, "MANIFEST.json")
    if not os.path.isfile(path):   # MANIFEST.json is written last: without it, no checkpoint
        names = available(data_dir)
        raise RestoreError(f"no checkpoint named {name!r} in {data_dir}; available: "
                           f"{', '.join(names) if names else '(none)'}")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise RestoreError(f"{path} is unreadable: {exc}") from None
    if not isinstance(manifest, dict):
        raise RestoreError(f"{path} is not a JSON object")
    return manifest


def stage_all(data_dir: str, name: str, shards: int, verify=None) -> None:
    staging = os.path.join(data_dir, STAGING)
    shutil.rmtree(staging, ignore_errors=True)
    os.mkdir(staging, 0o700)
    try:
        for i in range(shards):
            src = os.path.join(data_dir, "checkpoints", name, f"shard-{i}")
            dst = os.path.join(staging, f"shard-{i}")
            if not os.path.isdir(src):
                raise RestoreError(f"checkpoint {name!r} is incomplete: shard-{i} is missing")
            copy_shard(src, dst)
            verify_shard(dst, i, shards, verify)
            log.info("staged shard %d of checkpoint %r", i, name)
        datadir.fsync_dir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)   # nothing live was touched
        raise


def copy_shard(src: str, dst: str) -> None:
    """SSTs are never modified in place, so a hard link is a safe copy; the rest is copied.
    Everything written is on disk before the swap relies on it: each copied file, and the
    directory's own entries (only the staging root was synced, so after a power cut a
    swapped-in shard could have lacked files)."""
    os.mkdir(dst, 0o700)
    for entry in os.scandir(src):
        target = os.path.join(dst, entry.name)
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target)
            for root, _dirs, files in os.walk(target):
                for name in files:
                    datadir.fsync_file(os.path.join(root, name))
                datadir.fsync_dir(root)
        elif entry.name.endswith(".sst"):
            try:
                os.link(entry.path, target)     # the checkpoint's own file, already durable
            except OSError:
                shutil.copy2(entry.path, target)
                datadir.fsync_file(target)
        else:
            shutil.copy2(entry.path, target)
            datadir.fsync_file(target)
    datadir.fsync_dir(dst)


def verify_shard(path: str, shard: int, shards: int, verify=None) -> None:
    """The staged copy must open as a database of this shard before anything is swapped."""
    if verify is None:
        try:   # opens the copy read-write and checks the stored shard id and count
            from shard.checkpoint import verify_shard_dir as verify
        except ImportError:
            verify = open_read_only
    try:
        verify(path, shard, shards)
    except Exception as exc:
        raise RestoreError(f"shard-{shard} of the checkpoint does not open: {exc}") from None


def open_read_only(path: str, shard: int, shards: int) -> None:
    """Fallback check: the copy opens as some RocksDB database."""
    from rocksdict import AccessType, Rdict
    Rdict(path, access_type=AccessType.read_only()).close()


def finish_interrupted(data_dir: str) -> None:
    """Complete a journalled restore, or drop the staging of an unjournalled one."""
    journal = os.path.join(data_dir, JOURNAL)
    if os.path.exists(journal):
        with open(journal) as f:
            shards = json.load(f)["shards"]
        log.warning("completing an interrupted restore in %s", data_dir)
        roll_forward(data_dir, shards)
    elif os.path.exists(os.path.join(data_dir, STAGING)):
        log.warning("removing the staging dir of an interrupted restore (live data untouched)")
        shutil.rmtree(os.path.join(data_dir, STAGING))


def roll_forward(data_dir: str, shards: int) -> None:
    """Swap every staged shard in (idempotent: safe to rerun after a crash at any point)."""
    staging, old = os.path.join(data_dir, STAGING), os.path.join(data_dir, OLD)
    os.makedirs(old, mode=0o700, exist_ok=True)
    for i in range(shards):
        staged = os.path.join(staging, f"shard-{i}")
        if not os.path.isdir(staged):
            continue   # this shard was swapped already
        live, parked = os.path.join(data_dir, f"shard-{i}"), os.path.join(old, f"shard-{i}")
        if os.path.exists(live):
            if os.path.exists(parked):   # leftover from an earlier crash at this very step
                shutil.rmtree(parked)
            os.rename(live, parked)
        os.rename(staged, live)
        datadir.fsync_dir(data_dir)
    shutil.rmtree(old)
    shutil.rmtree(staging, ignore_errors=True)
    os.unlink(os.path.join(data_dir, JOURNAL))
    datadir.fsync_dir(data_dir)
