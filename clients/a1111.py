"""AUTOMATIC1111's web API vocabulary, mapped onto diffusiond's jobs: sampler and scheduler names,
request fields, the `info` and `parameters` of a response, png-info's parsed parameters.

Everything here is plain data in and out (no HTTP, no daemon), so `http_api` stays thin and this
mapping is testable on its own. Sources, AUTOMATIC1111/stable-diffusion-webui at master:
modules/api/models.py (field names, defaults, response shapes), modules/api/api.py (the routes,
the error shape of `api_middleware`, `validate_sampler_name`), modules/sd_samplers_kdiffusion.py and
sd_samplers_timesteps.py (sampler names and aliases), modules/sd_schedulers.py (scheduler names),
modules/processing.py (`Processed.js`, the `info` JSON), modules/infotext_utils.py
(`parse_generation_parameters`, png-info's `parameters`), modules/shared_state.py (`State.dict`),
extensions-builtin/Lora/scripts/lora_script.py (`create_lora_json`, the /loras items) and
extensions-builtin/Lora/network.py (`NetworkOnDisk`), modules/sd_models.py
(`read_metadata_from_safetensors`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from .infotext import parse_infotext


class Refusal(Exception):
    """A request A1111's API would take but this server cannot honour; ``status`` is the HTTP status
    A1111 answers with for the same kind of refusal."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Sampler:
    name: str  # A1111's
    aliases: tuple[str, ...]  # A1111's, plus our own scheduler name
    scheduler: str  # ours, with the "automatic" schedule
    karras: str | None  # ours, with the Karras schedule (A1111's scheduler "karras"), where we have it


# A1111's names and aliases (sd_samplers_kdiffusion.samplers_k_diffusion, sd_samplers_timesteps) for
# the samplers diffusiond implements. PLMS is A1111's name for the pseudo linear multistep method
# that diffusers' PNDMScheduler runs with skip_prk_steps (Stable Diffusion's configuration).
SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", ("k_dpmpp_2m", "dpmpp_2m"), "dpmpp_2m", "dpmpp_2m_karras"),
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral", "euler_a"), "euler_a", None),
    Sampler("Euler", ("k_euler", "euler"), "euler", None),
    Sampler("DDIM", ("ddim",), "ddim", None),
    Sampler("PNDM", ("PLMS", "plms", "pndm"), "pndm", None),
    Sampler("LCM", ("k_lcm", "lcm"), "lcm", None),
)
# A1111's sd_schedulers: name, label, default_rho. Only the two we have.
SCHEDULERS = (("automatic", "Automatic", -1.0), ("karras", "Karras", 7.0))
DEFAULT_SAMPLER = "Euler"  # models.py: sampler_index's default, used when sampler_name is empty


def sampler_list() -> list[dict[str, Any]]:
    """/sdapi/v1/samplers: SamplerItem (name, aliases, options)."""
    return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in SAMPLERS]


def scheduler_list() -> list[dict[str, Any]]:
    """/sdapi/v1/schedulers: SchedulerItem."""
    return [{"name": name, "label": label, "aliases": None, "default_rho": rho, "need_inner_model": False}
            for name, label, rho in SCHEDULERS]


def _find_sampler(name: str) -> Sampler | None:
    wanted = name.strip().lower()
    return next((s for s in SAMPLERS if wanted == s.name.lower() or wanted in (a.lower() for a in s.aliases)), None)


def scheduler_of(sampler_name: str | None, scheduler: str | None) -> str:
    """Our scheduler for A1111's sampler and scheduler names, as sd_samplers.get_sampler_and_scheduler
    reads them: a sampler name may end in a scheduler's label ("DPM++ 2M Karras"). Refuses the rest
    as A1111 does (400 "Sampler not found"), naming what this server has."""
    name = (sampler_name or DEFAULT_SAMPLER).strip()
    schedule = (scheduler or "automatic").strip().lower()
    for _, label, _ in SCHEDULERS[1:]:
        if name.lower().endswith(" " + label.lower()):
            name, schedule = name[: -len(label) - 1], label.lower()
    sampler = _find_sampler(name)
    if sampler is None:
        raise Refusal(400, f"Sampler not found: {name!r}; this server has {', '.join(s.name for s in SAMPLERS)}")
    if schedule in ("automatic", ""):
        return sampler.scheduler
    if schedule == "karras" and sampler.karras:
        return sampler.karras
    known = [n for n, _, _ in SCHEDULERS]
    if schedule not in known:
        raise Refusal(400, f"Scheduler not found: {scheduler!r}; this server has {', '.join(known)}")
    raise Refusal(400, f"Scheduler {scheduler!r} is not available with sampler {sampler.name!r}; "
                       f"Karras is, with {', '.join(s.name for s in SAMPLERS if s.karras)}")


def a1111_sampler(ours: str) -> tuple[str, str]:
    """(sampler name, scheduler label) A1111 would write for our scheduler name."""
    for sampler in SAMPLERS:
        if ours == sampler.scheduler:
            return sampler.name, "Automatic"
        if ours == sampler.karras:
            return sampler.name, "Karras"
    return ours, "Automatic"


# Fields of A1111's processing requests whose non-default value asks for something diffusiond does
# not do; refused (422, as A1111 refuses an unusable script) rather than quietly ignored.
_UNSUPPORTED: dict[str, Any] = {
    "enable_hr": False, "restore_faces": False, "tiling": False, "subseed_strength": 0.0, "n_iter": 1,
    "styles": [], "script_name": None, "alwayson_scripts": {}, "mask": None, "seed_resize_from_h": 0,
    "seed_resize_from_w": 0,
}


