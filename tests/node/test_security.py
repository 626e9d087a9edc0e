"""CURVE on the client socket, the loopback rule, and frames over the limit."""

import msgpack
import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from node.security import is_loopback, secure_client_socket


@pytest.mark.parametrize("endpoint, loopback", [
    ("tcp://127.0.0.1:7450", True), ("tcp://127.3.4.5:1", True), ("tcp://localhost:1", True),
    ("tcp://[::1]:7450", True), ("ipc:///tmp/x.sock", True),
    ("tcp://0.0.0.0:7450", False), ("tcp://*:7450", False), ("tcp://10.1.2.3:7450", False),
    ("tcp://[::]:7450", False), ("tcp://example.org:7450", False), ("tcp://eth0:7450", False),
])
def test_loopback_detection(endpoint, loopback):
    assert is_loopback(endpoint) is loopback


def test_non_loopback_listen_without_keys_is_refused_before_binding():
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    try:
        with pytest.raises(ValueError, match="CURVE"):
            secure_client_socket(ctx, sock, {"security": {}}, "tcp://0.0.0.0:7450")
    finally:
        sock.close(0)


def test_an_allowed_clients_dir_without_a_server_key_is_refused_not_ignored(tmp_path):
    """It used to leave the socket open to every client (only the secret file counted)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    zmq.auth.create_certificates(str(tmp_path), "client")
    try:
        with pytest.raises(ValueError, match="curve_server_secret_file: must be set"):
            secure_client_socket(ctx, sock, {"security": {"curve_allowed_clients_dir": str(tmp_path)}},
                                 "tcp://127.0.0.1:7450")
    finally:
        sock.close(0)


@pytest.fixture
def curve_keys(tmp_path):
    server_pub, server_secret = zmq.auth.create_certificates(str(tmp_path), "server")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    client_pub, client_secret = zmq.auth.create_certificates(str(allowed), "client")
    stranger_dir = tmp_path / "stranger"
    stranger_dir.mkdir()
    _, stranger_secret = zmq.auth.create_certificates(str(stranger_dir), "stranger")
    return {"server_secret": server_secret, "server_public": server_pub, "allowed": str(allowed),
            "client_secret": client_secret, "stranger_secret": stranger_secret}


def curve_dealer(endpoint, server_public_file, client_secret_file):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    server_public, _ = zmq.auth.load_certificate(server_public_file)
    public, secret = zmq.auth.load_certificate(client_secret_file)
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    return sock


def test_curve_admits_allowed_clients_only(make_cluster, curve_keys):
    cluster = make_cluster(2, security={"curve_server_secret_file": curve_keys["server_secret"],
                                        "curve_allowed_clients_dir": curve_keys["allowed"]})
    allowed = curve_dealer(cluster.endpoint, curve_keys["server_public"], curve_keys["client_secret"])
    allowed.connect(cluster.endpoint)
    allowed.send(msgpack.packb({"op": "ping", "id": 1}))
    assert allowed.poll(10_000), "an allowed CURVE client gets an answer"
    reply = msgpack.unpackb(allowed.recv(), raw=False)
    assert reply["ok"] is True and reply["id"] == 1
    allowed.close()

    stranger = curve_dealer(cluster.endpoint, curve_keys["server_public"], curve_keys["stranger_secret"])
    monitor = stranger.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    stranger.connect(cluster.endpoint)
    stranger.send(msgpack.packb({"op": "ping", "id": 2}))
    assert monitor.poll(10_000), "the handshake of an unknown key ends one way or the other"
    event = recv_monitor_message(monitor)
    assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    assert not stranger.poll(0), "an unknown key never gets a reply"
    stranger.disable_monitor()
    monitor.close(0)
    stranger.close()


def test_the_cli_talks_curve_with_a_certificate_the_node_allows(make_cluster, curve_keys, capsys):
    from node import cli
    cluster = make_cluster(1, security={"curve_server_secret_file": curve_keys["server_secret"],
                                        "curve_allowed_clients_dir": curve_keys["allowed"]})
    base = ["-e", cluster.endpoint, "--server-key", curve_keys["server_public"]]
    assert cli.main(base + ["--client-cert", curve_keys["client_secret"], "put", "k", "v"]) == 0
    assert cli.main(base + ["--client-cert", curve_keys["client_secret"], "get", "k"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("k\tv\t")
    # a key the node does not allow: no answer (CURVE drops it), exit 1
    assert cli.main(base + ["--timeout", "1", "--client-cert", curve_keys["stranger_secret"], "ping"]) == 1
    assert cli.main(["-e", cluster.endpoint, "--client-cert", curve_keys["client_secret"], "ping"]) == 2
    assert cli.main(base + ["--client-cert", curve_keys["server_public"], "ping"]) == 2   # no secret in it
    assert "usage error" in capsys.readouterr().err


def test_frame_over_the_limit_is_answered_too_large(make_cluster):
    cluster = make_cluster(1, limits={"max_frame_bytes": 64 * 1024})
    client = cluster.client()
    frame = msgpack.packb({"op": "txn", "id": 7, "writes": [[b"k", b"v" * (80 * 1024)]]})
    client.sock.send(frame)
    assert client.sock.poll(10_000)
    reply = msgpack.unpackb(client.sock.recv(), raw=False)
    assert reply["id"] in (7, None), "the id is echoed when the frame is read at all"
    assert reply["ok"] is False and reply["error"]["code"] == "too_large"
    assert client.ok("get", keys=[b"k"])["versions"] == [0], "nothing was written"
