"""The one Stable Diffusion pipeline, for every runtime: txt2img and img2img.

It mirrors diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline step for step, so
the same prompt, seed and latents give the same image (tests hold it to 2/255 per pixel). The
runtime only runs the networks; tokenizing, guidance, the denoising loop, noise, safety and
post-processing happen here once.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, overload

import numpy as np
from PIL import Image

from ..config import MIN_SIZE, Limits
from ..errors import Cancelled, InvalidParameter
from ..models.coreml_folder import CoreMLFolder
from ..models.diffusers_folder import ModelFolder
from . import linear_steps, schedulers
from .noise import RNGS, noise_source
from .runtimes import Conditioning, Runtime, StepCallback
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Request:
    """What a client asks for; :func:`resolve` checks it and fills in what it leaves to the model."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance_scale: float = 7.5
    width: int | None = None  # None: the model's own size (img2img: the init image's)
    height: int | None = None
    count: int = 1
    seed: int | None = None  # None: a random seed, recorded in the result
    scheduler: str = "dpmpp_2m"
    rng: str = "numpy"
    init_image: Image.Image | None = None
    strength: float = 0.75
    safety_checker: bool = True


@dataclass(frozen=True)
class Resolved:
    """A request checked against its model with every default filled in (size, seed): what a run
    uses and a result records, so nothing downstream handles a missing size or seed."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    count: int
    seed: int
    scheduler: str
    rng: str
    init_image: Image.Image | None
    strength: float
    safety_checker: bool


@dataclass
class Result:
    images: list[np.ndarray]  # (H, W, 3) uint8 each
    request: Resolved
    flagged: list[bool]  # blacked out by the safety checker
    dropped_prompt: str  # the prompt's tail beyond the text encoder's 77 tokens
    timings: dict[str, float] = field(default_factory=dict)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise InvalidParameter(name, message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


@overload
def resolve(request: Request, model: ModelFolder | CoreMLFolder, limits: Limits = ...) -> Resolved: ...
@overload
def resolve(request: Request, model: None, limits: Limits = ...) -> Request: ...
@overload
def resolve(request: Request, model: ModelFolder | CoreMLFolder | None, limits: Limits = ...) -> Request | Resolved: ...
def resolve(request: Request, model: ModelFolder | CoreMLFolder | None, limits: Limits = Limits()) -> Request | Resolved:
    """Validate a request and fill in its defaults; raises InvalidParameter saying what is allowed.

    Without the model (a Hub model not downloaded yet) what depends on it — the default size, the
    VAE's factor, the scheduler's view of the step count — waits for the run, which resolves again:
    the answer is then still a Request, with its seed drawn so that the job records it.
    """
    r = request
    _check(isinstance(r.prompt, str), "prompt", f"must be text, got {type(r.prompt).__name__}")
    _check(0 < len(r.prompt) <= limits.prompt_chars, "prompt", f"must be 1 to {limits.prompt_chars} characters, got {len(r.prompt)}")
    _check(not r.prompt.isspace(), "prompt", "holds only spaces; say what to draw")
    _check(isinstance(r.negative_prompt, str) and len(r.negative_prompt) <= limits.prompt_chars,
           "negative_prompt", f"must be at most {limits.prompt_chars} characters")
    _check(_is_int(r.steps) and 1 <= r.steps <= limits.steps, "steps", f"must be an integer from 1 to {limits.steps}, got {r.steps!r}")
    _check(_is_number(r.guidance_scale) and 0 <= r.guidance_scale <= limits.guidance, "guidance_scale",
           f"must be a number from 0 to {limits.guidance}, got {r.guidance_scale!r}")
    _check(_is_int(r.count) and 1 <= r.count <= limits.count, "count", f"must be an integer from 1 to {limits.count}, got {r.count!r}")
    _check(r.scheduler in schedulers.NAMES, "scheduler",
           f"unknown scheduler {r.scheduler!r}; choose one of {', '.join(schedulers.NAMES)}")
    _check(r.rng in RNGS, "rng", f"unknown generator {r.rng!r}; choose one of {', '.join(RNGS)}")
    _check(isinstance(r.safety_checker, bool), "safety_checker", f"must be true or false, got {r.safety_checker!r}")
    seed = secrets.randbelow(MAX_SEED + 1) if r.seed is None else r.seed
    _check(_is_int(seed) and 0 <= seed <= MAX_SEED, "seed", f"must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    factor = model.vae_scale_factor if model else 8
    width, height = r.width, r.height
    if r.init_image is not None:
        _check(isinstance(r.init_image, Image.Image), "init_image", "must be an image")
        _check(_is_number(r.strength) and 0 < r.strength <= 1, "strength",
               f"must be a number above 0 and at most 1, got {r.strength!r}")
        _check(int(r.steps * r.strength) >= 1, "strength",
               f"{r.strength} of {r.steps} steps leaves no step to run; raise strength or steps")
        # diffusers' default: the init image's own size, rounded down to the VAE's factor.
        if width is None or height is None:
            _check(min(r.init_image.size) >= MIN_SIZE, "init_image",
                   f"is {r.init_image.width}x{r.init_image.height}; give a size (at least {MIN_SIZE} a side) "
                   f"or an image at least {MIN_SIZE} px a side")
        width = r.init_image.width // factor * factor if width is None else width
        height = r.init_image.height // factor * factor if height is None else height
    if model is None:
        for name, value in (("width", width), ("height", height)):
            _check(value is None or _is_int(value) and MIN_SIZE <= value <= limits.size and value % 8 == 0, name,
                   f"must be a multiple of 8 from {MIN_SIZE} to {limits.size}, got {value!r}")
        return replace(r, seed=seed, width=width, height=height)
    width = model.default_shape[0] if width is None else width
    height = model.default_shape[1] if height is None else height
    if model.fixed_size:
        for name, value, fixed in (("width", width, model.default_shape[0]), ("height", height, model.default_shape[1])):
            _check(value == fixed, name, f"this Core ML model was converted for {model.default_shape[0]}x"
                   f"{model.default_shape[1]}; convert it again for another size (diffusiond convert --resolution)")
    for name, value in (("width", width), ("height", height)):
        _check(_is_int(value) and MIN_SIZE <= value <= limits.size and value % 8 == 0 and value % factor == 0, name,
               f"must be a multiple of {max(8, factor)} from {MIN_SIZE} to {limits.size}, got {value!r}")
    refusal = _scheduler_refusal(r.scheduler, r.steps, model)
    if refusal:
        raise InvalidParameter(*refusal)
    return Resolved(r.prompt, r.negative_prompt, r.steps, r.guidance_scale, width, height, r.count, seed, r.scheduler,
                    r.rng, r.init_image, r.strength, r.safety_checker)


@lru_cache(maxsize=1024)
def _scheduler_refusal(scheduler: str, steps: int, model: ModelFolder | CoreMLFolder) -> tuple[str, str] | None:
    """The field and reason when the scheduler refuses this model's config or this step count;
    cached, since the daemon asks at every submit."""
    try:
        instance = schedulers.create(scheduler, model.scheduler_config)
    except ValueError as exc:
        return "scheduler", f"{exc} (in the model's scheduler config); choose another scheduler"
    try:
        instance.set_timesteps(steps)
    except ValueError as exc:
        return "steps", str(exc)
    return None


class Pipeline:
    def __init__(self, model: ModelFolder | CoreMLFolder, runtime: Runtime, limits: Limits = Limits()) -> None:
        self.model = model
        self.runtime = runtime
        self.limits = limits
        self.tokenizers = [Tokenizer(folder) for folder in model.tokenizer_dirs]
        self.feature_extractor: CLIPImageProcessor | None = None
        if model.has_safety_checker:
            import transformers

            processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
            folder = model.feature_extractor_dir  # None: CLIP's standard preprocessing (Apple's models)
            self.feature_extractor = processor.from_pretrained(str(folder)) if folder else processor()

    def generate(
        self,
        request: Request,
        on_step: StepCallback | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Result:
        """Make the request's images; ``cancelled`` is asked before every UNet call and the VAE decode."""
        r = resolve(request, self.model, self.limits)
        started = time.perf_counter()
        scheduler = schedulers.create(r.scheduler, self.model.scheduler_config)
        scheduler.set_timesteps(r.steps)
        noise = noise_source(r.rng, r.seed)

        guided = r.guidance_scale > 1
        # The negative and the prompt in one text-encoder call, [uncond, cond], each row per image.
        texts = [r.negative_prompt, r.prompt] if guided else [r.prompt]
        encoding = self.runtime.encode_text([np.stack([t.encode(text).ids for text in texts]) for t in self.tokenizers])
        conditioning = Conditioning(encoding.hidden).take(np.repeat(np.arange(len(texts)), r.count))

        factor = self.model.vae_scale_factor
        shape = (r.count, self.model.latent_channels, r.height // factor, r.width // factor)
        timesteps = scheduler.timesteps
        if r.init_image is None:
            latents = noise(shape) * np.float32(scheduler.init_noise_sigma)
        else:
            begin = r.steps - min(int(r.steps * r.strength), r.steps)
            timesteps = timesteps[begin:]
            scheduler.set_begin_index(begin)
            if r.rng == "numpy":  # Apple's order (generateLatentSamples): the start noise, then the encoder's sample
                start = noise(shape)
                image = self._encode_image(r.init_image, r, noise)
            else:  # diffusers' order (prepare_latents): the encoder's sample, then the start noise
                image = self._encode_image(r.init_image, r, noise)
                start = noise(shape)
            latents = scheduler.add_noise(image, start, timesteps[0])
        timings = {"prepare": time.perf_counter() - started}

        def check(i: int) -> None:
            if cancelled is not None and cancelled():
                raise Cancelled(f"cancelled after {i} of {len(timesteps)} steps")

        # A runtime that runs the loop on its device gets the scheduler as a coefficient table
        # traced from this very scheduler (linear_steps); noise-drawing or clipping ones stay here.
        plan = linear_steps.trace(scheduler, timesteps) if self.runtime.device_loop else None
        if plan is not None:
            latents = self.runtime.denoise(latents, conditioning, plan, r.guidance_scale if guided else None, check, on_step)
        else:
            for i, t in enumerate(timesteps):
                check(i)
                model_input = np.concatenate([latents, latents]) if guided else latents
                model_input = scheduler.scale_model_input(model_input, t)
                prediction = self.runtime.predict_noise(model_input, t, conditioning)
                if guided:
                    uncond, cond = np.split(prediction, 2)
                    prediction = uncond + np.float32(r.guidance_scale) * (cond - uncond)
                latents = scheduler.step(prediction, t, latents, noise)
                if on_step is not None:
                    on_step(i + 1, len(timesteps), latents)
        timings["denoise"] = time.perf_counter() - started - timings["prepare"]

        check(len(timesteps))
        decoded = self.runtime.decode(latents / np.float32(self.model.scaling_factor))
        pixels = np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        flagged = [False] * r.count
        if r.safety_checker and self.feature_extractor is not None:
            flagged = self._check_safety(self.feature_extractor, pixels)
            pixels[np.asarray(flagged)] = 0
        images = [np.round(image * 255).astype(np.uint8) for image in pixels]
        timings["total"] = time.perf_counter() - started
        return Result(images, r, flagged, self.tokenizers[0].encode(r.prompt).dropped, timings)

    def _encode_image(self, init_image: Image.Image, r: Resolved, noise: schedulers.Noise) -> np.ndarray:
        """The init image's latents, sampled from the VAE encoder's distribution as diffusers does."""
        image = init_image.convert("RGB")
        if image.size != (r.width, r.height):
            image = image.resize((r.width, r.height), Image.Resampling.LANCZOS)
        pixels = (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None] * 2 - 1
        mean, logvar = np.split(self.runtime.encode(pixels), 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        latent = (mean + std * noise(mean.shape)) * np.float32(self.model.scaling_factor)
        return np.repeat(latent, r.count, axis=0)

    def _check_safety(self, feature_extractor: CLIPImageProcessor, pixels: np.ndarray) -> list[bool]:
        images = [Image.fromarray(np.round(p * 255).astype(np.uint8)) for p in pixels]
        clip_input = feature_extractor(images, return_tensors="np").pixel_values
        return [bool(f) for f in self.runtime.check_safety(clip_input, pixels)]
