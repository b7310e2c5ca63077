"""Multistep latent consistency sampling (Luo et al. 2023, "Latent Consistency Models")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import Noise, check_supported
from .betas import alphas_cumprod_from_config, noised, predicted_original, refuse_zero_snr_epsilon

_SIGMA_DATA = np.float32(0.5)


class LCM:
    DIFFUSERS_CLASS = "LCMScheduler"
    # LCMScheduler also takes set_alpha_to_one, steps_offset and timestep_spacing but never uses
    # them: its steps never pass below t=0 and its schedule comes from original_inference_steps.
    DEFAULTS: Mapping[str, Any] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    }
    SUPPORTED: Mapping[str, tuple[Any, ...]] = {
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "thresholding": (False,),
    }

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = {**self.DEFAULTS, **config}
        check_supported(type(self).__name__, self.config, self.SUPPORTED)
        refuse_zero_snr_epsilon(type(self).__name__, self.config)
        self.alphas_cumprod = alphas_cumprod_from_config(self.config)
        self.init_noise_sigma = 1.0
        self.timesteps = np.zeros(0, dtype=np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Evenly spaced picks from the schedule the model was distilled on, not from all training timesteps."""
        train = int(self.config["num_train_timesteps"])
        original = int(self.config["original_inference_steps"])
        if original > train:
            raise ValueError(f"original_inference_steps {original} exceeds num_train_timesteps {train}")
        if num_inference_steps > original:
            raise ValueError(
                f"num_inference_steps {num_inference_steps} cannot be larger than original_inference_steps "
                f"{original}: LCM's steps are a subset of the schedule it was distilled on"
            )
        distilled = (np.arange(original, 0, -1, dtype=np.int64) * (train // original)) - 1
        picks = np.floor(np.linspace(0, original, num_inference_steps, endpoint=False)).astype(np.int64)
        self.timesteps = distilled[picks]

    def set_begin_index(self, begin_index: int) -> None:
        """LCM's timesteps are distinct, so each step finds its place in the schedule from its own timestep."""

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        return sample

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: Noise | None = None
    ) -> np.ndarray:
        t = int(timestep)
        (found,) = np.nonzero(self.timesteps == t)
        if found.size == 0:
            raise ValueError(f"timestep {t} is not in this schedule; call set_timesteps first")
        index = int(found[0])
        last = index == len(self.timesteps) - 1
        alpha_t = self.alphas_cumprod[t]
        x0 = predicted_original(self.config["prediction_type"], model_output, sample, alpha_t)
        if self.config["clip_sample"]:
            limit = np.float32(self.config["clip_sample_range"])
            x0 = np.clip(x0, -limit, limit)
        # The consistency boundary condition: denoised equals the sample as t -> 0.
        scaled_t = np.float32(t) * np.float32(self.config["timestep_scaling"])
        c_skip = _SIGMA_DATA**2 / (scaled_t**2 + _SIGMA_DATA**2)
        c_out = scaled_t / np.sqrt(scaled_t**2 + _SIGMA_DATA**2)
        denoised = c_out * x0 + c_skip * sample
        if last:
            return denoised.astype(np.float32, copy=False)
        if noise is None:
            raise ValueError("LCM draws fresh noise between steps: pass step() a noise callable")
        alpha_prev = self.alphas_cumprod[self.timesteps[index + 1]]
        fresh = noise(model_output.shape)
        prev = np.sqrt(alpha_prev) * denoised + np.sqrt(np.float32(1) - alpha_prev) * fresh
        return prev.astype(np.float32, copy=False)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        return noised(self.alphas_cumprod, original_samples, noise, timestep)
