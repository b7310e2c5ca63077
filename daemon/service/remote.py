"""TCP for other machines, only with CurveZMQ: the daemon's key pair, and the client keys it allows.

ipc in the private runtime folder stays the way in on the machine itself. With `tcp` set in the
config the daemon also listens on TCP — requests on the port, events on the port + 1, remote
workers on the port + 2 — and a peer must prove a key whose public half is in its allow folder
(ZAP, checked per connection, so a key added or removed there counts at once): clients' keys in
`allowed/`, workers' in `allowed_workers/`, so a client key cannot take jobs. A refused key is logged.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("diffusiond.remote")
SERVER = "server"
ALLOW_FOLDERS = {"clients": "allowed", "workers": "allowed_workers"}  # ZAP domain → allow folder


class RemoteError(Exception):
    code = "remote_unconfigured"


def make_keys(keys_dir: Path, client: str | None = None, worker: str | None = None) -> list[Path]:
    """The server's key pair (once), and a client's or a worker's, whose public key goes into its
    allow folder."""
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    made = []
    for name in [SERVER] + [peer for peer in (client, worker) if peer]:
        if not (keys_dir / f"{name}.key_secret").exists():
            for path in zmq.auth.create_certificates(str(keys_dir), name):
                os.chmod(path, 0o600)
                made.append(Path(path))
    for peer, domain in ((client, "clients"), (worker, "workers")):
        if peer:
            allowed = keys_dir / ALLOW_FOLDERS[domain]
            allowed.mkdir(mode=0o700, exist_ok=True)
            copy = allowed / f"{peer}.key"
            shutil.copyfile(keys_dir / f"{peer}.key", copy)
            os.chmod(copy, 0o600)
            made.append(copy)
    return made


class _AllowFolders:
    """ZAP's credentials check: is the peer's public key one of its domain's allow folder?"""

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir

    def callback(self, domain: str, client_key: bytes) -> bool:
        allowed = set()
        folder = self.keys_dir / ALLOW_FOLDERS[domain]
        for path in folder.glob("*.key"):
            try:
                public, _ = zmq.auth.load_certificate(str(path))
            except (OSError, ValueError):
                continue
            allowed.add(public)
        if client_key in allowed:
            return True
        peer = "worker" if domain == "workers" else "client"
        log.warning("refused a TCP %s whose key is not allowed: %s", peer, client_key.decode(errors="replace"))
        return False


def bind_tcp(
    context: zmq.Context, address: str, keys_dir: Path
) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket, ThreadAuthenticator]:
    """CURVE sockets behind the allow folders: a ROUTER for clients on host:port, an XPUB on
    port + 1, and a ROUTER for workers on port + 2."""
    secret_file = keys_dir / f"{SERVER}.key_secret"
    if not secret_file.exists():
        raise RemoteError(f"tcp is set but there is no server key in {keys_dir}: run `diffusiond keys --client NAME`")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RemoteError(f"tcp must look like HOST:PORT, got {address!r}")
    public, secret = zmq.auth.load_certificate(str(secret_file))
    authenticator = ThreadAuthenticator(context, log=logging.getLogger("diffusiond.zap"))
    authenticator.start()
    for domain in ALLOW_FOLDERS:
        authenticator.configure_curve_callback(domain=domain, credentials_provider=_AllowFolders(keys_dir))
    sockets = []
    for kind, offset, zap_domain in ((zmq.ROUTER, 0, b"clients"), (zmq.XPUB, 1, b"clients"), (zmq.ROUTER, 2, b"workers")):
        socket = context.socket(kind)
        socket.curve_secretkey, socket.curve_publickey, socket.curve_server = secret, public, True
        socket.zap_domain = zap_domain
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(f"tcp://{host}:{int(port) + offset}")
        sockets.append(socket)
    log.info("listening on tcp://%s:%s (requests), :%d (events) and :%d (workers), CurveZMQ",
             host, port, int(port) + 1, int(port) + 2)
    return sockets[0], sockets[1], sockets[2], authenticator
