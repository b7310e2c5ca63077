"""The procedural judge: reads a scene's attributes back from pixels, with no learned model.

Background: the median colour of the border ring. The shape: pixels nearer the dominant
non-background colour than the background, its largest 4-connected piece. Colour: that piece's
median pixel, named by the nearest palette entry. Shape: how much of its bounding box it fills
(square 1, circle π/4, triangle 1/2) and whether its mass sits low (an upright triangle). Size:
its area. Position: its bounding box's centre in thirds of the canvas (the generator places
shapes by that centre; a triangle's centroid sits a sixth of its height lower).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .scene import AREA, ATTRIBUTES, COLOURS, SHAPES

PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)
NAMES = list(COLOURS)
SMALL_LARGE_AREA = float(np.sqrt(AREA["small"] * AREA["large"]))  # the geometric midpoint
NOTHING = "nothing"  # what the judge reads where it finds no shape


def nearest_colour(rgb: np.ndarray) -> str:
    return NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]


def largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (stray pixels of a generated image dropped)."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, piece = [start], []
        while stack:
            y, x = stack.pop()
            piece.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(piece) > len(best):
            best = piece
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def read(image: Image.Image) -> dict[str, str]:
    """The attributes the judge sees in an image of this world (any square size)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    size = pixels.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(border, axis=0)
    seen = {"background": nearest_colour(background_rgb)}
    distance = np.linalg.norm(pixels - background_rgb, axis=2)
    # The shape's colour: the median of the pixels clearly off the background (half the largest
    # distance and at least a third of the closest two palette colours' distance).
    off = distance > max(0.5 * distance.max(), 35.0)
    if off.sum() < 4:
        return {**seen, **{key: NOTHING for key in ATTRIBUTES if key != "background"}}
    shape_rgb = np.median(pixels[off], axis=0)
    seen["colour"] = nearest_colour(shape_rgb)
    # Coverage along the background → shape colour line: 0 is background, 1 is the shape.
    axis = shape_rgb - background_rgb
    coverage = ((pixels - background_rgb) @ axis) / float(axis @ axis)
    piece = largest_piece(coverage > 0.5)
    ys, xs = np.nonzero(piece)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = coverage[top:bottom, left:right].clip(0.0, 1.0) * (coverage[top:bottom, left:right] > 0.25)
    fill = piece.sum() / float((bottom - top) * (right - left))
    middle = (top + bottom) / 2.0
    upper = piece[top : int(np.floor(middle))].sum()
    lower = piece[int(np.ceil(middle)) : bottom].sum()
    if upper < 0.6 * lower:
        seen["shape"] = "triangle"
    else:
        seen["shape"] = "square" if fill >= 0.88 else "circle" if fill >= 0.65 else "triangle"
    scale = 64.0 / size
    seen["size"] = "large" if box.sum() * scale * scale >= SMALL_LARGE_AREA else "small"
    column = ("left", "", "right")[min(2, int(3 * ((left + right) / 2.0) / size))]
    row = ("top", "", "bottom")[min(2, int(3 * middle / size))]
    seen["position"] = " ".join(part for part in (row, column) if part) or "centre"
    return seen


def check(image: Image.Image, named: dict[str, str]) -> dict[str, bool]:
    """For each attribute a caption names, whether the image shows it."""
    seen = read(image)
    return {key: seen[key] == value for key, value in named.items()}


@dataclass
class Tally:
    """Agreement per attribute over many images, and which shape was read for which asked."""

    right: Counter = field(default_factory=Counter)
    asked: Counter = field(default_factory=Counter)
    shapes: Counter = field(default_factory=Counter)  # (asked, read) → count

    def add(self, image: Image.Image, named: dict[str, str]) -> None:
        seen = read(image)
        for key, value in named.items():
            self.asked[key] += 1
            self.right[key] += seen[key] == value
        if "shape" in named:
            self.shapes[named["shape"], seen["shape"]] += 1

    def accuracy(self, key: str) -> float:
        return self.right[key] / self.asked[key]

    def report(self) -> str:
        """Each attribute's agreement and the shape confusion, as plain text."""
        lines = [f"{key:<10} {self.accuracy(key):6.1%}  ({self.right[key]}/{self.asked[key]})"
                 for key in ATTRIBUTES if self.asked[key]]
        read_as = [*SHAPES, NOTHING]
        lines.append("shape asked \\ read  " + "  ".join(f"{name:>8}" for name in read_as))
        for asked in SHAPES:
            lines.append(f"{asked:<19} " + "  ".join(f"{self.shapes[asked, name]:>8}" for name in read_as))
        return "\n".join(lines)
