"""Runtimes run a model's networks: NumPy in, NumPy out. The pipeline around them lives once.

Each runtime implements :class:`Runtime`; the arrays are float32 except token ids (int64).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import ModelInvalid

if TYPE_CHECKING:
    from ..coreml_model import CoreMLFolder
    from ..model import ModelFolder


class Runtime(Protocol):
    def encode_text(self, input_ids: np.ndarray) -> np.ndarray:
        """(B, 77) token ids → (B, 77, C) hidden states."""

    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, hidden_states: np.ndarray) -> np.ndarray:
        """UNet: (B, 4, h, w) latents at a timestep, conditioned on (B, 77, C) → the model output."""

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """VAE decoder: unscaled (B, 4, h, w) latents → (B, 3, H, W) images in [-1, 1]."""

    def encode(self, images: np.ndarray) -> np.ndarray:
        """VAE encoder: (B, 3, H, W) images in [-1, 1] → (B, 2·4, h, w) latent mean and log-variance."""

    def check_safety(self, clip_input: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Safety checker: CLIP pixels and (B, H, W, 3) images in [0, 1] → (B,) bool, True = flagged."""


def open_runtime(
    model: ModelFolder | CoreMLFolder,
    runtime: str,
    device: str,
    compute_units: str,
    with_safety_checker: bool,
    state_dir: Path,
    **torch_options: Any,
) -> Runtime:
    """The runtime a model needs: Core ML models on coreml (with `auto` compute units resolved from
    the bench store in `state_dir`, else the rule), diffusers-format ones on torch (`torch_options`
    go to TorchRuntime). The config's `runtime` only refuses a mismatch, saying what to do."""
    if model.runtime == "coreml":
        from ..compute_units import choose
        from ..hardware import this_machine
        from .coreml_runtime import CoreMLRuntime

        return CoreMLRuntime(model, choose(compute_units, state_dir, this_machine(), model.name), with_safety_checker)
    if runtime == "coreml":
        raise ModelInvalid(f"{model.name} is a diffusers-format model and the runtime is coreml: convert it first "
                           f"(diffusiond convert {model.path} --out DIR) and use DIR as the model")
    from .torch_runtime import TorchRuntime

    return TorchRuntime(model.path, device, with_safety_checker=with_safety_checker, **torch_options)
