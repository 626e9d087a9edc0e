"""The node's front: client protocol, router, client library and CLI."""
