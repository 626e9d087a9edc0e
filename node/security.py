"""CURVE security for the client socket.

A node listening beyond loopback must authenticate its clients: the router's ROUTER
socket becomes a CURVE server with the key pair in `security.curve_server_secret_file`
(a ZeroMQ certificate, as written by `zmq.auth.create_certificates`), and a ZAP
authenticator admits only clients whose public key has a certificate in
`security.curve_allowed_clients_dir`. Configured keys are used on loopback too: an
operator who set them expects them to be enforced.
"""
from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


def is_loopback(endpoint: str) -> bool:
    """True for ipc/inproc endpoints and tcp endpoints on a loopback address."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = urlsplit(f"//{rest}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def curve_configured(config: dict) -> bool:
    """Either key counts: a half-set section is refused by load_curve_keys, never ignored
    (an allowed-clients dir alone used to leave the socket open to every client)."""
    security = config.get("security", {})
    return bool(security.get("curve_server_secret_file") or security.get("curve_allowed_clients_dir"))


def load_curve_keys(security: dict) -> tuple[bytes, bytes, str]:
    """(server public key, server secret key, allowed clients' dir) from the [security]
    section; ValueError naming the key when one is unset or unusable. The supervisor's
    config loader calls it too, so bad keys stop a start before any process runs."""
    secret_file = security.get("curve_server_secret_file", "")
    allowed_dir = security.get("curve_allowed_clients_dir", "")
    if not secret_file:
        raise ValueError("security.curve_server_secret_file: must be set when "
                         "curve_allowed_clients_dir is (CURVE needs both)")
    if not allowed_dir:
        raise ValueError("security.curve_allowed_clients_dir: must be set when "
                         "curve_server_secret_file is (CURVE needs both)")
    public, secret = load_server_key_pair(secret_file)
    check_allowed_clients(allowed_dir)
    return public, secret, allowed_dir


def load_server_key_pair(path: str) -> tuple[bytes, bytes]:
    where = f"security.curve_server_secret_file: {path}"
    if not os.path.isfile(path):
        raise ValueError(f"{where} is not a file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where} is not a ZeroMQ certificate ({exc})") from None
    if secret is None:
        raise ValueError(f"{where} holds no secret key (use the .key_secret file)")
    try:
        derived = zmq.curve_public(secret)
    except (ValueError, zmq.ZMQError) as exc:
        raise ValueError(f"{where}: its secret key is not a CURVE key ({exc})") from None
    if derived != public:   # clients would fail the handshake with the published key
        raise ValueError(f"{where}: its public key does not belong to its secret key")
    return public, secret


def check_allowed_clients(path: str) -> None:
    """The ZAP authenticator admits the public keys of the *.key certificates in `path`."""
    where = f"security.curve_allowed_clients_dir: {path}"
    if not os.path.isdir(path):
        raise ValueError(f"{where} is not a directory")
    try:
        allowed = zmq.auth.load_certificates(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where} holds an unreadable certificate ({exc})") from None
    if not allowed:
        raise ValueError(f"{where} holds no client public key (*.key file): no client could connect")


def secure_client_socket(ctx: zmq.Context, sock: zmq.Socket, config: dict,
                         listen: str) -> ThreadAuthenticator | None:
    """Make `sock` (not yet bound) a CURVE server when keys are configured; refuse a
    non-loopback `listen` without them. Returns the authenticator to stop on exit."""
    if not curve_configured(config):
        if not is_loopback(listen):
            raise ValueError(f"refusing non-loopback listen {listen} without CURVE keys "
                             "(set security.curve_server_secret_file and curve_allowed_clients_dir)")
        return None
    public, secret, allowed_dir = load_curve_keys(config["security"])
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=allowed_dir)
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    return auth
