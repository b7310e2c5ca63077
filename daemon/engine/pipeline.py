"""The one Stable Diffusion pipeline, for every runtime and model family: txt2img and img2img.

It mirrors diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline and, for SDXL,
StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline step for step, so the same prompt,
seed and latents give the same image (tests hold it to 2/255 per pixel). The runtime only runs the
networks; tokenizing, guidance, the denoising loop, noise, safety and post-processing happen here
once. Families differ only in the conditioning the loop hands the UNet (:meth:`Pipeline._conditioning`).
SDXL base + refiner is diffusers' ensemble of experts: the base runs the timesteps above the switch
point (``denoising_end``), its latents go straight to the refiner, which runs the rest with its own
scheduler (``denoising_start``); one decode, one image.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import lru_cache
from typing import TYPE_CHECKING, overload

import numpy as np
from PIL import Image

from ..config import MIN_SIZE, Limits, default_lora_dir
from ..errors import Cancelled, InvalidParameter
from ..models import aspect
from ..models.coreml_folder import CoreMLFolder
from ..models.diffusers_folder import ModelFolder
from ..models.family import SD, SDXL, SDXL_REFINER, TITLES, pad_tokens
from ..models.lora import LoraUse, check_family, job_loras, strip_tags
from . import linear_steps, schedulers
from .noise import RNGS, noise_source
from .runtimes import Conditioning, Runtime, StepCallback
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor

MAX_SEED = 2**32 - 1
# StableDiffusionXLImg2ImgPipeline's defaults for a refiner's size conditioning (requires_aesthetics_score).
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


@dataclass(frozen=True)
class Request:
    """What a client asks for; :func:`resolve` checks it and fills in what it leaves to the model."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance_scale: float | None = None  # None: the model's own (models/facts.py), 7.5 unless it says otherwise
    width: int | None = None  # None: the model's own size (img2img: the init image's)
    height: int | None = None
    aspect: str | None = None  # "W:H" instead of a size: the model's trained size nearest that shape (models/aspect.py)
    count: int = 1
    seed: int | None = None  # None: a random seed, recorded in the result
    scheduler: str = "dpmpp_2m"
    rng: str = "numpy"
    init_image: Image.Image | None = None
    strength: float = 0.75
    safety_checker: bool = True
    refiner: str | None = None  # an SDXL refiner model's name: base + refiner in one job
    refiner_switch: float = 0.8  # the share of the schedule the base runs (diffusers' denoising_end)
    loras: tuple[tuple[str, float], ...] = ()  # (name, weight) each; the prompt's <lora:name:weight> tags add to them


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
    refiner: str | None
    refiner_switch: float
    loras: tuple[LoraUse, ...]  # the prompt's tags, then the list's

    @property
    def text(self) -> str:
        """The prompt the text encoder reads: without its LoRA tags."""
        return strip_tags(self.prompt)


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


Model = ModelFolder | CoreMLFolder


@overload
def resolve(request: Request, model: Model, limits: Limits = ..., refiner: Model | None = ...,
            lora_dir: Path | None = ..., downloads_pending: bool = ...) -> Resolved: ...
@overload
def resolve(request: Request, model: None, limits: Limits = ..., refiner: Model | None = ...,
            lora_dir: Path | None = ..., downloads_pending: bool = ...) -> Request: ...
@overload
def resolve(request: Request, model: Model | None, limits: Limits = ..., refiner: Model | None = ...,
            lora_dir: Path | None = ..., downloads_pending: bool = ...) -> Request | Resolved: ...
