"""Noise schedules shared by every scheduler: the training betas and their cumulative alphas.

Computed in float32 as the schedules were trained and as diffusers computes them, so that the
NumPy schedulers reproduce diffusers' steps to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _alpha_bar_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021, eq. 17)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
            for i in range(num_train_timesteps)
        ],
        dtype=np.float32,
    )


def _linspace32(start: float, stop: float, num: int) -> np.ndarray:
    """float32 linspace bit-equal to torch's: a float32 step, fused multiply-add from both ends."""
    if num == 1:
        return np.array([start], dtype=np.float32)
    first, last = np.float32(start), np.float32(stop)
    step = np.float64(np.float32((last - first) / np.float32(num - 1)))
    i = np.arange(num, dtype=np.float64)
    values = np.where(i < num // 2, np.float64(first) + step * i, np.float64(last) - step * (num - 1 - i))
    return values.astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Make the last timestep pure noise (Lin et al. 2023, "Common Diffusion Noise Schedules…", alg. 1).

    Operation for operation diffusers' float32 computation, so equal to it bit for bit wherever
    float32 √ is correctly rounded, as IEEE 754 requires (NumPy; torch on Apple silicon and CUDA).
    torch's x86 CPU build takes √ from MKL, one ulp off on about a fifth of inputs, and
    1 − ᾱ_t/ᾱ_{t−1} cancels near t = 0, so there diffusers' own σ moves by up to ~0.1 % (more on
    the cosine schedule) from one machine to another: that is diffusers' rounding, not the schedule.
    """
    alphas_bar_sqrt = np.sqrt(_cumprod32(1.0 - betas))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def betas_from_config(config: dict[str, Any]) -> np.ndarray:
    """Training betas named by a diffusers scheduler config (trained_betas or beta_schedule)."""
    n = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
    elif config["beta_schedule"] == "linear":
        betas = _linspace32(config["beta_start"], config["beta_end"], n)
    elif config["beta_schedule"] == "scaled_linear":
        betas = _linspace32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n) ** 2
    elif config["beta_schedule"] == "squaredcos_cap_v2":
        betas = _alpha_bar_betas(n)
    else:
        raise ValueError(f"unsupported beta_schedule {config['beta_schedule']!r}")
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def refuse_zero_snr_epsilon(owner: str, config: dict[str, Any]) -> None:
    """Zero-SNR's last ᾱ is 0, where x₀ = (x − √(1−ᾱ)·ε)/√ᾱ divides by zero: diffusers returns NaN.
    Schedulers that step on ᾱ itself (DDIM, LCM) refuse an ε-model there (Lin et al. 2023, §3.2:
    zero SNR needs v-prediction)."""
    if config.get("rescale_betas_zero_snr") and config["prediction_type"] == "epsilon":
        raise ValueError(
            f"{owner} cannot run rescale_betas_zero_snr with prediction_type='epsilon': the last timestep's "
            "ᾱ is 0 and x₀ = (x − ε)/0 is NaN; zero-SNR models predict v, so set prediction_type to "
            "'v_prediction' if the model does, or use euler or dpmpp_2m, which keep ᾱ above 0"
        )


def _cumprod32(values: np.ndarray) -> np.ndarray:
    """float32 cumulative product accumulated in float64, as torch does on the CPU."""
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def alphas_cumprod_from_config(config: dict[str, Any]) -> np.ndarray:
    return _cumprod32(1.0 - betas_from_config(config))


def noised(alphas_cumprod: np.ndarray, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
    """The forward process at a timestep: x_t = √ᾱ·x₀ + √(1−ᾱ)·ε (DDPM, Ho et al. 2020, eq. 4)."""
    alpha = alphas_cumprod[int(timestep)]
    return (np.sqrt(alpha) * original + np.sqrt(np.float32(1) - alpha) * noise).astype(np.float32, copy=False)


def predicted_original(prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha: np.float32) -> np.ndarray:
    """x₀ from what the model predicts: the noise ε, x₀ itself, or v = √ᾱ·ε − √(1−ᾱ)·x₀."""
    beta = np.float32(1) - alpha
    if prediction_type == "epsilon":
        return (sample - np.sqrt(beta) * model_output) / np.sqrt(alpha)
    if prediction_type == "sample":
        return model_output
    return np.sqrt(alpha) * sample - np.sqrt(beta) * model_output


def spaced_timesteps(config: dict[str, Any], num_inference_steps: int) -> np.ndarray:
    """The integer timesteps of the discrete-time schedulers, high to low, by diffusers'
    `timestep_spacing` (Lin et al. 2023, table 2: linspace, leading, trailing)."""
    train = int(config["num_train_timesteps"])
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        timesteps = np.linspace(0, train - 1, num_inference_steps).round()[::-1]
    elif spacing == "leading":
        timesteps = (np.arange(num_inference_steps) * (train // num_inference_steps))[::-1] + config["steps_offset"]
    else:
        timesteps = np.round(np.arange(train, 0, -train / num_inference_steps)) - 1
    return timesteps.astype(np.int64)
