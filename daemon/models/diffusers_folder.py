"""A Stable Diffusion model on disk in diffusers' folder layout, and the facts the pipeline needs.

The pipeline reads these facts rather than assuming SD 1.5: the family (SD 1.x/2.x, SDXL, the
SDXL refiner, from model_index.json), the VAE's downscale factor, latent channels and scaling
factor, the default size the UNet was trained at, the scheduler config, the text encoders'
tokenizers, SDXL's conditioning switches, which optional parts (safety checker) it ships, and the
default guidance its diffusiond.json may give (facts.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import ModelInvalid, ModelNotDownloaded, ModelNotFound
from . import store
from .catalog import ALIASES
from .coreml_folder import CoreMLFolder, is_coreml_folder
from .facts import default_guidance_of, read_facts
from .family import SD, SDXL, SDXL_REFINER, TITLES
from .ref import parse

_COMMON = ("unet", "vae", "scheduler")
# The folders each family loads; the text encoders' tokenizers in the order the runtime takes their ids.
_TEXT_PARTS = {
    SD: ("text_encoder", "tokenizer"),
    SDXL: ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    SDXL_REFINER: ("text_encoder_2", "tokenizer_2"),
}


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    name: str
    runtime = "torch"
    fixed_size = False  # any size the VAE's factor divides

    @classmethod
    def open(cls, name: str) -> ModelFolder | CoreMLFolder:
        """A model by alias, local folder, or Hub id (`org/name[@revision]`) already in the HF cache;
        a folder of Core ML models in Apple's layout opens as a CoreMLFolder."""
        ref = parse(name)
        if ref.path is None:
            path = store.coreml_local_path(ref.canonical) or store.local_path(ref.canonical)
            if path is None:
                raise ModelNotDownloaded(f"{name} is not downloaded yet; a job for it downloads it first")
        else:
            path = ref.path
        if is_coreml_folder(path):
            return CoreMLFolder.open(path, name)
        if not (path / "model_index.json").is_file():
            raise ModelNotFound(
                f"no diffusers model at {path} (model_index.json missing); "
                f"give a folder in diffusers layout, a Hub id (org/name), or one of: {', '.join(ALIASES)}"
            )
        folder = cls(path.resolve(), name)
        missing = [part for part in (*_COMMON, *_TEXT_PARTS[folder.family]) if not (folder.path / part).is_dir()]
        if missing and folder.family == SD:
            raise ModelInvalid(f"model {name} lacks {', '.join(missing)} in {folder.path}")
        if missing:
            raise ModelInvalid(
                f"model {name} is {TITLES[folder.family]} (model_index.json: {folder.index.get('_class_name')}) and "
                f"lacks {', '.join(missing)} in {folder.path}; {TITLES[folder.family]} needs "
                f"{', '.join(_TEXT_PARTS[folder.family])}: copy or download the whole model"
            )
        return folder

    def _json(self, *parts: str) -> dict[str, Any]:
        try:
            return json.loads(self.path.joinpath(*parts).read_text())
        except (OSError, ValueError) as exc:
            raise ModelInvalid(f"model {self.name}: cannot read {'/'.join(parts)}: {exc}") from exc

    @cached_property
    def index(self) -> dict[str, Any]:
        return self._json("model_index.json")

    @cached_property
    def scheduler_config(self) -> dict[str, Any]:
        return self._json("scheduler", "scheduler_config.json")

    @cached_property
    def _vae(self) -> dict[str, Any]:
        return self._json("vae", "config.json")

    @cached_property
    def _unet(self) -> dict[str, Any]:
        return self._json("unet", "config.json")

    @cached_property
    def facts(self) -> dict[str, Any]:
        return read_facts(self.path, self.name)

    @property
    def default_guidance(self) -> float:
        """The guidance a request that names none gets: the folder's diffusiond.json may give its own (facts.py)."""
        return default_guidance_of(self.facts, self.name)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self._vae["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self._unet["in_channels"])

    @property
    def scaling_factor(self) -> float:
        return float(self._vae.get("scaling_factor", 0.18215))

    @property
    def default_size(self) -> int:
        return int(self._unet["sample_size"]) * self.vae_scale_factor

    @property
    def default_shape(self) -> tuple[int, int]:
        """(width, height) when a request gives none: the UNet's training size."""
        return self.default_size, self.default_size

    @cached_property
    def family(self) -> str:
        """SDXL from its pipeline class (StableDiffusionXLPipeline, …Img2ImgPipeline); the refiner is
        the SDXL img2img model with only the second text encoder and aesthetic-score conditioning."""
        if not str(self.index.get("_class_name", "")).startswith("StableDiffusionXL"):
            return SD
        if self.requires_aesthetics_score and not self._has("text_encoder"):
            return SDXL_REFINER
        return SDXL

    @property
    def tokenizer_dirs(self) -> tuple[Path, ...]:
        """One tokenizer per text encoder, in the order the runtime takes their ids."""
        return tuple(self.path / part for part in _TEXT_PARTS[self.family] if part.startswith("tokenizer"))

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL: an empty negative prompt is zeros, not the encoding of "" (diffusers' default: true)."""
        return self.family != SD and bool(self.index.get("force_zeros_for_empty_prompt", True))

    @property
    def requires_aesthetics_score(self) -> bool:
        """The UNet's size conditioning ends in an aesthetic score rather than the target size (the refiner)."""
        return bool(self.index.get("requires_aesthetics_score", False))

    def _has(self, part: str) -> bool:
        entry = self.index.get(part)
        return bool(entry and entry[0] is not None) and (self.path / part).is_dir()

    @property
    def has_safety_checker(self) -> bool:
        return self._has("safety_checker") and self._has("feature_extractor")

    @property
    def feature_extractor_dir(self) -> Path:
        return self.path / "feature_extractor"
