"""Previews of a job in progress: its current latents as a small JPEG, without the VAE.

A linear map from SD's four latent channels to RGB (Keturn's approximation of the SD 1.x/2.x
VAE decoder) costs microseconds, so a preview never slows the step it shows.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

_LATENT_TO_RGB = np.array(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]],
    dtype=np.float32,
)


def preview_jpeg(latents: np.ndarray, quality: int = 70) -> bytes | None:
    """The first image of (B, 4, h, w) latents as an h×w JPEG; None for other latent layouts."""
    if latents.ndim != 4 or latents.shape[1] != 4:
        return None
    rgb = np.tensordot(latents[0].transpose(1, 2, 0), _LATENT_TO_RGB, axes=1)
    pixels = np.clip((rgb + 1) * 127.5, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
