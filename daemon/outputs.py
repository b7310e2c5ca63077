"""How a job's images are named beside each other: one rule for the queue, which plans the names,
and the PNG writer, which writes them (stdlib only, so either side imports it cheaply)."""

from __future__ import annotations

from pathlib import Path


def numbered(first_path: Path, index: int) -> Path:
    """Image `index` of a job beside its first: NAME.png, NAME-2.png, …"""
    return first_path if index == 0 else first_path.with_name(f"{first_path.stem}-{index + 1}{first_path.suffix}")
