"""PNDM's pseudo linear multistep sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import Noise, check_supported
from .betas import alphas_cumprod_from_config, noised, spaced_timesteps


class PNDM:
    DIFFUSERS_CLASS = "PNDMScheduler"
    # PNDMScheduler has no rescale_betas_zero_snr and ignores it in a model's config; so does this.
    DEFAULTS: Mapping[str, Any] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    SUPPORTED: Mapping[str, tuple[Any, ...]] = {
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": ("linspace", "leading", "trailing"),
    }

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = {**self.DEFAULTS, **config}
        check_supported(type(self).__name__, self.config, self.SUPPORTED)
        self.alphas_cumprod = alphas_cumprod_from_config(self.config)
        self.final_alpha_cumprod = (
            np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        )
        self.init_noise_sigma = 1.0
        self.timesteps = np.zeros(0, dtype=np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        train = int(self.config["num_train_timesteps"])
        ascending = spaced_timesteps(self.config, num_inference_steps)[::-1]
        self._stride = train // num_inference_steps
        if self.config["skip_prk_steps"]:
            # The second timestep comes twice: the repeat re-runs the first step with the two noise
            # estimates averaged, which stands in for the Runge-Kutta warm-up.
            prk = np.zeros(0, dtype=np.int64)
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        else:
            if num_inference_steps < 4:
                raise ValueError(
                    "skip_prk_steps=False (the Runge-Kutta warm-up) needs num_inference_steps >= 4; "
                    "set skip_prk_steps=True for fewer steps"
                )
            # Three Runge-Kutta steps from the top: each evaluates at t, twice at the midpoint, at the end.
            high, low = ascending[-3:][::-1], ascending[-4:-1][::-1]
            mid = low + self._stride // 2
            prk = np.stack([high, mid, mid, low], axis=1).ravel()
            plms = ascending[:-3][::-1]
        self._prk_count = len(prk)
        self.timesteps = np.concatenate([prk, plms]).astype(np.int64)
        self._counter = 0
        self._ets: list[np.ndarray] = []
        self._rk_sum: Any = 0.0
        self._cur_sample = np.zeros(0, dtype=np.float32)  # the sample at the step's start

    def set_begin_index(self, begin_index: int) -> None:
        """diffusers' PNDM counts its steps from the first one it is given, wherever that is; so does this."""

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        return sample

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: Noise | None = None
    ) -> np.ndarray:
        if self._counter < self._prk_count:
            prev = self._step_prk(model_output, int(timestep), sample)
        else:
            prev = self._step_plms(model_output, int(timestep), sample)
        self._counter += 1
        return prev.astype(np.float32, copy=False)

    def _step_prk(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        """RK4 in four calls, each moving from the step's start sample; the fourth uses the weighted mean."""
        phase = self._counter % 4
        prev_t = t - (0 if self._counter % 2 else self._stride // 2)
        start_t = int(self.timesteps[self._counter - phase])
        if phase == 0:
            self._rk_sum = self._rk_sum + 1 / 6 * model_output
            self._ets.append(model_output)
            self._cur_sample = sample
        elif phase in (1, 2):
            self._rk_sum = self._rk_sum + 1 / 3 * model_output
        else:
            model_output = self._rk_sum + 1 / 6 * model_output
            self._rk_sum = 0.0
        return self._prev_sample(self._cur_sample, start_t, prev_t, model_output)

    def _step_plms(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        """Adams-Bashforth over the last four model outputs, lower orders until four are known."""
        prev_t = t - self._stride
        if self._counter == 1:
            prev_t, t = t, t + self._stride
        else:
            self._ets = [*self._ets[-3:], model_output]
        ets = self._ets
        if self._counter == 0:
            self._cur_sample = sample
        elif self._counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample = self._cur_sample
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        return self._prev_sample(sample, t, prev_t, model_output)

    def _prev_sample(
        self, sample: np.ndarray, t: int, prev_t: int, model_output: np.ndarray
    ) -> np.ndarray:
        """x at prev_t from x at t (eq. 9). As diffusers does for v, a v or x0 output (already combined
        over steps) becomes a noise estimate here, at the current t and sample."""
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_t, beta_prev = np.float32(1) - alpha_t, np.float32(1) - alpha_prev
        prediction = self.config["prediction_type"]
        if prediction == "v_prediction":
            model_output = np.sqrt(alpha_t) * model_output + np.sqrt(beta_t) * sample
        elif prediction == "sample":
            model_output = (sample - np.sqrt(alpha_t) * model_output) / np.sqrt(beta_t)
        denominator = alpha_t * np.sqrt(beta_prev) + np.sqrt(alpha_t * beta_t * alpha_prev)
        coefficient = np.sqrt(alpha_prev / alpha_t)
        return coefficient * sample - (alpha_prev - alpha_t) * model_output / denominator

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        return noised(self.alphas_cumprod, original_samples, noise, timestep)
