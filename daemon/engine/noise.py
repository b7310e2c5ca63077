"""Seeded noise. One seed gives one image on every runtime and machine.

``numpy`` is the generator of Apple's ml-stable-diffusion and Diffusers for Mac
(``RandomState(seed)``, images drawn one after another), so their seeds reproduce here.
``torch`` draws from a CPU ``torch.Generator`` in the order diffusers does, so diffusers' seeds
reproduce too (for float32 pipelines; diffusers draws fp16 pipelines' noise in half precision).
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidParameter
from .schedulers import Noise

RNGS = ("numpy", "torch")


def noise_source(rng: str, seed: int) -> Noise:
    if rng == "numpy":
        state = np.random.RandomState(seed)
        return lambda shape: state.standard_normal(shape).astype(np.float32)
    if rng == "torch":
        try:
            import torch
        except ImportError:
            raise InvalidParameter("rng", "'torch' needs PyTorch installed; use rng 'numpy'") from None
        generator = torch.Generator("cpu").manual_seed(seed)
        return lambda shape: torch.randn(shape, generator=generator, dtype=torch.float32).numpy()
    raise InvalidParameter("rng", f"unknown generator {rng!r}; choose one of {', '.join(RNGS)}")
