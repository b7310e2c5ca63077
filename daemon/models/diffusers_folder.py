"""A Stable Diffusion model on disk in diffusers' folder layout, and the facts the pipeline needs.

The pipeline reads these facts rather than assuming SD 1.5: the VAE's downscale factor, latent
channels and scaling factor, the default size the UNet was trained at, the scheduler config, and
which optional parts (safety checker, VAE encoder for img2img) the model ships.
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
from .ref import parse

_REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


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
        missing = [part for part in _REQUIRED if not (folder.path / part).is_dir()]
        if missing:
            raise ModelInvalid(f"model {name} lacks {', '.join(missing)} in {folder.path}")
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

    @property
    def tokenizer_dirs(self) -> tuple[Path, ...]:
        """One tokenizer per text encoder, in the order the runtime takes their ids."""
        return (self.path / "tokenizer",)

    def _has(self, part: str) -> bool:
        entry = self.index.get(part)
        return bool(entry and entry[0] is not None) and (self.path / part).is_dir()

    @property
    def has_safety_checker(self) -> bool:
        return self._has("safety_checker") and self._has("feature_extractor")

    @property
    def feature_extractor_dir(self) -> Path:
        return self.path / "feature_extractor"
