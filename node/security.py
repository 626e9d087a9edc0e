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
    return bool(config.get("security", {}).get("curve_server_secret_file"))


def secure_client_socket(ctx: zmq.Context, sock: zmq.Socket, config: dict,
                         listen: str) -> ThreadAuthenticator | None:
    """Make `sock` (not yet bound) a CURVE server when keys are configured; refuse a
    non-loopback `listen` without them. Returns the authenticator to stop on exit."""
    security = config.get("security", {})
    if not curve_configured(config):
        if not is_loopback(listen):
            raise ValueError(f"refusing non-loopback listen {listen} without CURVE keys "
                             "(set security.curve_server_secret_file and curve_allowed_clients_dir)")
        return None
    secret_file = security["curve_server_secret_file"]
    allowed_dir = security.get("curve_allowed_clients_dir", "")
    if not allowed_dir or not os.path.isdir(allowed_dir):
        raise ValueError(f"security.curve_allowed_clients_dir {allowed_dir!r} is not a directory")
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key (use the .key_secret file)")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=allowed_dir)
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    return auth
