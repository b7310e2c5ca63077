"""Euler sampler in σ-space: Karras et al. 2022, "Elucidating the Design Space…", alg. 2, S_churn = 0."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import Noise, check_supported
from .sigmas import SigmaSteps, alphas_cumprod, karras_sigmas, sigma_to_t, training_sigmas


class Euler(SigmaSteps):
    DIFFUSERS_CLASS = "EulerDiscreteScheduler"
    DEFAULTS: Mapping[str, Any] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }
    SUPPORTED: Mapping[str, tuple[Any, ...]] = {
        "prediction_type": ("epsilon", "v_prediction", "sample", "original_sample"),
        "interpolation_type": ("linear",),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "timestep_type": ("discrete", "continuous"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }

    def __init__(self, config: Mapping[str, Any]) -> None:
        # Euler a shares this schedule: Euler's keys it lacks keep their defaults, which are its behaviour.
        own = {key: value for key, value in config.items() if key in self.DEFAULTS}
        self.config = {**Euler.DEFAULTS, **self.DEFAULTS, **own}
        check_supported(type(self).__name__, self.config, self.SUPPORTED)
        self.alphas_cumprod = alphas_cumprod(self.config)

    def set_timesteps(self, num_inference_steps: int) -> None:
        config, n = self.config, num_inference_steps
        train = config["num_train_timesteps"]
        if config["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, train - 1, n, dtype=np.float32)[::-1].copy()
        elif config["timestep_spacing"] == "leading":
            timesteps = (np.arange(0, n) * (train // n)).round()[::-1].astype(np.float32)
            timesteps += config["steps_offset"]
        else:
            timesteps = np.arange(train, 0, -train / n).round().astype(np.float32) - 1

        train_sigmas = training_sigmas(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        if config["use_karras_sigmas"]:
            sigma_min = config["sigma_min"] if config["sigma_min"] is not None else sigmas[-1]
            sigma_max = config["sigma_max"] if config["sigma_max"] is not None else sigmas[0]
            sigmas = karras_sigmas(sigma_min, sigma_max, n)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
        last = train_sigmas[0] if config["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.append(sigmas, last).astype(np.float32)

        if config["timestep_type"] == "continuous" and config["prediction_type"] == "v_prediction":
            # EDM-style models are conditioned on c_noise = ln(σ)/4 rather than on t.
            timesteps = np.float32(0.25) * np.log(self.sigmas[:-1])
        self.timesteps = timesteps.astype(np.float32)
        self._step_index = None
        self._begin_index = None

    @property
    def init_noise_sigma(self) -> float:
        """σ_max, but √(σ_max²+1) for "leading" spacing, as diffusers (and so every pipeline) scales it."""
        sigma = self.sigmas.max()
        if self.config["timestep_spacing"] == "leading":
            sigma = np.sqrt(sigma * sigma + 1)
        return float(sigma)

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        """The model was trained on x/√(σ²+1) (unit variance), not on the σ-scaled x the sampler carries."""
        sigma = self.sigmas[self._current_index(timestep)]
        return (sample / np.sqrt(sigma * sigma + 1)).astype(np.float32)

    def _denoised(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        prediction = self.config["prediction_type"]
        if prediction == "epsilon":
            return sample - sigma * model_output
        if prediction == "v_prediction":
            return model_output * (-sigma / np.sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1)
        return model_output

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: Noise | None = None
    ) -> np.ndarray:
        index = self._current_index(timestep)
        sample = np.asarray(sample, dtype=np.float32)
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        derivative = (sample - self._denoised(model_output, sample, sigma)) / sigma
        self._step_index = index + 1
        return (sample + derivative * (sigma_next - sigma)).astype(np.float32)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        return (original_samples + noise * self.sigmas[self._noise_index(timestep)]).astype(np.float32)
