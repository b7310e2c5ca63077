"""The toy model's world: one flat-coloured shape on a flat background, and captions that name it.

Everything here is deterministic from a seed, so the training data, the held-out split and the
judge's test scenes are the same on every machine. Images are drawn at SUPERSAMPLE times the
canvas and box-filtered down: crisp edges with anti-aliasing, as a camera would see them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # the model's native width and height in pixels
SUPERSAMPLE = 4

# Eight colours far apart in RGB (the nearest pair, red and orange, are 105 apart), so the judge
# can name a pixel's colour by the nearest entry.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 130, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Where the shape's bounding-box centre sits, as fractions of the canvas (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "centre": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
# Shape area in pixels of the 64-pixel canvas: small and large differ 3.5 times, so area alone
# tells them apart; the largest shape still fits a corner cell.
AREA = {"small": 100.0, "large": 350.0}
JITTER = 2.0  # pixels the centre may move off its cell's centre, either way on each axis

# Ways to say where the shape is; the first is the canonical one.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("at the top left", "in the top left corner"),
    "top": ("at the top", "near the top"),
    "top right": ("at the top right", "in the top right corner"),
    "left": ("on the left", "on the left side"),
    "centre": ("in the centre", "in the middle"),
    "right": ("on the right", "on the right side"),
    "bottom left": ("at the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("at the bottom right", "in the bottom right corner"),
}

# Phrasings; each names the colour and the shape, and some of size, position and background.
TEMPLATES = (
    "a {size} {colour} {shape} {position} on a {background} background",
    "a {colour} {shape} on a {background} background",
    "a {size} {colour} {shape} {position}",
    "a {colour} {shape} {position}",
    "a {background} background with a {size} {colour} {shape} {position}",
    "a {colour} {shape} {position}, {background} background",
    "a {size} {colour} {shape}",
    "a {colour} {shape}",
    "a picture of a {size} {colour} {shape} on {background}",
)
ATTRIBUTES = ("shape", "colour", "background", "size", "position")


@dataclass(frozen=True)
class Scene:
    """One picture's facts; `offset` is the centre's jitter in pixels."""

    shape: str
    colour: str
    background: str
    size: str
    position: str
    offset: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Caption:
    """A caption's text and the attributes it names (those the judge can hold the image to)."""

    text: str
    named: dict[str, str]


def is_held_out(shape: str, colour: str, background: str) -> bool:
    """The fixed split: (shape, colour, background) triples never drawn in training.

    A triple is held out when its index sum is 3 modulo 7: about one in seven, and every pair of
    its values (shape and colour, colour and background, shape and background) is still seen in
    training with other partners, so a held-out caption asks for a new combination of known words.
    """
    index = SHAPES.index(shape) + list(COLOURS).index(colour) + list(COLOURS).index(background)
    return index % 7 == 3


def triples(held_out: bool) -> list[tuple[str, str, str]]:
    """The (shape, colour, background) triples of one side of the split, in a fixed order."""
    return [
        (shape, colour, background)
        for shape in SHAPES
        for colour in COLOURS
        for background in COLOURS
        if background != colour and is_held_out(shape, colour, background) == held_out
    ]


def random_scene(rng: np.random.Generator, held_out: bool = False) -> Scene:
    """A scene from one side of the split, every attribute uniform on that side."""
    pool = triples(held_out)
    shape, colour, background = pool[rng.integers(len(pool))]
    offset = rng.uniform(-JITTER, JITTER, size=2)
    return Scene(
        shape=shape,
        colour=colour,
        background=background,
        size=SIZES[rng.integers(len(SIZES))],
        position=list(POSITIONS)[rng.integers(len(POSITIONS))],
        offset=(float(offset[0]), float(offset[1])),
    )


def shape_polygon(scene: Scene, scale: float) -> list[tuple[float, float]] | tuple[float, float, float, float]:
    """The outline in pixels of a canvas `scale` times SIZE: a polygon, or a circle's bounding box."""
    area = AREA[scene.size] * scale * scale
    fx, fy = POSITIONS[scene.position]
    cx = (fx * SIZE + scene.offset[0]) * scale
    cy = (fy * SIZE + scene.offset[1]) * scale
    if scene.shape == "circle":
        r = math.sqrt(area / math.pi)
        return (cx - r, cy - r, cx + r, cy + r)
    if scene.shape == "square":
        h = math.sqrt(area) / 2
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    # An upright isosceles triangle as tall as it is wide, centred on its bounding box.
    h = math.sqrt(2 * area) / 2
    return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of SIZE × SIZE pixels."""
    big = Image.new("RGB", (SIZE * SUPERSAMPLE,) * 2, COLOURS[scene.background])
    draw = ImageDraw.Draw(big)
    outline = shape_polygon(scene, SUPERSAMPLE)
    if scene.shape == "circle":
        draw.ellipse(outline, fill=COLOURS[scene.colour])
    else:
        draw.polygon(outline, fill=COLOURS[scene.colour])
    return big.resize((SIZE, SIZE), Image.Resampling.BOX)


def caption(scene: Scene, rng: np.random.Generator) -> Caption:
    """One caption for the scene, its phrasing (and so what it names) drawn from `rng`."""
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    phrases = POSITION_PHRASES[scene.position]
    return _fill(template, scene, phrases[rng.integers(len(phrases))])


def full_caption(scene: Scene) -> Caption:
    """The caption that names every attribute, in the first phrasing: what the judge is scored on."""
    return _fill(TEMPLATES[0], scene, POSITION_PHRASES[scene.position][0])


def _fill(template: str, scene: Scene, position_phrase: str) -> Caption:
    values = {
        "shape": scene.shape,
        "colour": scene.colour,
        "background": scene.background,
        "size": scene.size,
        "position": scene.position,
    }
    named = {key: value for key, value in values.items() if "{" + key + "}" in template}
    text = re.sub(r"\ba (?=[aeiou])", "an ", template.format(**{**values, "position": position_phrase}))
    return Caption(text=text, named=named)


def parse(text: str) -> dict[str, str]:
    """The attributes a prompt names in this world's words (what the judge checks a prompt's image for).

    Words outside the world are ignored; "center" and "middle" are the centre.
    """
    words = text.lower().replace(",", " ").replace("center", "centre").replace("middle", "centre").split()
    named: dict[str, str] = {}
    for i, word in enumerate(words):
        if word in SHAPES:
            named["shape"] = word
        elif word in SIZES:
            named["size"] = word
        elif word in COLOURS:
            follows = words[i + 1] if i + 1 < len(words) else ""
            # "on a blue background", "blue background with", "on blue" name the background.
            is_background = follows == "background" or (i > 0 and words[i - 1] == "on") or (
                i > 1 and words[i - 2] == "on" and words[i - 1] in ("a", "an"))
            named["background" if is_background else "colour"] = word
    vertical = next((w for w in words if w in ("top", "bottom")), None)
    horizontal = next((w for w in words if w in ("left", "right")), None)
    if vertical or horizontal:
        named["position"] = " ".join(w for w in (vertical, horizontal) if w)
    elif "centre" in words:
        named["position"] = "centre"
    return named


def samples(seed: int, held_out: bool = False) -> Iterator[tuple[Scene, Caption]]:
    """An endless, seeded stream of scenes with one caption each."""
    rng = np.random.default_rng(seed)
    while True:
        scene = random_scene(rng, held_out)
        yield scene, caption(scene, rng)
