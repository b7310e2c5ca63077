"""DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++", the multistep second-order data-prediction update."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import Noise, check_supported
from .sigmas import SigmaSteps, alphas_cumprod, karras_sigmas, sigma_to_t, training_sigmas

# diffusers reads a DEIS or UniPC model's solver settings this way when switching to this scheduler.
_ALIASES = {
    "algorithm_type": {"deis": "dpmsolver++"},
    "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"},
}


class DPMSolverPP2M(SigmaSteps):
    DIFFUSERS_CLASS = "DPMSolverMultistepScheduler"
    DEFAULTS: Mapping[str, Any] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    SUPPORTED: Mapping[str, tuple[Any, ...]] = {
        "solver_order": (2,),
        "algorithm_type": ("dpmsolver++",),
        "solver_type": ("midpoint", "heun"),
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "thresholding": (False,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_lu_lambdas": (False,),
        "use_flow_sigmas": (False,),
        "variance_type": (None,),
        "timestep_spacing": ("linspace", "leading", "trailing"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }
    init_noise_sigma = 1.0

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = {**self.DEFAULTS, **config}
        for key, aliases in _ALIASES.items():
            self.config[key] = aliases.get(self.config[key], self.config[key])
        check_supported(type(self).__name__, self.config, self.SUPPORTED)
        self.alphas_cumprod = alphas_cumprod(self.config)

    def set_timesteps(self, num_inference_steps: int) -> None:
        config, n = self.config, num_inference_steps
        train = config["num_train_timesteps"]
        ac = self.alphas_cumprod
        lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
        last = train - int(np.searchsorted(lambdas[::-1], config["lambda_min_clipped"]))
        if config["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif config["timestep_spacing"] == "leading":
            timesteps = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(np.int64)
            timesteps += config["steps_offset"]
        else:
            timesteps = np.arange(last, 0, -train / n).round().astype(np.int64) - 1
        if len(timesteps) < n:
            # diffusers steps over the shorter list, and img2img's start runs off its end.
            raise ValueError(
                f"this model's lambda_min_clipped={config['lambda_min_clipped']} with trailing spacing leaves "
                f"{len(timesteps)} timesteps for {n} steps; choose another scheduler (euler, ddim)"
            )

        train_sigmas = training_sigmas(ac)
        if config["use_karras_sigmas"]:
            sigmas = karras_sigmas(train_sigmas[0], train_sigmas[-1], n)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
            # diffusers leaves cosine-schedule timesteps unrounded, so they truncate to int64 below.
            if config["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            if n > 1 and int(timesteps[0]) == int(timesteps[1]):
                # diffusers would start at the repeat and run off the end of its sigmas.
                raise ValueError(
                    f"Karras sigmas on this model's {config['beta_schedule']} schedule repeat the first "
                    f"timestep at {n} steps; use fewer steps or the dpmpp_2m scheduler"
                )
        else:
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        last_sigma = train_sigmas[0] if config["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.append(sigmas, last_sigma).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        if config["solver_type"] == "heun" and any(
            self.sigmas[i] == self.sigmas[i + 1] for i in range(1, len(self.timesteps)) if not self._first_order_final(i)
        ):
            # heun's (e^−h − 1)/h is 0/0 on a step that does not move, as Karras sigmas ending at
            # sigma_min take at the end; diffusers returns NaN.
            raise ValueError(
                f"solver_type='heun' with {config['final_sigmas_type']!r} final sigmas takes a second-order step "
                f"of zero length at {n} steps (NaN in diffusers too); use fewer than 15 steps or the dpmpp_2m scheduler"
            )
        self._previous_x0: np.ndarray | None = None
        self._lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def _first_order_final(self, index: int) -> bool:
        """Whether step ``index`` is the last and diffusers takes it at first order."""
        config, count = self.config, len(self.timesteps)
        return index == count - 1 and (
            config["euler_at_final"]
            or (config["lower_order_final"] and count < 15)
            or config["final_sigmas_type"] == "zero"
        )

    def scale_model_input(self, sample: np.ndarray, timestep: int) -> np.ndarray:
        return sample

    def _alpha_sigma(self, index: int) -> tuple[np.float32, np.float32]:
        """VP-SDE coefficients (α_t, σ_t) = (1, σ)/√(σ²+1) of x_t = α_t x₀ + σ_t ε."""
        alpha = 1 / np.sqrt(self.sigmas[index] * self.sigmas[index] + 1)
        return alpha, self.sigmas[index] * alpha

    def _lambda(self, alpha: np.float32, sigma: np.float32) -> np.float32:
        """Half log-SNR λ = ln(α/σ); the final σ = 0 gives λ = ∞, which the first-order update absorbs."""
        with np.errstate(divide="ignore"):
            return np.log(alpha) - np.log(sigma)

    def _denoised(self, model_output: np.ndarray, sample: np.ndarray, index: int) -> np.ndarray:
        alpha, sigma = self._alpha_sigma(index)
        if self.config["prediction_type"] == "epsilon":
            return (sample - sigma * model_output) / alpha
        if self.config["prediction_type"] == "v_prediction":
            return alpha * sample - sigma * model_output
        return model_output

    def step(
        self, model_output: np.ndarray, timestep: int, sample: np.ndarray, noise: Noise | None = None
    ) -> np.ndarray:
        """First order on the first step (no history) and, where diffusers does, the last; else 2M."""
        index = self._current_index(timestep)
        config = self.config
        final = self._first_order_final(index)
        sample = np.asarray(sample, dtype=np.float32)
        x0 = self._denoised(model_output, sample, index)
        previous, self._previous_x0 = self._previous_x0, x0

        alpha_t, sigma_t = self._alpha_sigma(index + 1)
        alpha_s0, sigma_s0 = self._alpha_sigma(index)
        lambda_s0 = self._lambda(alpha_s0, sigma_s0)
        h = self._lambda(alpha_t, sigma_t) - lambda_s0
        phi = alpha_t * (np.exp(-h) - 1)
        prev_sample = (sigma_t / sigma_s0) * sample - phi * x0
        if self._lower_order_nums >= 1 and not final:
            with np.errstate(divide="ignore"):  # a zero-length step: r0 = ∞, no correction, as in diffusers
                r0 = (lambda_s0 - self._lambda(*self._alpha_sigma(index - 1))) / h
            d1 = (1 / r0) * (x0 - previous)
            if config["solver_type"] == "midpoint":
                prev_sample = prev_sample - (phi / 2) * d1
            else:
                prev_sample = prev_sample + (alpha_t * ((np.exp(-h) - 1) / h + 1)) * d1

        self._lower_order_nums = min(self._lower_order_nums + 1, 2)
        self._step_index = index + 1
        return prev_sample.astype(np.float32)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timestep: int) -> np.ndarray:
        alpha, sigma = self._alpha_sigma(self._noise_index(timestep))
        return (alpha * original_samples + sigma * noise).astype(np.float32)
