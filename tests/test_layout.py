"""The project's shape: the config file parses and the packages import."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_node_config_parses_with_every_section():
    config = tomllib.loads((ROOT / "configs" / "node.toml").read_text())
    for section in ("node", "limits", "durability", "flush", "prune", "memory",
                    "batch_writer", "rocksdb", "router", "supervisor", "security"):
        assert section in config, section
    assert config["node"]["listen"].startswith("tcp://127.0.0.1:")
    assert config["durability"]["mode"] in ("wal", "fsync")


def test_shard_does_not_import_node_or_supervisor():
    for path in (ROOT / "shard").rglob("*.py"):
        text = path.read_text()
        for banned in ("import node", "from node", "import supervisor", "from supervisor"):
            assert banned not in text, f"{path} must not depend on {banned.split()[-1]}"
