"""Which Core ML compute units run a model fastest on this Mac: measured by `diffusiond bench`, stored
per (machine, model), and `auto` uses the stored winner — else Diffusers for Mac's rule.

The store is a small JSON file in the state folder:
``{"<machine key>": {"<model>": {"compute_units": …, "seconds_per_image": …, "measured": …}}}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffusiond.clients.protocol import AUTO, COMPUTE_UNITS

from ..models.coreml_layout import auto_compute_units
from .hardware import Machine

STORE_FILE = "compute_units.json"


def read(state_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((state_dir / STORE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def winner(state_dir: Path, machine: Machine, model: str) -> str | None:
    """The fastest compute units the bench measured for this model on this kind of machine."""
    entry = read(state_dir).get(machine.key, {}).get(model)
    return entry["compute_units"] if entry and entry.get("compute_units") in COMPUTE_UNITS else None


def record(state_dir: Path, machine: Machine, model: str, compute_units: str, seconds_per_image: float, measured: str) -> None:
    """Store a bench winner, atomically (written beside, then renamed)."""
    data = read(state_dir)
    data.setdefault(machine.key, {})[model] = {
        "compute_units": compute_units, "seconds_per_image": round(seconds_per_image, 3), "measured": measured,
    }
    state_dir.mkdir(parents=True, exist_ok=True)
    temporary = state_dir / f".{STORE_FILE}.{os.getpid()}"
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(state_dir / STORE_FILE)


def choose(compute_units: str, state_dir: Path, machine: Machine, model: str) -> str:
    """The compute units to load with: as asked, or for `auto` the bench's winner, else the rule."""
    if compute_units != AUTO:
        return compute_units
    return winner(state_dir, machine, model) or auto_compute_units(machine.has_neural_engine, machine.performance_cores)
