"""The float32 arithmetic of Apple's Swift pipeline (apple/ml-stable-diffusion, swift/StableDiffusion/
pipeline/Scheduler.swift), shared by the schedulers that reproduce Diffusers for Mac's images.

Swift ignores the model's scheduler_config.json beyond what its initialisers take: a linear or
scaled-linear beta range over the training steps, and ε-prediction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import check_supported

# The config keys Swift's schedulers take (its defaults are SD's) and the values it can run.
DEFAULTS: Mapping[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}
SUPPORTED: Mapping[str, tuple[Any, ...]] = {
    "beta_schedule": ("linear", "scaled_linear"),
    "trained_betas": (None,),
    "prediction_type": ("epsilon",),
    "rescale_betas_zero_snr": (False,),
}


def linspace(start: float, end: float, count: int) -> np.ndarray:
    """Swift's helper: a float32 step, then i·step + start, each rounded to float32 (no fused add)."""
    first = np.float32(start)
    scale = np.float32(np.float32(end) - first) / np.float32(count - 1)
    products = np.arange(count, dtype=np.float32) * scale
    return (products + first).astype(np.float32)


def round_half_away(values: np.ndarray) -> np.ndarray:
    """Swift's ``round``: halves go away from zero (NumPy's go to even)."""
    floor = np.floor(values)
    return np.where(values - floor >= 0.5, floor + 1, floor).astype(np.int64)


def alphas_cumprod(owner: str, config: Mapping[str, Any]) -> np.ndarray:
    """ᾱ as Swift builds it: float32 betas, then a running float32 product (not accumulated wider)."""
    check_supported(owner, config, SUPPORTED)
    n = int(config["num_train_timesteps"])
    if config["beta_schedule"] == "linear":
        betas = linspace(config["beta_start"], config["beta_end"], n)
    else:
        half = np.float32(0.5)
        roots = linspace(np.power(np.float32(config["beta_start"]), half), np.power(np.float32(config["beta_end"]), half), n)
        betas = roots * roots
    return np.cumprod(np.float32(1) - betas, dtype=np.float32)


def weighted_sum(weights: Sequence[float], arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Σ wᵢ·aᵢ as Swift's weightedSum: float64 weights cast to float32, accumulated in order."""
    total = np.zeros_like(np.asarray(arrays[0], dtype=np.float32))
    for weight, array in zip(weights, arrays):
        total = total + np.float32(weight) * np.asarray(array, dtype=np.float32)
    return total


def denoised(alphas_cumprod: np.ndarray, model_output: np.ndarray, sample: np.ndarray, timestep: int) -> np.ndarray:
    """x₀ = (x − ε·√(1−ᾱ))/√ᾱ in float32: what Swift's schedulers keep, and what its pipeline decodes."""
    alpha = np.sqrt(alphas_cumprod[timestep])
    sigma = np.sqrt(np.float32(1) - alphas_cumprod[timestep])
    return ((sample - model_output * sigma) / alpha).astype(np.float32)


class SwiftSchedule:
    """What Swift's schedulers share: SD's defaults, ᾱ, unscaled inputs and the img2img start."""

    DEFAULTS: Mapping[str, Any] = DEFAULTS
    init_noise_sigma = 1.0

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = {**self.DEFAULTS, **config}
        self.alphas_cumprod = alphas_cumprod(type(self).__name__, self.config)
        self.timesteps = np.zeros(0, dtype=np.int64)

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        return sample

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        """Swift's img2img start: √ᾱ·x₀ + √(1−ᾱ)·ε at the first kept timestep."""
        alpha = self.alphas_cumprod[int(timestep)]
        return weighted_sum([np.sqrt(alpha), np.sqrt(np.float32(1) - alpha)], [original_samples, noise])
