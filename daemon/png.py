"""PNG outputs that carry their settings, written so that a crash never leaves half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from diffusiond.clients.infotext import Infotext, format_infotext

from . import schedulers
from .pipeline import Request, Result

VERSION = "diffusiond 0.1.0"


def infotext(request: Request, model: str, index: int = 0, flagged: bool = False, dropped: str = "") -> str:
    """The settings that reproduce image ``index`` of a request, in the infotext format."""
    params: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": schedulers.sampler_name(request.scheduler),
        "CFG scale": request.guidance_scale,
        "Seed": request.seed,
        "Size": f"{request.width}x{request.height}",
        "Model": model,
        "RNG": request.rng,
    }
    if request.init_image is not None:
        params["Denoising strength"] = request.strength
    if request.count > 1:
        # All images of a job come from one generator: image i needs the batch to reproduce.
        params["Batch size"] = request.count
        params["Batch pos"] = index
    if dropped:
        params["Prompt truncated"] = dropped
    if flagged:
        params["NSFW"] = "blacked out by the safety checker"
    params["Version"] = VERSION
    return format_infotext(Infotext(request.prompt, request.negative_prompt, params))


def write_png(path: Path, image: np.ndarray, parameters: str) -> Path:
    """Write temp + fsync + rename: readers see the whole PNG or none."""
    path = Path(path)
    meta = PngInfo()
    meta.add_text("parameters", parameters)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            Image.fromarray(image).save(file, format="PNG", pnginfo=meta)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def read_parameters(path: Path) -> str:
    with Image.open(path) as image:
        return image.text.get("parameters", "") if hasattr(image, "text") else ""


def save_result(result: Result, model: str, first_path: Path) -> list[Path]:
    """Write a job's images as NAME.png, NAME-2.png, …"""
    first_path = Path(first_path)
    paths = []
    for i, image in enumerate(result.images):
        path = first_path if i == 0 else first_path.with_name(f"{first_path.stem}-{i + 1}{first_path.suffix}")
        text = infotext(result.request, model, i, result.flagged[i], result.dropped_prompt)
        paths.append(write_png(path, image, text))
    return paths
