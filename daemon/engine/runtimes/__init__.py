"""Runtimes run a model's networks: NumPy in, NumPy out. The pipeline around them lives once.

Each runtime implements :class:`Runtime`; the arrays are float32 except token ids (int64).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ...errors import ModelInvalid

if TYPE_CHECKING:
    from ...config import Config
    from ...coreml.hardware import Machine
    from ...models.coreml_folder import CoreMLFolder
    from ...models.diffusers_folder import ModelFolder
    from ...models.lora import LoraFile
    from ..linear_steps import LinearPlan


# Called before step k is run (it raises to cancel); after each step with (step, of steps, latents).
BeforeStep = Callable[[int], None]
StepCallback = Callable[[int, int, np.ndarray], None]


@dataclass(frozen=True)
class TextEncoding:
    """What a model's text encoders make of a batch of prompts: families differ here, not in the loop."""

    hidden: np.ndarray  # (B, 77, C): SD's last hidden states; SDXL's penultimate ones of both encoders, side by side
    pooled: np.ndarray | None = None  # (B, P): SDXL's pooled projection of its last encoder; None for SD 1.x/2.x


@dataclass(frozen=True)
class Conditioning:
    """Everything the UNet takes besides latents and timestep, one row per UNet batch row."""

    hidden: np.ndarray  # (B, 77, C) encoder_hidden_states
    text_embeds: np.ndarray | None = None  # (B, P) SDXL: the pooled text projection
    time_ids: np.ndarray | None = None  # (B, 6) SDXL: original size, crop, target size; (B, 5) refiner

    def take(self, rows: np.ndarray | slice) -> Conditioning:
        """These rows of every array (fancy indexing repeats rows, as a batch of images needs)."""
        return Conditioning(self.hidden[rows], None if self.text_embeds is None else self.text_embeds[rows],
                            None if self.time_ids is None else self.time_ids[rows])


class Runtime(Protocol):
    # True: the pipeline hands the whole denoising loop to `denoise` (when the scheduler is linear).
    device_loop: bool

    def encode_text(self, input_ids: Sequence[np.ndarray]) -> TextEncoding:
        """One (B, 77) array of token ids per text encoder the model has, in order → their encoding."""

    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, conditioning: Conditioning) -> np.ndarray:
        """UNet: (B, 4, h, w) latents at a timestep, with B rows of conditioning → the model output."""

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """VAE decoder: unscaled (B, 4, h, w) latents → (B, 3, H, W) images in [-1, 1]."""

    def encode(self, images: np.ndarray) -> np.ndarray:
        """VAE encoder: (B, 3, H, W) images in [-1, 1] → (B, 2·4, h, w) latent mean and log-variance."""

    def check_safety(self, clip_input: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Safety checker: CLIP pixels and (B, H, W, 3) images in [0, 1] → (B,) bool, True = flagged."""

    def denoise(self, latents: np.ndarray, conditioning: Conditioning, plan: LinearPlan, guidance: float | None,
                before_step: BeforeStep, on_step: StepCallback | None) -> np.ndarray:
        """The whole denoising loop on the device, the scheduler as ``plan``; called only when
        ``device_loop`` is true. ``before_step(k)`` raises to cancel."""

    def set_loras(self, loras: Sequence[tuple[LoraFile, float]]) -> None:
        """Apply these LoRAs at these weights, and no others (none: the base model as loaded); on
        failure nothing stays applied. Called only when the set changes."""

    @property
    def has_warm_up(self) -> bool:
        """Whether ``warm_up`` has work to do (compiling, capturing graphs), worth a loading phase."""

    def warm_up(self, width: int, height: int, count: int = 1, steps: int = 25) -> float:
        """Compile and capture for one request shape, before any job pays for it; the seconds it took."""


def open_runtime(model: ModelFolder | CoreMLFolder, config: Config, with_safety_checker: bool) -> Runtime:
    """The runtime a model needs, set up as the config says: Core ML models on coreml (compute
    units resolved by coreml.compute_units), diffusers-format ones on torch (TorchSettings from the
    config). The one place a runtime is assembled: the daemon, `diffusiond generate` and the
    benches differ only in their config. The config's `runtime` only refuses a mismatch."""
    from ...models.coreml_folder import CoreMLFolder

    if isinstance(model, CoreMLFolder):
        from ...coreml.compute_units import choose
        from ...coreml.hardware import this_machine
        from .coreml_runtime import CoreMLRuntime

        machine = this_machine()
        refuse_palettized(model.name, model.palettized, machine)
        units = choose(config.compute_units, config.state_dir, machine, model.name)
        return CoreMLRuntime(model, units, with_safety_checker)
    if config.runtime == "coreml":
        raise ModelInvalid(f"{model.name} is a diffusers-format model and the runtime is coreml: convert it first "
                           f"(diffusiond convert {model.path} --out DIR) and use DIR as the model")
    from .torch_runtime import TorchRuntime, TorchSettings

    return TorchRuntime(model.path, config.device, with_safety_checker, TorchSettings.from_config(config))


def refuse_palettized(name: str, palettized: bool, machine: Machine) -> None:
    """A palettized model on a Mac that cannot run it, refused with the reason and what to use
    instead (the catalog's float16 variant) before anything is downloaded or loaded."""
    from ...models import catalog

    if palettized and not machine.runs_palettized:
        instead = catalog.float16_variant(name)
        use = f"use {instead.alias} ({instead.repo}), its float16 variant," if instead else "use a float16 Core ML model"
        raise ModelInvalid(f"{name} has palettized weights, which Core ML runs from macOS 14 on, and this Mac has "
                           f"{machine.os}: {use} or update macOS")
