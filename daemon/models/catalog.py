"""Named models: what Diffusers for Mac offers, as Core ML repos and as diffusers-format repos.

An alias is a short name for a Hub repo, or for a model shipped in the package (`shapes`, trained
on a toy world of shapes, and `tiny`, random weights for the equivalence tests; each in a folder
beside this module); `diffuse models` lists them beside the local models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TINY = Path(__file__).resolve().parent / "tiny"
SHAPES = Path(__file__).resolve().parent / "shapes"
ALIASES = {"shapes": SHAPES, "tiny": TINY}


@dataclass(frozen=True)
class Entry:
    alias: str
    repo: str
    runtime: str  # "torch" (diffusers format) or "coreml" (Apple's layouts)
    variant: str
    description: str


CATALOG: tuple[Entry, ...] = (
    Entry("sd14", "CompVis/stable-diffusion-v1-4", "torch", "float", "Stable Diffusion 1.4"),
    Entry("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "torch", "float", "Stable Diffusion 1.5"),
    Entry("sd2-base", "stabilityai/stable-diffusion-2-base", "torch", "float", "Stable Diffusion 2 base (512)"),
    Entry("sd21-base", "stabilityai/stable-diffusion-2-1-base", "torch", "float", "Stable Diffusion 2.1 base (512)"),
    Entry("sd14-coreml", "pcuenq/coreml-stable-diffusion-1-4", "coreml", "float16", "Stable Diffusion 1.4, Core ML"),
    Entry("sd14-coreml-6bit", "apple/coreml-stable-diffusion-1-4-palettized", "coreml", "6-bit palettized",
          "Stable Diffusion 1.4, Core ML"),
    Entry("sd15-coreml", "pcuenq/coreml-stable-diffusion-v1-5", "coreml", "float16", "Stable Diffusion 1.5, Core ML"),
    Entry("sd15-coreml-6bit", "apple/coreml-stable-diffusion-v1-5-palettized", "coreml", "6-bit palettized",
          "Stable Diffusion 1.5, Core ML"),
    Entry("sd2-base-coreml", "pcuenq/coreml-stable-diffusion-2-base", "coreml", "float16", "Stable Diffusion 2 base, Core ML"),
    Entry("sd2-base-coreml-6bit", "apple/coreml-stable-diffusion-2-base-palettized", "coreml", "6-bit palettized",
          "Stable Diffusion 2 base, Core ML"),
    Entry("sd21-base-coreml", "pcuenq/coreml-stable-diffusion-2-1-base", "coreml", "float16",
          "Stable Diffusion 2.1 base, Core ML"),
    Entry("sd21-base-coreml-6bit", "apple/coreml-stable-diffusion-2-1-base-palettized", "coreml", "6-bit palettized",
          "Stable Diffusion 2.1 base, Core ML"),
    # SDXL: what Diffusers for Mac offers on a Mac (swift-coreml-diffusers ModelInfo.swift: xl, xlWithRefiner,
    # xlmbp; its iOS-only xlmbpChunked is left out), and the diffusers-format originals.
    Entry("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "torch", "float", "Stable Diffusion XL base 1.0 (1024)"),
    Entry("sdxl-refiner", "stabilityai/stable-diffusion-xl-refiner-1.0", "torch", "float",
          "Stable Diffusion XL refiner 1.0 (1024)"),
    Entry("sdxl-coreml", "apple/coreml-stable-diffusion-xl-base", "coreml", "float16", "Stable Diffusion XL base, Core ML"),
    Entry("sdxl-coreml-4.5bit", "apple/coreml-stable-diffusion-mixed-bit-palettization", "coreml",
          "4.5-bit mixed-bit palettized", "Stable Diffusion XL base, Core ML"),
    Entry("sdxl-with-refiner-coreml", "apple/coreml-stable-diffusion-xl-base-with-refiner", "coreml", "float16",
          "Stable Diffusion XL base with its refiner, Core ML"),
)


def lookup(name: str) -> Entry | None:
    """The entry an alias or a catalogued repo id names."""
    return next((entry for entry in CATALOG if name in (entry.alias, entry.repo)), None)


def is_palettized(name: str) -> bool:
    entry = lookup(name)
    return bool(entry and entry.variant.endswith("palettized"))


def diffusers_variant(name: str) -> Entry | None:
    """A Core ML entry's diffusers-format original, by alias (`sd15-coreml-6bit` → `sd15`): what a LoRA needs."""
    entry = lookup(name)
    original = lookup(entry.alias.split("-coreml")[0]) if entry and entry.runtime == "coreml" else None
    return original if original and original.runtime == "torch" else None


def float16_variant(name: str) -> Entry | None:
    """The same model's float16 Core ML entry: what a Mac below macOS 14 runs instead of a palettized one."""
    entry = lookup(name)
    return next((e for e in CATALOG if entry and e.runtime == "coreml" and e.variant == "float16"
                 and e.description == entry.description), None)
