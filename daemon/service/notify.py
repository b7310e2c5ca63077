"""systemd's readiness protocol (sd_notify) in a few lines of the standard library.

Under `Type=notify` systemd passes a datagram socket in NOTIFY_SOCKET and waits for READY=1; the
daemon sends it once the model is warm, so `systemctl start` returns when jobs can really run.
Elsewhere NOTIFY_SOCKET is unset and this does nothing.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send one state line ("READY=1", "STOPPING=1", "STATUS=…"); False when no one listens."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # Linux abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError:
            return False
    return True
