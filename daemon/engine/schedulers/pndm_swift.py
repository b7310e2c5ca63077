"""PNDM (PLMS only) as Diffusers for Mac runs it, for its exact image from a seed.

Follows apple/ml-stable-diffusion swift/StableDiffusion/pipeline/Scheduler.swift, class PNDMScheduler.
Its steps are diffusers' with skip_prk_steps, "leading" spacing and steps_offset 1 (SD's), and
past t = 0 it steps to ᾱ₀ (set_alpha_to_one false); where it departs from diffusers' PNDMScheduler:

* ᾱ is Swift's running float32 product, and the multistep weights are float32;
* the pipeline decodes the x₀ predicted from the last step's combined ε at its timestep, so the
  last step returns that instead of the step to t − stride.
"""

from __future__ import annotations

import numpy as np

from . import Noise, swift

# The Adams-Bashforth weights of the last 1 to 4 noise estimates, newest first (PNDM eq. 12).
_PLMS = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class PNDMSwift(swift.SwiftSchedule):
    DIFFUSERS_CLASS = "PNDMScheduler"  # the class it departs from, as listed above

    def set_timesteps(self, num_inference_steps: int) -> None:
        if num_inference_steps < 2:
            raise ValueError("pndm_swift needs at least 2 steps (Swift's PNDMScheduler fails on 1); use pndm")
        train = int(self.config["num_train_timesteps"])
        self._stride = train // num_inference_steps
        forward = np.arange(num_inference_steps, dtype=np.int64) * self._stride + 1
        self.timesteps = np.concatenate([forward[:-1], forward[-2:-1], forward[-1:]])[::-1].copy()
        self._counter = 0
        self._steps_left = len(self.timesteps)
        self._ets: list[np.ndarray] = []
        self._cur_sample = np.zeros(0, dtype=np.float32)

    def set_begin_index(self, begin_index: int) -> None:
        """Swift counts its steps from the first one it is given; the last (PNDM repeats a timestep,
        so it is known by count) is the last of the schedule."""
        self._steps_left = len(self.timesteps) - begin_index

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: Noise | None = None
    ) -> np.ndarray:
        t = int(timestep)
        prev_t = t - self._stride
        output = np.asarray(model_output, dtype=np.float32)
        sample = np.asarray(sample, dtype=np.float32)
        if self._counter != 1:
            self._ets = [*self._ets[-3:], output]
        else:
            prev_t, t = t, t + self._stride
        ets = self._ets
        if len(ets) == 1 and self._counter == 0:
            combined = output
            self._cur_sample = sample
        elif len(ets) == 1 and self._counter == 1:
            combined = swift.weighted_sum([1 / 2, 1 / 2], [output, ets[-1]])
            sample = self._cur_sample
        else:
            weights = _PLMS[min(len(ets), 4)]
            combined = swift.weighted_sum(weights, ets[::-1][: len(weights)])
        self._counter += 1
        self._steps_left -= 1
        if self._steps_left == 0:
            # Swift's pipeline decodes its scheduler's last x₀, not the last step's result.
            return swift.denoised(self.alphas_cumprod, combined, sample, t)
        return self._prev_sample(sample, t, prev_t, combined)

    def _prev_sample(self, sample: np.ndarray, t: int, prev_t: int, eps: np.ndarray) -> np.ndarray:
        """PNDM eq. 9 in Swift's float32 coefficients."""
        alpha, alpha_prev = self.alphas_cumprod[t], self.alphas_cumprod[max(0, prev_t)]
        one = np.float32(1)
        sample_coeff = np.sqrt(alpha_prev / alpha)
        denominator = alpha * np.sqrt(one - alpha_prev) + np.sqrt(alpha * (one - alpha) * alpha_prev)
        model_coeff = -(alpha_prev - alpha) / denominator
        return swift.weighted_sum([sample_coeff, model_coeff], [sample, eps])
