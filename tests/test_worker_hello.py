"""The worker protocol's version check reads the version as the wire carries it: msgpack's true is
not the integer 1, though Python's `True == 1` says so."""

from __future__ import annotations

import msgpack

from .daemon_process import Daemon, free_port
from .test_remote import keys
from .test_remote_worker import expect, worker_link


def test_a_worker_hello_with_version_true_is_refused(tmp_path) -> None:
    port = free_port()
    daemon = Daemon(tmp_path / "d", tcp=f"127.0.0.1:{port}", local_worker=False)
    assert keys(daemon, "w", "worker").returncode == 0
    daemon.start()
    link = worker_link(daemon, port, "w")
    try:
        link.connect(f"tcp://127.0.0.1:{port + 2}")
        link.send(msgpack.packb({"op": "hello", "v": True, "name": "w"}))
        assert "worker protocol 1" in expect(link, "refused")["reason"]
        link.send(msgpack.packb({"op": "hello", "v": 1, "name": "w"}))
        expect(link, "welcome")
    finally:
        link.close()
        assert daemon.stop() == 0
        daemon.close()
