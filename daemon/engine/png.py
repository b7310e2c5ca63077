"""PNG outputs that carry their settings, written so that a crash never leaves half a file."""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from diffusiond.clients.infotext import Infotext, format_infotext

from ..models.lora import tag
from ..outputs import numbered
from . import schedulers
from .pipeline import Resolved, Result

VERSION = "diffusiond 0.1.0"


def infotext(request: Resolved, model: str, index: int = 0, flagged: bool = False, dropped: str = "") -> str:
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
    if request.refiner is not None:
        # AUTOMATIC1111's keys (modules/processing_scripts/refiner.py reads them back).
        params["Refiner"] = request.refiner
        params["Refiner switch at"] = request.refiner_switch
    if request.loras:
        # A1111's: the alias without ":" and "," (extensions-builtin/Lora/extra_networks_lora.py).
        params["Lora hashes"] = ", ".join(f"{u.file.name.replace(':', '').replace(',', '')}: {u.file.hash}"
                                          for u in request.loras)
    if request.count > 1:
        # All images of a job come from one generator: image i needs the batch to reproduce.
        params["Batch size"] = request.count
        params["Batch pos"] = index
    if dropped:
        params["Prompt truncated"] = dropped
    if flagged:
        params["NSFW"] = "blacked out by the safety checker"
    params["Version"] = VERSION
    # The job's list as tags after the prompt's own, so that the prompt alone brings every LoRA back.
    prompt = " ".join([request.prompt, *(tag(u.file.name, u.weight) for u in request.loras if not u.in_prompt)])
    return format_infotext(Infotext(prompt, request.negative_prompt, params))


def encode_png(image: np.ndarray, parameters: str) -> bytes:
    """A PNG with its settings in the `parameters` text chunk, as A1111 and ComfyUI read them."""
    meta = PngInfo()
    meta.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=meta)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> Path:
    """Write temp + fsync + rename: readers see the whole file or none. The file gets 0666 less
    the umask, as any program's new file does (images are for sharing; mkstemp would make 0600)."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
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


def encode_result(result: Result, model: str) -> list[bytes]:
    """A result's images as PNGs, each with the infotext that reproduces it."""
    return [encode_png(image, infotext(result.request, model, i, result.flagged[i], result.dropped_prompt))
            for i, image in enumerate(result.images)]


def save_result(result: Result, model: str, first_path: Path) -> list[Path]:
    return [write_atomic(numbered(Path(first_path), i), data) for i, data in enumerate(encode_result(result, model))]


def write_job_outputs(paths: list[Path], pngs: list[bytes]) -> list[str]:
    """A job's PNGs at the paths its queue record names (JobQueue.output_paths), replacing what an
    interrupted earlier attempt left there.

    All or none: when one cannot be written (a full disk), the others go too, so that the
    record (a failed job has no outputs) and the disk agree; a retry writes them all again.
    """
    for i, (path, data) in enumerate(zip(paths, pngs)):
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)  # a crash's half-written file of this very output
        try:
            write_atomic(path, data)
        except OSError as exc:
            for written in paths:  # this attempt's, and any an interrupted earlier attempt left
                if written.is_file():
                    written.unlink()
            raise OSError(exc.errno, f"image {i + 1} of {len(pngs)}: {exc.strerror or exc}; none of the job's "
                          "images is kept (make room, then `diffuse retry` the job)") from exc
    return [str(path) for path in paths]