def resolve(request: Request, model: Model | None, limits: Limits = Limits(), refiner: Model | None = None,
            lora_dir: Path | None = None, downloads_pending: bool = False) -> Request | Resolved:
    """Validate a request and fill in its defaults; raises InvalidParameter saying what is allowed.

    Without the model (a Hub model not downloaded yet) what depends on it — the default size, the
    VAE's factor, the scheduler's view of the step count — waits for the run, which resolves again:
    the answer is then still a Request, with its seed drawn so that the job records it. So does
    what depends on the refiner model (``refiner``, the one ``request.refiner`` names) without it.
    LoRA names are looked up in ``lora_dir`` (default: the config's default), their files read and
    checked either way; their family against the model's once it is there. ``downloads_pending``
    (at submit): a Hub LoRA not downloaded yet waits for the run too.
    """
    r = request
    _check(isinstance(r.prompt, str), "prompt", f"must be text, got {type(r.prompt).__name__}")
    _check(0 < len(r.prompt) <= limits.prompt_chars, "prompt", f"must be 1 to {limits.prompt_chars} characters, got {len(r.prompt)}")
    _check(not r.prompt.isspace(), "prompt", "holds only spaces; say what to draw")
    _check(isinstance(r.negative_prompt, str) and len(r.negative_prompt) <= limits.prompt_chars,
           "negative_prompt", f"must be at most {limits.prompt_chars} characters")
    _check(_is_int(r.steps) and 1 <= r.steps <= limits.steps, "steps", f"must be an integer from 1 to {limits.steps}, got {r.steps!r}")
    _check(r.guidance_scale is None or _is_number(r.guidance_scale) and 0 <= r.guidance_scale <= limits.guidance,
           "guidance_scale", f"must be a number from 0 to {limits.guidance}, got {r.guidance_scale!r}")
    _check(_is_int(r.count) and 1 <= r.count <= limits.count, "count", f"must be an integer from 1 to {limits.count}, got {r.count!r}")
    _check(r.scheduler in schedulers.NAMES, "scheduler",
           f"unknown scheduler {r.scheduler!r}; choose one of {', '.join(schedulers.NAMES)}")
    _check(r.rng in RNGS, "rng", f"unknown generator {r.rng!r}; choose one of {', '.join(RNGS)}")
    _check(isinstance(r.safety_checker, bool), "safety_checker", f"must be true or false, got {r.safety_checker!r}")
    _check(r.refiner is None or isinstance(r.refiner, str) and r.refiner != "", "refiner",
           "must be the name of an SDXL refiner model, or left out")
    _check(_is_number(r.refiner_switch) and 0 < r.refiner_switch < 1, "refiner_switch",
           f"must be a number above 0 and below 1 (the share of the steps the base runs; 0.8 is usual), got {r.refiner_switch!r}")
    _check(isinstance(r.loras, (tuple, list)) and all(isinstance(x, (tuple, list)) and len(x) == 2 for x in r.loras),
           "loras", "must be a list of {name, weight}")
    loras = job_loras(r.prompt, tuple((name, weight) for name, weight in r.loras), lora_dir or default_lora_dir(),
                      downloads_pending)
    seed = secrets.randbelow(MAX_SEED + 1) if r.seed is None else r.seed
    _check(_is_int(seed) and 0 <= seed <= MAX_SEED, "seed", f"must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    factor = model.vae_scale_factor if model else 8
    width, height = r.width, r.height
    ratio = None
    if r.aspect is not None:
        _check(width is None and height is None, "aspect",
               f"give aspect or width and height, not both (got aspect {r.aspect!r}, width {width!r}, height {height!r})")
        try:
            ratio = aspect.parse(r.aspect)
        except ValueError as exc:
            raise InvalidParameter("aspect", str(exc)) from None
    if r.init_image is not None:
        _check(isinstance(r.init_image, Image.Image), "init_image", "must be an image")
        _check(_is_number(r.strength) and 0 < r.strength <= 1, "strength",
               f"must be a number above 0 and at most 1, got {r.strength!r}")
        _check(int(r.steps * r.strength) >= 1, "strength",
               f"{r.strength} of {r.steps} steps leaves no step to run; raise strength or steps")
        # diffusers' default: the init image's own size, rounded down to the VAE's factor (an aspect asks for another).
        if ratio is None:
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
    _check_family(r, model, refiner)
    if loras and isinstance(model, CoreMLFolder):
        _check_core_ml_loras(loras, model)
    check_family(loras, model.family, model.name)
    if ratio is not None:
        width, height = _aspect_size(r, ratio, model, limits)
    width = model.default_shape[0] if width is None else width
    height = model.default_shape[1] if height is None else height
    if model.fixed_size:
        for name, value, fixed in (("width", width, model.default_shape[0]), ("height", height, model.default_shape[1])):
            _check(value == fixed, name, f"this Core ML model was converted for {model.default_shape[0]}x"
                   f"{model.default_shape[1]}; convert it again for another size (diffusiond convert --resolution)")
    native = f"{model.default_shape[0]}x{model.default_shape[1]}"
    for name, value in (("width", width), ("height", height)):
        _check(_is_int(value) and MIN_SIZE <= value <= limits.size and value % 8 == 0 and value % factor == 0, name,
               f"must be a multiple of {max(8, factor)} from {MIN_SIZE} to {limits.size} for this "
               f"{TITLES[model.family]} model (native {native}), got {value!r}")
    refusal = _scheduler_refusal(r.scheduler, r.steps, model)
    if refusal:
        raise InvalidParameter(*refusal)
    if refiner is not None:
        begin = _img2img_begin(r.steps, r.strength) if r.init_image is not None else 0
        base_steps, refiner_steps = _split_steps(r.scheduler, r.steps, begin, r.refiner_switch, model, refiner)
        _check(base_steps >= 1 and refiner_steps >= 1, "refiner_switch",
               f"at {r.refiner_switch} of {r.steps} steps the base runs {base_steps} and the refiner {refiner_steps}; "
               "each needs at least one: raise steps or move refiner_switch")
    guidance = model.default_guidance if r.guidance_scale is None else r.guidance_scale
    _check(guidance <= limits.guidance, "guidance_scale",
           f"this model's default of {guidance:g} is above this daemon's limit of {limits.guidance:g}; give a guidance_scale")
    return Resolved(r.prompt, r.negative_prompt, r.steps, guidance, width, height, r.count, seed, r.scheduler,
                    r.rng, r.init_image, r.strength, r.safety_checker, r.refiner, r.refiner_switch, loras)


def _aspect_size(r: Request, ratio: Fraction, model: Model, limits: Limits) -> tuple[int, int]:
    """The model's trained size nearest an asked shape; a Core ML model has its one size, for the
    shapes that are its own."""
    native, title = model.default_shape, TITLES[model.family]
    if model.fixed_size:
        own = Fraction(*native)
        _check(aspect.trained_ratio(model.family, ratio) == own, "aspect",
               f"{r.aspect} is not the shape of this Core ML model, converted for {native[0]}x{native[1]} "
               f"({aspect.written(own)}): ask for {aspect.written(own)} or leave aspect out, or convert it again "
               "for another size (diffusiond convert --resolution)")
        return native
    width, height = aspect.size(model.family, ratio, native, max(8, model.vae_scale_factor))
    _check(MIN_SIZE <= min(width, height) and max(width, height) <= limits.size, "aspect",
           f"{r.aspect} makes {width}x{height} on this {title} model (native {native[0]}x{native[1]}), outside "
           f"{MIN_SIZE} to {limits.size} a side; ask for a shape nearer 1:1, or give width and height")
    return width, height


def _check_family(r: Request, model: Model, refiner: Model | None) -> None:
    """What a model family takes: a refiner only after an SDXL base, a refiner model only as
    img2img or as that second half."""
    title = TITLES[model.family]
    if r.refiner is not None:
        _check(model.family != SD, "refiner", f"{model.name} is an {title} model; a refiner follows an "
               f"{TITLES[SDXL]} base: leave refiner out, or give an {TITLES[SDXL]} base as model")
        _check(model.family != SDXL_REFINER, "refiner", f"{model.name} is itself an {title}; give the "
               f"{TITLES[SDXL]} base as model and {model.name} as refiner")
    if refiner is not None and refiner.family != SDXL_REFINER:
        raise InvalidParameter("refiner", f"{refiner.name} is an {TITLES[refiner.family]} model, not an "
                               f"{TITLES[SDXL_REFINER]} (model_index.json: requires_aesthetics_score, no text_encoder); "
                               f"give an {TITLES[SDXL_REFINER]} model")
    _check(model.family != SDXL_REFINER or r.init_image is not None, "init_image",
           f"{model.name} is an {title}, which refines an image: give init_image (img2img), or give an "
           f"{TITLES[SDXL]} base as model and {model.name} as its refiner")


def lora_key(loras: tuple[LoraUse, ...]) -> tuple[tuple[str, float], ...]:
    """What a set of LoRAs is compared by: each file's hash and weight."""
    return tuple((u.file.hash, float(u.weight)) for u in loras)


def _check_core_ml_loras(loras: tuple[LoraUse, ...], model: CoreMLFolder) -> None:
    """Core ML cannot change weights at run time: a LoRA is merged into the diffusers-format source
    and converted (the daemon does it once per set and caches it). A model converted with exactly
    these LoRAs runs as it is; one whose source is not known cannot take any."""
    if lora_key(loras) == model.merged_loras or model.source is not None:
        return
    from ..models import catalog

    base = catalog.diffusers_variant(model.name)
    get = (f"`diffuse models pull {base.alias}` ({base.repo})" if base else
           "the diffusers-format model it was converted from (a Hub repo or a folder)")
    raise InvalidParameter("loras", f"{model.name} exists here only as Core ML, which cannot take a LoRA at run time: "
                           f"a LoRA is merged into the diffusers-format base, then converted. Get {get}, then "
                           "`diffusiond convert BASE --lora FILE:WEIGHT --out DIR` and use DIR as the model, or "
                           "run the job on the diffusers-format base (torch runtime)")


def _img2img_begin(steps: int, strength: float) -> int:
    """The first timestep img2img runs (diffusers' get_timesteps without denoising_start)."""
    return steps - min(int(steps * strength), steps)


def _cutoff(switch: float, model: Model) -> int:
    """diffusers' discrete_timestep_cutoff: the base runs timesteps at or above it, the refiner those below."""
    train = int(model.scheduler_config.get("num_train_timesteps", 1000))
    return int(round(train - switch * train))


@lru_cache(maxsize=1024)
def _split_steps(scheduler: str, steps: int, begin: int, switch: float, base: Model, refiner: Model) -> tuple[int, int]:
    """How many steps the base and the refiner run for a switch point (cached: asked at every submit)."""
    first = schedulers.create(scheduler, base.scheduler_config)
    first.set_timesteps(steps)
    second = schedulers.create(scheduler, refiner.scheduler_config)
    second.set_timesteps(steps)
    return (int(np.sum(first.timesteps[begin:] >= _cutoff(switch, base))),
            int(np.sum(second.timesteps < _cutoff(switch, refiner))))


@lru_cache(maxsize=1024)
def _scheduler_refusal(scheduler: str, steps: int, model: Model) -> tuple[str, str] | None:
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
    def __init__(self, model: ModelFolder | CoreMLFolder, runtime: Runtime, limits: Limits = Limits(),
                 lora_dir: Path | None = None) -> None:
        self.model = model
        self.runtime = runtime
        self.limits = limits
        self.lora_dir = lora_dir
        # (hash, weight) of the LoRAs in the runtime's weights now: a Core ML model's, merged when it was converted.
        self.loras = model.merged_loras if isinstance(model, CoreMLFolder) else ()
        pads = pad_tokens(model.family, len(model.tokenizer_dirs))
        self.tokenizers = [Tokenizer(folder, pad) for folder, pad in zip(model.tokenizer_dirs, pads)]
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
        refiner: Pipeline | None = None,
    ) -> Result:
        """Make the request's images; ``cancelled`` is asked before every UNet call and the VAE decode.
        ``refiner``: the warm pipeline of the refiner model ``request.refiner`` names."""
        r = resolve(request, self.model, self.limits, None if refiner is None else refiner.model, self.lora_dir)
        if (r.refiner is None) != (refiner is None):
            raise ValueError("a request names a refiner exactly when its pipeline is given")
        started = time.perf_counter()
        self._apply_loras(r.loras)
        scheduler = schedulers.create(r.scheduler, self.model.scheduler_config)
        scheduler.set_timesteps(r.steps)
        noise = noise_source(r.rng, r.seed)

        guided = r.guidance_scale > 1
        conditioning = self._conditioning(r, guided)

        factor = self.model.vae_scale_factor
        shape = (r.count, self.model.latent_channels, r.height // factor, r.width // factor)
        timesteps = scheduler.timesteps
        if r.init_image is None:
            latents = noise(shape) * np.float32(scheduler.init_noise_sigma)
        else:
            begin = _img2img_begin(r.steps, r.strength)
            timesteps = timesteps[begin:]
            scheduler.set_begin_index(begin)
            if r.rng == "numpy":  # Apple's order (generateLatentSamples): the start noise, then the encoder's sample
                start = noise(shape)
                image = self._encode_image(r.init_image, r, noise)
            else:  # diffusers' order (prepare_latents): the encoder's sample, then the start noise
                image = self._encode_image(r.init_image, r, noise)
                start = noise(shape)
            latents = scheduler.add_noise(image, start, timesteps[0])
        stages = [(self, scheduler, timesteps, conditioning)]
        if refiner is not None:
            # denoising_end on the base, denoising_start on the refiner (its own scheduler and conditioning).
            stages[0] = (self, scheduler, timesteps[timesteps >= _cutoff(r.refiner_switch, self.model)], conditioning)
            second = schedulers.create(r.scheduler, refiner.model.scheduler_config)
            second.set_timesteps(r.steps)
            begin = len(second.timesteps) - int(np.sum(second.timesteps < _cutoff(r.refiner_switch, refiner.model)))
            second.set_begin_index(begin)
            stages.append((refiner, second, second.timesteps[begin:], refiner._conditioning(r, guided)))
        total = sum(len(stage[2]) for stage in stages)
        timings = {"prepare": time.perf_counter() - started}

        def check(i: int) -> None:
            if cancelled is not None and cancelled():
                raise Cancelled(f"cancelled after {i} of {total} steps")

        done = 0
        for pipeline, stage_scheduler, stage_timesteps, stage_conditioning in stages:
            latents = pipeline._denoise(latents, stage_conditioning, stage_scheduler, stage_timesteps,
                                        r.guidance_scale if guided else None, noise, check, on_step, done, total)
            done += len(stage_timesteps)
        timings["denoise"] = time.perf_counter() - started - timings["prepare"]

        check(total)
        last = stages[-1][0]
        decoded = last.runtime.decode(latents / np.float32(last.model.scaling_factor))
        pixels = np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        flagged = [False] * r.count
        if r.safety_checker and self.feature_extractor is not None:
            flagged = self._check_safety(self.feature_extractor, pixels)
            pixels[np.asarray(flagged)] = 0
        images = [np.round(image * 255).astype(np.uint8) for image in pixels]
        timings["total"] = time.perf_counter() - started
        return Result(images, r, flagged, self.tokenizers[0].encode(r.text).dropped, timings)

    def _apply_loras(self, loras: tuple[LoraUse, ...]) -> None:
        """The job's LoRAs on the model (the refiner's stays as it is): the same set as the last job's is
        kept applied; another set, or none, replaces it. After a failure nothing is applied."""
        if lora_key(loras) == self.loras:
            return
        try:
            self.runtime.set_loras([(use.file, use.weight) for use in loras])
        except BaseException:
            self.loras = ()
            raise
        self.loras = lora_key(loras)

    def _conditioning(self, r: Resolved, guided: bool) -> Conditioning:
        """The UNet's conditioning, rows [negative, prompt] (or [prompt] unguided), each once per image.

        As diffusers' encode_prompt: SDXL's empty negative prompt is zeros where the model says
        force_zeros_for_empty_prompt (diffusers' negative_prompt None). SDXL's size conditioning
        (add_time_ids): original size, crop (0, 0), target size, all the request's size; the
        refiner's: original size, crop, aesthetic score (6, the negative 2.5)."""
        zeros = guided and r.negative_prompt == "" and self.model.force_zeros_for_empty_prompt
        texts = [r.negative_prompt, r.text] if guided and not zeros else [r.text]
        encoding = self.runtime.encode_text([np.stack([t.encode(text).ids for text in texts]) for t in self.tokenizers])
        hidden, pooled = encoding.hidden, encoding.pooled
        if zeros:
            hidden = np.concatenate([np.zeros_like(hidden), hidden])
            pooled = None if pooled is None else np.concatenate([np.zeros_like(pooled), pooled])
        time_ids = None
        if pooled is not None:
            size = [r.height, r.width]
            if self.model.requires_aesthetics_score:
                cond, uncond = [*size, 0, 0, AESTHETIC_SCORE], [*size, 0, 0, NEGATIVE_AESTHETIC_SCORE]
            else:
                cond = uncond = [*size, 0, 0, *size]
            time_ids = np.asarray([uncond, cond] if guided else [cond], dtype=np.float32)
        return Conditioning(hidden, pooled, time_ids).take(np.repeat(np.arange(2 if guided else 1), r.count))

    def _denoise(self, latents: np.ndarray, conditioning: Conditioning, scheduler: schedulers.Scheduler,
                 timesteps: np.ndarray, guidance: float | None, noise: schedulers.Noise, check: Callable[[int], None],
                 on_step: StepCallback | None, done: int, total: int) -> np.ndarray:
        """The denoising loop over ``timesteps`` on this pipeline's model: steps ``done + 1`` … of ``total``."""
        # A runtime that runs the loop on its device gets the scheduler as a coefficient table
        # traced from this very scheduler (linear_steps); noise-drawing or clipping ones stay here.
        plan = linear_steps.trace(scheduler, timesteps) if self.runtime.device_loop else None
        if plan is not None:
            report = None if on_step is None else lambda k, _n, x: on_step(done + k, total, x)
            return self.runtime.denoise(latents, conditioning, plan, guidance, lambda k: check(done + k), report)
        for i, t in enumerate(timesteps):
            check(done + i)
            model_input = np.concatenate([latents, latents]) if guidance is not None else latents
            model_input = scheduler.scale_model_input(model_input, t)
            prediction = self.runtime.predict_noise(model_input, t, conditioning)
            if guidance is not None:
                uncond, cond = np.split(prediction, 2)
                prediction = uncond + np.float32(guidance) * (cond - uncond)
            latents = scheduler.step(prediction, t, latents, noise)
            if on_step is not None:
                on_step(done + i + 1, total, latents)
        return latents

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
