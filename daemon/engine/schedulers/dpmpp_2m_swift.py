"""DPM-Solver++(2M) as Diffusers for Mac runs it, for its exact image from a seed.

Follows apple/ml-stable-diffusion swift/StableDiffusion/pipeline/DPMSolverMultistepScheduler.swift
(linspace spacing, DfM's default for SD). Where it departs from diffusers' DPMSolverMultistepScheduler:

* timesteps from Swift's float32 linspace, rounded half away from zero (6, 12, 14, 18, 24… steps differ);
* below 15 steps the penultimate step is first order too, not only the last;
* ᾱ is Swift's running float32 product, and α, σ, λ come from it at integer timesteps;
* the pipeline decodes the x₀ predicted at the last timestep, so the last step returns that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import Noise, swift


class DPMSolverPP2MSwift(swift.SwiftSchedule):
    DIFFUSERS_CLASS = "DPMSolverMultistepScheduler"  # the class it departs from, as listed above

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.alpha_t = np.sqrt(self.alphas_cumprod)
        self.sigma_t = np.sqrt(np.float32(1) - self.alphas_cumprod)
        self.lambda_t = np.log(self.alpha_t) - np.log(self.sigma_t)

    def set_timesteps(self, num_inference_steps: int) -> None:
        train = int(self.config["num_train_timesteps"])
        spaced = swift.linspace(0, train - 1, num_inference_steps + 1)[1:][::-1]
        self.timesteps = swift.round_half_away(spaced)
        self._outputs: list[np.ndarray] = []
        self._stepped = 0

    def set_begin_index(self, begin_index: int) -> None:
        """Swift finds each step's place from its timestep, and counts its history from the first it is given."""

    def order_at(self, index: int) -> int:
        """Swift's solver order at step ``index``: first with no history and, below 15 steps, on the last two."""
        count = len(self.timesteps)
        if self._stepped < 1 or (count < 15 and index >= count - 2):
            return 1
        return 2

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: Noise | None = None
    ) -> np.ndarray:
        t = int(timestep)
        found = np.flatnonzero(self.timesteps == t)
        count = len(self.timesteps)
        index = int(found[0]) if len(found) else count - 1
        last = index == count - 1
        sample = np.asarray(sample, dtype=np.float32)
        x0 = swift.denoised(self.alphas_cumprod, np.asarray(model_output, dtype=np.float32), sample, t)
        self._outputs = [*self._outputs[-1:], x0]
        if last:
            # Swift's pipeline decodes its scheduler's last x₀, not the last step's result.
            return x0

        prev_t = int(self.timesteps[index + 1])
        lambda_p, lambda_s0 = float(self.lambda_t[prev_t]), float(self.lambda_t[t])
        alpha_p, sigma_p, sigma_s0 = float(self.alpha_t[prev_t]), float(self.sigma_t[prev_t]), float(self.sigma_t[t])
        h = lambda_p - lambda_s0
        phi = -alpha_p * (np.exp(-h) - 1)
        if self.order_at(index) == 1:
            prev = swift.weighted_sum([sigma_p / sigma_s0, phi], [sample, x0])
        else:
            h_0 = lambda_s0 - float(self.lambda_t[int(self.timesteps[index - 1])])
            r0 = h_0 / h
            d1 = swift.weighted_sum([1 / r0, -1 / r0], self._outputs[::-1])
            prev = swift.weighted_sum([sigma_p / sigma_s0, phi, 0.5 * phi], [sample, x0, d1])
        self._stepped = min(self._stepped + 1, 2)
        return prev
