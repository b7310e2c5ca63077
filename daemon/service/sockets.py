"""The daemon's endpoints: ipc sockets in a per-user folder that only that user can enter."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import zmq

from diffusiond.clients.protocol import HARD_MESSAGE_BYTES, endpoints

# sockaddr_un's path: 104 bytes on macOS, 108 on Linux, both counting the final NUL.
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107


class RuntimeDirError(Exception):
    code = "runtime_dir_unsafe"


def secure_runtime_dir(path: Path) -> Path:
    """Create the folder 0700, or refuse one that someone else owns or others can enter."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError(f"{path} is not a plain folder; remove it or set runtime_dir elsewhere")
    if info.st_uid != os.getuid():
        raise RuntimeDirError(f"{path} belongs to uid {info.st_uid}, not to you ({os.getuid()}); set runtime_dir elsewhere")
    if info.st_mode & 0o077:
        raise RuntimeDirError(
            f"{path} is open to others (mode {stat.S_IMODE(info.st_mode):o}); run `chmod 700 {path}` or remove it"
        )
    for endpoint in endpoints(path):
        if len(endpoint.removeprefix("ipc://").encode()) > MAX_SOCKET_PATH:
            raise RuntimeDirError(f"socket path {endpoint} is longer than {MAX_SOCKET_PATH} bytes; set a shorter runtime_dir")
    return path


def bind(context: zmq.Context, runtime_dir: Path) -> tuple[zmq.Socket, zmq.Socket]:
    """The ROUTER for requests and the XPUB for events (XPUB: to see who wants previews).

    Call with the folder secured and the lock held: a socket file left there is a crash's.
    """
    request_endpoint, event_endpoint = endpoints(runtime_dir)
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.MAXMSGSIZE, HARD_MESSAGE_BYTES)
    router.setsockopt(zmq.ROUTER_MANDATORY, 0)
    router.setsockopt(zmq.LINGER, 0)
    events = context.socket(zmq.XPUB)
    events.setsockopt(zmq.SNDHWM, 10_000)
    events.setsockopt(zmq.LINGER, 0)
    for socket, endpoint in ((router, request_endpoint), (events, event_endpoint)):
        stale = Path(endpoint.removeprefix("ipc://"))
        stale.unlink(missing_ok=True)
        socket.bind(endpoint)
    return router, events


def hold_lock(runtime_dir: Path) -> int:
    """An exclusive lock for this daemon's life, so a second one cannot take over the sockets."""
    import fcntl

    fd = os.open(runtime_dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeDirError(f"another diffusiond is serving from {runtime_dir}; stop it first") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def lock_held(runtime_dir: Path) -> bool:
    """Whether a daemon still holds the folder's lock (a zombie or a stopped process does not)."""
    import fcntl

    try:
        fd = os.open(runtime_dir / "daemon.lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
