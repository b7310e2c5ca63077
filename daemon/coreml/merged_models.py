"""Core ML models with LoRAs merged in: converted once per (base, LoRA hashes, weights), then kept.

Core ML cannot change a model's weights at run time, so a job that names LoRAs on a Core ML model
runs on a conversion of the model's diffusers-format source with the LoRAs merged into its weights
(coreml/converter.py, ``loras``). The conversion takes minutes on a Mac; its folder, named by a
hash of what went into it, is reused by every later job that asks for the same set.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import ConversionFailed
from ..models.coreml_folder import PARTS, CoreMLFolder
from ..models.facts import FACTS_FILE
from ..models.lora import LoraUse

FOLDER = "coreml-loras"  # under the state folder


def cache_key(base: CoreMLFolder, loras: tuple[LoraUse, ...]) -> str:
    """What a merged conversion is: its source, how the base was converted (attention, size,
    palettizing, parts) and each LoRA's hash and weight, in order."""
    what = {
        "source": base.source, "attention": base.facts.get("attention"), "size": list(base.default_shape),
        "palettized": base.palettized, "parts": sorted(base.parts),
        "loras": [[use.file.hash, use.weight] for use in loras],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def merged_model(base: CoreMLFolder, loras: tuple[LoraUse, ...], state_dir: Path,
                 progress: Callable[[str], None]) -> Path:
    """The folder of ``base`` converted with ``loras`` merged in: from the cache, else converted now
    (through a .partial folder, so a half-made conversion is never used)."""
    from .converter import convert

    if base.source is None:
        raise ConversionFailed(f"{base.name} does not say which diffusers-format model it was converted from; "
                               "convert that model with diffusiond convert --lora")
    folder = state_dir / FOLDER / cache_key(base, loras)
    if (folder / FACTS_FILE).is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    parts = tuple(part for part in PARTS if part in base.parts)
    convert(base.source, partial, str(base.facts.get("attention", "split_einsum")), base.default_shape,
            base.palettized, progress, parts, loras=[(use.file, use.weight) for use in loras])
    partial.rename(folder)
    return folder
