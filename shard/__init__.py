"""The shard engine: durable MVCC over RocksDB, usable in-process with no sockets.

`shard` imports neither `node` nor `supervisor`; they use its public names.
"""
