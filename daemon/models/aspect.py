"""Aspect ratios: a request may ask for a shape ("16:9") instead of a size, and gets the size its
model's family was trained nearest that shape (docs/engine.md, Sizes by aspect).

SDXL was fine-tuned on buckets of about 1024² pixels with sides in multiples of 64 (Podell et al.
2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis", §2.3
Multi-Aspect Training; the full table is its appendix I, from 2048×512 to 512×2048). The buckets
below are the subset SDXL tools offer (https://gofind.ai/stable-diffusion/sdxl-resolutions;
https://bits.jeremyschroeder.net/a-quick-sdxl-resolution-cheat-sheet/; each one is in the
paper's table, as github.com/marhensa/sdxl-recommended-res-calc transcribes it). SD 1.x/2.x publish
no buckets: the model's own area is kept, the ratio applied, each side rounded to the VAE's grid.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from .family import SD

SDXL_SIDE = 1024  # the side the buckets are given at; a model trained at another (SDXL-Turbo: 512) scales them
SDXL_BUCKETS = (  # (width, height)
    (1024, 1024),
    (1152, 896), (896, 1152),
    (1216, 832), (832, 1216),
    (1344, 768), (768, 1344),
    (1536, 640), (640, 1536),
)
# The widest shape asked for: the paper's widest bucket, 2048×512. Beyond it no SDXL image was
# trained, and on SD 1.x at 512² its short side would fall under 256 px.
WIDEST = Fraction(4)
ALLOWED = "a ratio W:H such as 16:9 or 2.39:1, from 1:4 to 4:1"
_FORM = re.compile(r"(\d{1,5}(?:\.\d{1,5})?):(\d{1,5}(?:\.\d{1,5})?)")


def parse(text: str) -> Fraction:
    """The ratio width/height of "W:H", exact (so "1.5:1" is 3:2); ValueError saying what is allowed."""
    match = _FORM.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or Fraction(match[2]) == 0:
        raise ValueError(f"must be {ALLOWED}, got {text!r}")
    ratio = Fraction(match[1]) / Fraction(match[2])
    if not 1 / WIDEST <= ratio <= WIDEST:
        raise ValueError(f"{text} is outside what is allowed: {ALLOWED}")
    return ratio


def written(ratio: Fraction) -> str:
    """A ratio as W:H in lowest terms (1344x768 → 7:4)."""
    return f"{ratio.numerator}:{ratio.denominator}"


def nearest_bucket(ratio: Fraction) -> tuple[int, int]:
    """The SDXL bucket whose shape is nearest, compared as logarithms so 16:9 and 9:16 are as near
    to their buckets; a tie goes to the first in the table."""
    return min(SDXL_BUCKETS, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(ratio)))


def trained_ratio(family: str, ratio: Fraction) -> Fraction:
    """The shape a family's model makes for an asked one: its nearest bucket's (SDXL), or the
    ratio itself (SD 1.x/2.x, which has no buckets)."""
    return ratio if family == SD else Fraction(*nearest_bucket(ratio))


def size(family: str, ratio: Fraction, native: tuple[int, int], grid: int) -> tuple[int, int]:
    """(width, height) for a ratio on a model of this family trained at ``native`` (width, height),
    each side a multiple of ``grid``. SDXL (base, refiner, Turbo): the nearest bucket, scaled from
    1024² to the native area. SD: the native area in that ratio."""
    area = native[0] * native[1]
    if family == SD:
        width, height = math.sqrt(area * ratio), math.sqrt(area / ratio)
    else:
        scale = math.sqrt(area) / SDXL_SIDE
        bucket = nearest_bucket(ratio)
        width, height = bucket[0] * scale, bucket[1] * scale
    return _on_grid(width, grid), _on_grid(height, grid)


def _on_grid(side: float, grid: int) -> int:
    """The nearest multiple of the grid, halves up (not Python's round-half-even), at least one."""
    return max(grid, math.floor(side / grid + 0.5) * grid)
