"""The test suite. A package, so that tests/shard and tests/node are `tests.shard` and
`tests.node` and can never shadow the real `shard` and `node` packages on sys.path."""
