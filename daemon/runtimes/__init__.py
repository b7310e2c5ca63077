"""Runtimes run a model's networks: NumPy in, NumPy out. The pipeline around them lives once.

Each runtime implements :class:`Runtime`; the arrays are float32 except token ids (int64).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runtime(Protocol):
    def encode_text(self, input_ids: np.ndarray) -> np.ndarray:
        """(B, 77) token ids → (B, 77, C) hidden states."""

    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, hidden_states: np.ndarray) -> np.ndarray:
        """UNet: (B, 4, h, w) latents at a timestep, conditioned on (B, 77, C) → the model output."""

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """VAE decoder: unscaled (B, 4, h, w) latents → (B, 3, H, W) images in [-1, 1]."""

    def encode(self, images: np.ndarray) -> np.ndarray:
        """VAE encoder: (B, 3, H, W) images in [-1, 1] → (B, 2·4, h, w) latent mean and log-variance."""

    def check_safety(self, clip_input: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Safety checker: CLIP pixels and (B, H, W, 3) images in [0, 1] → (B,) bool, True = flagged."""
