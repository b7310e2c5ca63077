"""argparse types that `diffuse` and `diffusiond` share: one wording of each refusal."""

from __future__ import annotations

import argparse
from pathlib import Path

from .infotext import parse_size


def size_argument(text: str) -> tuple[int, int]:
    """argparse type of --size (also used by `diffusiond generate`)."""
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None


def path_argument(text: str) -> Path:
    """argparse type of a path: an empty one would quietly mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a file or folder (`.` for this folder)")
    return Path(text)


def model_name(text: str) -> str:
    """A model as the daemon must see it: a folder here — named like a path, or existing — as its
    absolute path (as -o and --init-image are), anything else (alias, Hub id) as given."""
    path = Path(text).expanduser()
    if text.startswith((".", "/", "~")) or path.is_dir():
        return str(path.resolve())
    return text


def lora_argument(text: str) -> dict[str, object]:
    """argparse type of --lora NAME[:WEIGHT] (weight 1 when left out): a job's `loras` entry. A
    file named like a path, or existing here, goes to the daemon as its absolute path. A weight
    that is not a number is refused here, naming it, unless the whole text is a file's name."""
    name, colon, tail = text.rpartition(":")
    try:
        weight = float(tail)
    except ValueError:
        if colon and not Path(text).expanduser().is_file():
            raise argparse.ArgumentTypeError(
                f"--lora {text!r}: the weight after ':' must be a number, such as {name}:0.8") from None
        name, weight = text, 1.0
    if not name.strip():
        raise argparse.ArgumentTypeError(f"--lora takes NAME or NAME:WEIGHT, got {text!r}")
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) or path.is_file():
        name = str(path.resolve())
    return {"name": name, "weight": weight}