def _unsupported(request: dict[str, Any]) -> None:
    for name, default in _UNSUPPORTED.items():
        value = request.get(name, default)
        if value in (default, None, "", -1) or (isinstance(value, (list, dict)) and not value):
            continue
        raise Refusal(422, f"{name}: {value!r} is not supported by diffusiond; leave it at {default!r}")


def job_fields(request: dict[str, Any], checkpoint: str | None) -> dict[str, Any]:
    """The daemon's submit fields for an A1111 txt2img/img2img request (its fields by A1111's names,
    defaults filled in by the request model). ``checkpoint``: the model chosen through /options."""
    _unsupported(request)
    fields: dict[str, Any] = {
        "prompt": request["prompt"],
        "steps": request["steps"],
        "guidance_scale": request["cfg_scale"],
        "width": request["width"],
        "height": request["height"],
        "count": request["batch_size"],
        "scheduler": scheduler_of(request.get("sampler_name") or request.get("sampler_index"), request.get("scheduler")),
    }
    if request.get("negative_prompt"):
        fields["negative_prompt"] = request["negative_prompt"]
    if request.get("seed") not in (None, -1):
        fields["seed"] = request["seed"]
    model = (request.get("override_settings") or {}).get("sd_model_checkpoint") or checkpoint
    if model:
        fields["model"] = model
    return fields


LORA_SUFFIX = ".safetensors"  # a name in the daemon's LoRA folder is its file's path there without it


def _metadata_value(value: str) -> Any:
    """A safetensors metadata value as A1111 shows it: text that starts with '{' parsed as JSON where it is."""
    if value.startswith("{"):
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


def lora_list(loras: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """/sdapi/v1/loras: create_lora_json's {name, alias, path, metadata} for each LoRA in the daemon's
    listing (its `models` reply) that a job can apply; one it refuses is left out (a tool would offer it,
    and every job naming it would fail). ``name`` and ``alias`` are both the name a ``<lora:NAME:W>``
    tag takes here: the daemon resolves names, not A1111's ss_output_name aliases. ``path`` is the
    file's path inside the daemon's LoRA folder, never the folder itself: nothing a request could
    use to name a file elsewhere."""
    return [{"name": entry["name"], "alias": entry["name"], "path": entry["name"] + LORA_SUFFIX,
             "metadata": {key: _metadata_value(value) for key, value in (entry.get("metadata") or {}).items()}}
            for entry in loras if "error" not in entry]


def _extra_parameters(scheduler: str, infotexts: list[str]) -> dict[str, Any]:
    """Processed.js's extra_generation_params: the schedule when it is not the sampler's own, and the
    LoRAs' `Lora hashes` as the image's infotext records them (A1111's Lora extension adds that key)."""
    extra: dict[str, Any] = {"Schedule type": scheduler} if scheduler != "Automatic" else {}
    hashes = parse_infotext(infotexts[0]).params.get("Lora hashes") if infotexts else None
    if hashes:
        extra["Lora hashes"] = hashes
    return extra


def info_json(job: dict[str, Any], infotexts: list[str], img2img: bool) -> str:
    """A1111's `info`: Processed.js(), a JSON string, for a finished job (``infotexts``: its images' own)."""
    params, result = job["params"], job.get("result") or {}
    seed = result.get("seed", params.get("seed"))
    count = params.get("count", 1)
    sampler, scheduler = a1111_sampler(params.get("scheduler", ""))
    started = job.get("started") or job.get("created") or time.time()
    return json.dumps({
        "prompt": params.get("prompt", ""),
        "all_prompts": [params.get("prompt", "")] * count,
        "negative_prompt": params.get("negative_prompt", ""),
        "all_negative_prompts": [params.get("negative_prompt", "")] * count,
        # All images of a job come from one generator seeded once (docs/engine.md): one seed each.
        "seed": seed,
        "all_seeds": [seed] * count,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": result.get("width", params.get("width")),
        "height": result.get("height", params.get("height")),
        "sampler_name": sampler,
        "cfg_scale": params.get("guidance_scale"),
        "steps": params.get("steps"),
        "batch_size": count,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": job.get("model"),
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": params.get("strength") if img2img else None,
        "extra_generation_params": _extra_parameters(scheduler, infotexts),
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": "diffusiond",
    })


def png_parameters(infotext: str) -> dict[str, Any]:
    """png-info's `parameters`, as infotext_utils.parse_generation_parameters lays them out: "Prompt",
    "Negative prompt", every key as written, and a WxH value split into "KEY-1" and "KEY-2"."""
    info = parse_infotext(infotext)
    parsed: dict[str, Any] = {"Prompt": info.prompt, "Negative prompt": info.negative_prompt}
    for key, value in info.params.items():
        width, x, height = str(value).partition("x")
        if x and width.isdigit() and height.isdigit():
            parsed[f"{key}-1"], parsed[f"{key}-2"] = width, height
        else:
            parsed[key] = value
    return parsed


def progress_state(running: dict[str, Any] | None) -> dict[str, Any]:
    """State.dict() for /progress: the job the daemon runs now, or an idle state."""
    if running is None:
        return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    return {
        "skipped": False, "interrupted": running.get("cancelling", False), "stopping_generation": False,
        "job": running["job"], "job_count": 1,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(running["started"])),
        "job_no": 0, "sampling_step": running["step"], "sampling_steps": running["total"],
    }
