"""`diffusiond.json`: what diffusiond reads of a model folder that its format does not say.

A Core ML folder that `diffusiond convert` wrote keeps its source's scheduler config, VAE scaling
factor and SDXL switches there (coreml_folder.py). Either kind of folder may give its own default
guidance: a model trained or distilled for another scale than Stable Diffusion's 7.5 (the shipped
`shapes` model draws its colours true at 3; SDXL-Turbo wants 0) says so once, and a request that
names no guidance gets it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import Limits
from ..errors import ModelInvalid

FACTS_FILE = "diffusiond.json"
GUIDANCE = 7.5  # diffusers' StableDiffusionPipeline and Apple's Swift pipeline default to it


def read_facts(folder: Path, name: str) -> dict[str, Any]:
    """The folder's facts; empty when it has no diffusiond.json (a Hub or Apple model)."""
    file = folder / FACTS_FILE
    if not file.is_file():
        return {}
    try:
        facts = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelInvalid(f"model {name}: cannot read {FACTS_FILE}: {exc}") from exc
    if not isinstance(facts, dict):
        raise ModelInvalid(f"model {name}: {FACTS_FILE} must hold a JSON object")
    return facts


def default_guidance_of(facts: dict[str, Any], name: str) -> float:
    """The guidance a request that gives none runs at: the facts' `default_guidance_scale`, else 7.5."""
    value = facts.get("default_guidance_scale", GUIDANCE)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= Limits.guidance:  # NaN too
        raise ModelInvalid(f"model {name}: {FACTS_FILE}'s default_guidance_scale must be a number from 0 to "
                           f"{Limits.guidance:g}, got {value!r}; fix or delete it")
    return float(value)
