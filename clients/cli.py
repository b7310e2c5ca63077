"""`diffuse`: the command-line client of a running daemon. Its commands arrive with the daemon."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("diffuse: the daemon client is not built yet; run `diffusiond generate PROMPT` meanwhile", file=sys.stderr)
    return 2
