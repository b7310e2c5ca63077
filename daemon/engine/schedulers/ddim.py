"""Deterministic DDIM sampling (Song et al. 2020, "Denoising Diffusion Implicit Models", eq. 12 with eta = 0)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import Noise, check_supported
from .betas import alphas_cumprod_from_config, noised, predicted_original, refuse_zero_snr_epsilon, spaced_timesteps


class DDIM:
    DIFFUSERS_CLASS = "DDIMScheduler"
    DEFAULTS: Mapping[str, Any] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    SUPPORTED: Mapping[str, tuple[Any, ...]] = {
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "thresholding": (False,),
    }

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = {**self.DEFAULTS, **config}
        check_supported(type(self).__name__, self.config, self.SUPPORTED)
        refuse_zero_snr_epsilon(type(self).__name__, self.config)
        self.alphas_cumprod = alphas_cumprod_from_config(self.config)
        # The step past t=0 lands on "no noise at all" or, as SD ships, on the first training alpha.
        self.final_alpha_cumprod = (
            np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        )
        self.init_noise_sigma = 1.0
        self.timesteps = np.zeros(0, dtype=np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        train = int(self.config["num_train_timesteps"])
        if num_inference_steps > train:
            raise ValueError(f"num_inference_steps {num_inference_steps} exceeds num_train_timesteps {train}")
        self.timesteps = spaced_timesteps(self.config, num_inference_steps)
        # diffusers steps back by this fixed stride, whatever the spacing, so the last step may skip past 0.
        self._stride = train // num_inference_steps

    def set_begin_index(self, begin_index: int) -> None:
        """Each step depends only on its own timestep, so where img2img begins needs no bookkeeping."""

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        return sample

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: Noise | None = None
    ) -> np.ndarray:
        t = int(timestep)
        prev_t = t - self._stride
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_t = np.float32(1) - alpha_t
        prediction = self.config["prediction_type"]
        x0 = predicted_original(prediction, model_output, sample, alpha_t)
        if prediction == "epsilon":
            eps = model_output
        elif prediction == "sample":
            eps = (sample - np.sqrt(alpha_t) * x0) / np.sqrt(beta_t)
        else:
            eps = np.sqrt(alpha_t) * model_output + np.sqrt(beta_t) * sample
        if self.config["clip_sample"]:
            limit = np.float32(self.config["clip_sample_range"])
            x0 = np.clip(x0, -limit, limit)
        prev = np.sqrt(alpha_prev) * x0 + np.sqrt(np.float32(1) - alpha_prev) * eps
        return prev.astype(np.float32, copy=False)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        return noised(self.alphas_cumprod, original_samples, noise, timestep)
