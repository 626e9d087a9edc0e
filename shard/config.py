"""EngineConfig: the engine's settings, read from the node config dict (configs/node.toml).

Sections used: durability, flush, prune, memory, batch_writer, rocksdb. A missing section
or key takes the default documented in configs/node.toml. Type and range validation with
the offending key named is supervisor/config.py's job; here a bad value raises ValueError.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .storage import ROCKSDB_DEFAULTS

DURABILITY_MODES = ("wal", "fsync")


@dataclass
class EngineConfig:
    durability: str = "wal"                 # "wal" | "fsync"
    flush_interval_secs: float = 10.0
    blocks_per_flush: int = 100
    flush_on_start: bool = True
    keep_versions: int = 3
    prune_auto_interval_secs: float = 60.0
    prune_step_keys: int = 2000
    max_resident_versions: int = 2_000_000
    max_cached_keys: int = 200_000
    batch_writer: dict = field(default_factory=dict)      # AdaptiveConfig.from_dict input
    rocksdb: dict = field(default_factory=lambda: dict(ROCKSDB_DEFAULTS))

    def __post_init__(self) -> None:
        if self.durability not in DURABILITY_MODES:
            raise ValueError(f"durability.mode={self.durability!r}: one of {', '.join(DURABILITY_MODES)}")
        if self.keep_versions < 1:
            raise ValueError(f"prune.keep_versions={self.keep_versions}: must be >= 1")
        for name in ("blocks_per_flush", "prune_step_keys", "max_resident_versions", "max_cached_keys"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")

    @property
    def fsync(self) -> bool:
        return self.durability == "fsync"

    @classmethod
    def from_dict(cls, config: dict | None) -> "EngineConfig":
        """Build from the full node config dict (all sections); absent keys use defaults."""
        config = config or {}
        durability = config.get("durability", {})
        flush = config.get("flush", {})
        prune = config.get("prune", {})
        memory = config.get("memory", {})
        rocksdb = dict(ROCKSDB_DEFAULTS)
        rocksdb.update(config.get("rocksdb", {}))
        d = cls()
        return cls(
            durability=durability.get("mode", d.durability),
            flush_interval_secs=float(flush.get("interval_secs", d.flush_interval_secs)),
            blocks_per_flush=int(flush.get("blocks_per_flush", d.blocks_per_flush)),
            flush_on_start=bool(flush.get("flush_on_start", d.flush_on_start)),
            keep_versions=int(prune.get("keep_versions", d.keep_versions)),
            prune_auto_interval_secs=float(prune.get("auto_interval_secs", d.prune_auto_interval_secs)),
            prune_step_keys=int(prune.get("step_keys", d.prune_step_keys)),
            max_resident_versions=int(memory.get("max_resident_versions", d.max_resident_versions)),
            max_cached_keys=int(memory.get("max_cached_keys", d.max_cached_keys)),
            batch_writer=dict(config.get("batch_writer", {})),
            rocksdb=rocksdb,
        )
