"""TCP for other machines, only with CurveZMQ: the daemon's key pair, and the client keys it allows.

ipc in the private runtime folder stays the way in on the machine itself. With `tcp` set in the
config the daemon also listens on TCP — requests on the port, events on the port + 1 — and a
client must prove a key whose public half is in the allow folder (ZAP, checked per connection,
so a key added or removed there counts at once). A refused key is logged.
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


class RemoteError(Exception):
    code = "remote_unconfigured"


def make_keys(keys_dir: Path, client: str | None = None) -> list[Path]:
    """The server's key pair (once), and a client's, whose public key goes into the allow folder."""
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    made = []
    names = [SERVER] + ([client] if client else [])
    for name in names:
        if not (keys_dir / f"{name}.key_secret").exists():
            public, secret = zmq.auth.create_certificates(str(keys_dir), name)
            for path in (public, secret):
                os.chmod(path, 0o600)
                made.append(Path(path))
    if client:
        allowed = keys_dir / "allowed"
        allowed.mkdir(mode=0o700, exist_ok=True)
        copy = allowed / f"{client}.key"
        shutil.copyfile(keys_dir / f"{client}.key", copy)
        os.chmod(copy, 0o600)
        made.append(copy)
    return made


class _AllowFolder:
    """ZAP's credentials check: is the client's public key one of the allow folder's?"""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def callback(self, domain: str, client_key: bytes) -> bool:
        allowed = set()
        for path in self.folder.glob("*.key"):
            try:
                public, _ = zmq.auth.load_certificate(str(path))
            except (OSError, ValueError):
                continue
            allowed.add(public)
        if client_key in allowed:
            return True
        log.warning("refused a TCP client whose key is not allowed: %s", client_key.decode(errors="replace"))
        return False


def bind_tcp(context: zmq.Context, address: str, keys_dir: Path) -> tuple[zmq.Socket, zmq.Socket, ThreadAuthenticator]:
    """A CURVE ROUTER on host:port and a CURVE XPUB on port + 1, behind the allow folder."""
    secret_file = keys_dir / f"{SERVER}.key_secret"
    if not secret_file.exists():
        raise RemoteError(f"tcp is set but there is no server key in {keys_dir}: run `diffusiond keys --client NAME`")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RemoteError(f"tcp must look like HOST:PORT, got {address!r}")
    public, secret = zmq.auth.load_certificate(str(secret_file))
    authenticator = ThreadAuthenticator(context, log=logging.getLogger("diffusiond.zap"))
    authenticator.start()
    authenticator.configure_curve_callback(domain="*", credentials_provider=_AllowFolder(keys_dir / "allowed"))
    sockets = []
    for kind, offset in ((zmq.ROUTER, 0), (zmq.XPUB, 1)):
        socket = context.socket(kind)
        socket.curve_secretkey, socket.curve_publickey, socket.curve_server = secret, public, True
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(f"tcp://{host}:{int(port) + offset}")
        sockets.append(socket)
    log.info("listening on tcp://%s:%s (requests) and :%d (events), CurveZMQ", host, port, int(port) + 1)
    return sockets[0], sockets[1], authenticator
