"""The progress bar of `diffuse` and `diffusiond generate`: one stderr line, redrawn from events.

Here, not in either command line, so the daemon's CLI does not import the client's.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .protocol import Event


class Progress:
    """One redrawn stderr line: model loading first when it comes, then step/total and ETA.

    Drawn on a terminal only (into a pipe or a log it would be escape codes), and not beside
    ``--json`` output (``quiet``); DIFFUSE_PROGRESS=1 draws it anyway.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.enabled = not quiet and sys.stderr.isatty() or os.environ.get("DIFFUSE_PROGRESS") == "1"
        self.drawn = False

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        where = f" on {event['worker']}" if event.get("worker") else ""  # a remote worker's
        if kind == Event.MODEL_DOWNLOADING:
            self._draw(f"downloading {event['model']} …")
        elif kind == Event.MODEL_DOWNLOAD:
            mb = 1024 * 1024
            self._draw(f"downloading {event['model']}: {event['bytes'] / mb:.1f}/{event['total'] / mb:.1f} MB "
                       f"at {event['rate'] / mb:.1f} MB/s {event['file']}")
        elif kind == Event.MODEL_LOADING:
            self._draw(f"loading model {event['model']}{where} …")
        elif kind == Event.MODEL_COMPILING:
            self._draw(f"compiling model {event['model']}{where} for its GPU (once per model and size) …")
        elif kind == Event.JOB_STARTED:
            self._draw(f"started{where}")
        elif kind == Event.JOB_PROGRESS:
            filled = 30 * event["step"] // event["total"]
            self._draw(f"step {event['step']:>3}/{event['total']} [{'#' * filled}{'.' * (30 - filled)}] "
                       f"ETA {event['eta']:4.1f}s{where}")

    def _draw(self, text: str) -> None:
        if self.enabled:
            print(f"\r\x1b[K{text}", end="", file=sys.stderr, flush=True)
            self.drawn = True

    def end(self) -> None:
        if self.drawn:
            print(file=sys.stderr, flush=True)
            self.drawn = False
