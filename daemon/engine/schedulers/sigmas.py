"""Noise levels σ = √((1 − ᾱ)/ᾱ) shared by the sigma-based schedulers (Euler, Euler a, DPM++ 2M).

Karras sigmas follow Karras et al. 2022, "Elucidating the Design Space…", eq. 5 with ρ = 7.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .betas import alphas_cumprod_from_config


def alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
    """ᾱ for the σ schedulers: zero-SNR's last ᾱ is 0 (σ = ∞), so diffusers pins it to 2⁻²⁴."""
    result = alphas_cumprod_from_config(dict(config))
    if config.get("rescale_betas_zero_snr"):
        result[-1] = 2.0**-24
    return result


def training_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """σ for every training timestep, ascending with t, in float32 as diffusers computes it."""
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """Karras et al. 2022, eq. 5, in float64: interpolating σ^(1/ρ) spends more steps at low noise."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho, max_inv_rho = float(sigma_min) ** (1 / 7), float(sigma_max) ** (1 / 7)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** 7.0


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of arbitrary σ, interpolating linearly in log σ as diffusers does."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigmas))


class SigmaSteps:
    """Where a σ-scheduler stands in its schedule, found the way diffusers finds it: from
    set_begin_index (img2img) or else from the first timestep it is given, then counted."""

    timesteps: np.ndarray
    _step_index: int | None = None
    _begin_index: int | None = None

    def set_begin_index(self, begin_index: int) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: float) -> int:
        """The second match when a timestep repeats, so an img2img start skips no σ; the last
        index when it is absent."""
        indices = np.flatnonzero(self.timesteps == timestep)
        if len(indices) == 0:
            return len(self.timesteps) - 1
        return int(indices[1 if len(indices) > 1 else 0])

    def _current_index(self, timestep: float) -> int:
        if self._step_index is None:
            begin = self._begin_index
            self._step_index = begin if begin is not None else self.index_for_timestep(timestep)
        return self._step_index

    def _noise_index(self, timestep: float) -> int:
        """The σ that add_noise uses: img2img's start, or the given timestep's."""
        if self._begin_index is None:
            return self.index_for_timestep(timestep)
        return self._step_index if self._step_index is not None else self._begin_index
