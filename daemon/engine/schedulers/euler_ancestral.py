"""Euler ancestral sampler: k-diffusion's sample_euler_ancestral (η = 1), on Euler's σ schedule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import Noise
from .euler import Euler


class EulerAncestral(Euler):
    DIFFUSERS_CLASS = "EulerAncestralDiscreteScheduler"
    DEFAULTS: Mapping[str, Any] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    SUPPORTED: Mapping[str, tuple[Any, ...]] = {
        "prediction_type": ("epsilon", "v_prediction"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
    }

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: Noise | None = None
    ) -> np.ndarray:
        """Step deterministically down to σ_down, then add fresh noise of σ_up: σ_down² + σ_up² = σ_next².

        The noise is drawn on every step, the last (σ_up = 0) included, as diffusers draws it, so one
        seeded generator yields the same images here and there.
        """
        if noise is None:
            raise ValueError("EulerAncestral.step needs a noise source")
        index = self._current_index(timestep)
        sample = np.asarray(sample, dtype=np.float32)
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        next2 = sigma_next * sigma_next
        sigma_up = np.sqrt(next2 * (sigma * sigma - next2) / (sigma * sigma))
        # Rounding can make σ_next² − σ_up² a hair below zero where σ ≫ σ_next: that is σ_down = 0
        # (diffusers takes the square root of the negative and fills the latents with NaN).
        sigma_down = np.sqrt(np.maximum(next2 - sigma_up * sigma_up, np.float32(0)))
        derivative = (sample - self._denoised(model_output, sample, sigma)) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)
        prev_sample = prev_sample + np.asarray(noise(model_output.shape), dtype=np.float32) * sigma_up
        self._step_index = index + 1
        return prev_sample.astype(np.float32)
