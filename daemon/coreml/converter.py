"""A diffusers-format model (any fine-tune, a Hub repo or a folder) → Core ML models in Apple's layout.

The output loads like Apple's published models: `Stable_Diffusion_version_<name>_<part>.mlpackage`
for TextEncoder, Unet, VAEDecoder, VAEEncoder (and SafetyChecker when the source has one) with the
I/O contract of Apple's models (see docs/coreml.md); an SDXL source (base or refiner) converts as
Apple's `torch2coreml.py --xl-version` does: TextEncoder and TextEncoder2 with `hidden_embeds` and
`pooled_outputs`, a Unet that also takes `time_ids` and `text_embeds`, float16 Unet inputs and a
float32 VAE where SDXL's VAE needs it. vocab.json and merges.txt go beside them, and
`diffusiond.json` with the facts the pipeline reads that no network's shape tells (the VAE's
scaling factor, the scheduler config). On macOS, `Resources/` holds the same models compiled for
Apple's Swift pipeline and Diffusers for Mac, as Apple's converter lays it out.
Conversion needs coremltools, torch and diffusers (`pip install 'diffusiond[convert]'`) and runs on
Linux too; only running the result needs a Mac.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConversionFailed, EngineError
from ..models import lora
from ..models.coreml_folder import PART_SUFFIXES, PARTS, SECOND_TOKENIZER, describe
from ..models.facts import FACTS_FILE, default_guidance_of, read_facts
from ..models.family import SD, SDXL, SDXL_REFINER
from ..models.lora import LoraFile

ATTENTIONS = ("original", "split_einsum")
# Apple's torch2coreml.py --quantize-nbits palettizes the text encoders and the Unets only, the
# VAE and the safety checker stay float16; and it leaves the embedding table (a gather's) alone.
PALETTIZED = ("TextEncoder", "TextEncoder2", "Unet", "UnetRefiner")
TOKENS = 77
UNET_BATCH = 2  # the unconditional and the conditional prompt in one call, as Apple's models take them

# torch2coreml.py --bundle-resources-for-swift-cli: Resources/ beside the packages, each compiled
# to <Part>.mlmodelc, with the tokenizer's files; Apple's Swift pipeline and Diffusers for Mac load it.
RESOURCES = "Resources"
RESOURCE_FILES = ("vocab.json", "merges.txt", FACTS_FILE, "preprocessor_config.json")  # the last two: ours
SWIFT_SAFETY_SIZE = (512, 512)  # Swift's SafetyChecker.isSafe feeds `images` of 1×512×512×3, whatever the model's size

Progress = Callable[[str], None]


def _coremltools() -> Any:
    try:
        import coremltools as ct
    except ImportError:
        raise ConversionFailed("converting needs coremltools, torch and diffusers: pip install 'diffusiond[convert]'") from None
    _register_int_cast()
    return ct


def _register_int_cast() -> None:
    """coremltools 9.0 casts a traced shape product, a one-element array, with int(array), which
    NumPy 2 refuses; this cast takes the element instead."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    @register_torch_op(torch_alias=["int"], override=True)
    def _int(context: Any, node: Any) -> None:
        x = _get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const():
            result = mb.const(val=np.int32(np.asarray(x.val).reshape(())), name=node.name)
        else:
            if len(x.shape) > 0:
                x = mb.squeeze(x=x, name=node.name + "_item")
            result = mb.cast(x=x, dtype="int32", name=node.name)
        context.add(result, node.name)


def _slug(source: str) -> str:
    """The model's name in the package names: a folder's name, or a repo's name without its owner."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source.rstrip("/")).name)


def convert(
    source: str,
    out: Path,
    attention: str = "split_einsum",
    size: tuple[int, int] | None = None,
    palettize: bool = False,
    progress: Progress = print,
    parts: tuple[str, ...] = PARTS,
    refiner: str | None = None,
    loras: Sequence[tuple[LoraFile, float]] = (),
) -> Path:
    """Convert the networks the runtime runs (``parts``: some of them, as Apple's converter allows);
    ``size`` is (width, height), default the model's own; ``refiner``: an SDXL refiner whose Unet goes
    beside an SDXL base's as UnetRefiner (torch2coreml.py --refiner-version); ``loras``: merged into
    the source's weights first (Core ML cannot change weights at run time), recorded in diffusiond.json."""
    from . import split_einsum

    if attention not in ATTENTIONS:
        raise ConversionFailed(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTIONS)}")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ConversionFailed(f"unknown parts {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    ct = _coremltools()
    loaded = _load(source, progress)
    xl = loaded["text_encoder_2"] is not None
    unet, vae = loaded["unet"], loaded["vae"]
    if loras:
        family = SDXL_REFINER if xl and loaded["text_encoder"] is None else SDXL if xl else SD
        lora.check_family(tuple(lora.LoraUse(file, weight, False) for file, weight in loras), family, source)
        progress("merging " + ", ".join(f"{file.name} ({file.hash}) at {weight:g}" for file, weight in loras) + " …")
        encoders = [e for e in (loaded["text_encoder"], loaded["text_encoder_2"]) if e is not None]
        lora.merge(unet, encoders, xl, loras)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    width, height = size or (unet.config.sample_size * factor,) * 2
    if width % factor or height % factor:
        raise ConversionFailed(f"size {width}x{height} must be a multiple of the VAE's factor {factor}")
    if attention == "split_einsum":
        split_einsum.apply(unet)
    latent = (unet.config.in_channels, height // factor, width // factor)
    name = _slug(source)

    jobs = _xl_jobs(loaded, latent, (width, height)) if xl else _sd_jobs(loaded, latent, (width, height))
    refined = None
    if refiner is not None:
        if not xl or loaded["text_encoder"] is None:
            raise ConversionFailed(f"a refiner goes beside an SDXL base, and {source} is not one")
        refined = _load_refiner(refiner, loaded, progress)
        if attention == "split_einsum":
            split_einsum.apply(refined["unet"])
        jobs += [job._replace(part="UnetRefiner") for job in _xl_jobs(refined, latent, (width, height)) if job.part == "Unet"]
    out.mkdir(parents=True, exist_ok=True)
    checker = loaded["safety_checker"]
    if checker is not None:
        pixels = checker.config.vision_config.image_size
        jobs.append(_Job("SafetyChecker", _SafetyChecker(checker),
                         _float32({"clip_input": (1, 3, pixels, pixels), "images": (1, height, width, 3), "adjustment": (1,)}),
                         ["filtered_images", "has_nsfw_concepts"]))
    elif "SafetyChecker" in parts:
        progress(f"{source} has no safety checker: none converted")
    jobs = [job for job in jobs if job.part in parts]
    for number, (part, module, inputs, outputs, float32) in enumerate(jobs, 1):
        started = time.monotonic()
        progress(f"[{number}/{len(jobs)}] {part}: tracing and converting …")
        examples = tuple(torch.zeros(shape) if key != "timestep" else torch.full(shape, 999.0)
                         for key, (shape, _dtype) in inputs.items())
        try:
            with torch.no_grad():
                traced = torch.jit.trace(module.eval(), examples, strict=False, check_trace=False)
            model = ct.convert(
                traced,
                inputs=[ct.TensorType(key, shape=shape, dtype=dtype) for key, (shape, dtype) in inputs.items()],
                outputs=[ct.TensorType(key, dtype=np.float32) for key in outputs],
                convert_to="mlprogram",
                minimum_deployment_target=ct.target.macOS13,
                compute_precision=ct.precision.FLOAT32 if float32 else ct.precision.FLOAT16,
            )
            if palettize and part in PALETTIZED:
                progress(f"[{number}/{len(jobs)}] {part}: palettizing to 6 bits …")
                model = _palettize(ct, model)
        except ImportError as exc:
            raise ConversionFailed(f"{part}: {exc}; pip install 'diffusiond[convert]' installs what converting needs") from exc
        except Exception as exc:  # coremltools raises bare Exceptions, ValueErrors, RuntimeErrors …
            raise ConversionFailed(
                f"{part}: coremltools could not convert it ({type(exc).__name__}: {exc}); "
                f"for the Unet try --attention original; else this architecture is not Stable Diffusion's"
            ) from exc
        model.short_description = f"{name} {part} ({attention} attention), converted by diffusiond"
        model.user_defined_metadata.update({"source": source, "attention": attention})
        target = out / f"Stable_Diffusion_version_{name}_{PART_SUFFIXES[part]}.mlpackage"
        shutil.rmtree(target, ignore_errors=True)
        model.save(str(target))
        progress(f"[{number}/{len(jobs)}] {part}: {target.name} in {time.monotonic() - started:.1f}s")

    for file in ("vocab.json", "merges.txt"):
        shutil.copyfile(loaded["tokenizer_dir"] / file, out / file)
    if xl:  # SDXL's second tokenizer pads with "!": its own folder, which Swift ignores and diffusiond reads
        shutil.copytree(loaded["folder"] / SECOND_TOKENIZER, out / SECOND_TOKENIZER, dirs_exist_ok=True)
    if checker is not None:  # the safety checker's CLIP preprocessing (its size may not be 224)
        shutil.copyfile(loaded["feature_extractor"], out / "preprocessor_config.json")
    facts = {
        "source": source, "attention": attention, "palettized": palettize,
        "scaling_factor": float(vae.config.get("scaling_factor", 0.18215)),
        "scheduler_config": loaded["scheduler_config"],
    }
    source_facts = read_facts(loaded["folder"], source)
    if "default_guidance_scale" in source_facts:  # the model's own (facts.py), checked before it is copied
        facts["default_guidance_scale"] = default_guidance_of(source_facts, source)
    if xl:  # what the pipeline's config says of SDXL's conditioning (model_index.json)
        facts["force_zeros_for_empty_prompt"] = bool(loaded["index"].get("force_zeros_for_empty_prompt", True))
    if loras:  # what a job's LoRAs are matched against (CoreMLFolder.merged_loras)
        facts["loras"] = [{"name": file.name, "hash": file.hash, "weight": float(weight)} for file, weight in loras]
    if refined is not None:  # the refiner's own, for the refiner beside the base (CoreMLFolder.refiner_model)
        facts["refiner"] = {"source": refiner, "scheduler_config": refined["scheduler_config"],
                            "force_zeros_for_empty_prompt": bool(refined["index"].get("force_zeros_for_empty_prompt", False))}
    (out / FACTS_FILE).write_text(json.dumps(facts, indent=2) + "\n")
    if shutil.which("xcrun"):
        swift_resources(out, name, progress)
    else:
        progress(f"{RESOURCES}/ for Apple's Swift CLI and Diffusers for Mac: skipped, compiling to .mlmodelc needs "
                 "xcrun coremlcompiler (macOS with Xcode's command-line tools); diffusiond loads the packages as they are")
    return out


class _Job(NamedTuple):
    """One network to convert: its inputs by name (shape, dtype), its outputs, whether it computes in float32."""

    part: str
    module: torch.nn.Module
    inputs: dict[str, tuple[tuple[int, ...], type]]
    outputs: list[str]
    float32: bool = False


def _float32(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple[int, ...], type]]:
    return {key: (shape, np.float32) for key, shape in shapes.items()}


def _sd_jobs(loaded: dict[str, Any], latent: tuple[int, int, int], size: tuple[int, int]) -> list[_Job]:
    """Stable Diffusion 1.x/2.x: every input float32, the compute float16."""
    width, height = size
    hidden = loaded["text_encoder"].config.hidden_size
    return [
        _Job("TextEncoder", _TextEncoder(loaded["text_encoder"]), _float32({"input_ids": (1, TOKENS)}), ["last_hidden_state"]),
        _Job("Unet", _Unet(loaded["unet"]), _float32({
            "sample": (UNET_BATCH, *latent), "timestep": (UNET_BATCH,),
            "encoder_hidden_states": (UNET_BATCH, hidden, 1, TOKENS)}), ["noise_pred"]),
        _Job("VAEDecoder", _Decoder(loaded["vae"]), _float32({"z": (1, *latent)}), ["image"]),
        _Job("VAEEncoder", _Encoder(loaded["vae"]), _float32({"x": (1, 3, height, width)}), ["latent"]),
    ]


def _xl_jobs(loaded: dict[str, Any], latent: tuple[int, int, int], size: tuple[int, int]) -> list[_Job]:
    """SDXL, base or refiner, as torch2coreml.py --xl-version converts it: the text encoders' penultimate
    hidden states and pooled outputs; the Unet's inputs in float16 with time_ids (2, 6), the refiner's
    (2, 5), and text_embeds (2, the pooled projection's width); the VAE encoder in float32 (SDXL's VAE
    overflows float16), the decoder too unless the VAE's config says it need not be upcast (an fp16-fix
    VAE, whose decoder Apple converts as SD's, float16: --custom-vae-version)."""
    width, height = size
    unet, vae, second = loaded["unet"], loaded["vae"], loaded["text_encoder_2"]
    pooled = second.config.projection_dim
    time_ids = (unet.config.projection_class_embeddings_input_dim - pooled) // unet.config.addition_time_embed_dim
    if unet.config.addition_embed_type != "text_time" or time_ids not in (5, 6):
        raise ConversionFailed(f"the UNet's added conditioning ({unet.config.addition_embed_type}, {time_ids} time ids) "
                               "is not SDXL's text_time with 6 time ids (base) or 5 (refiner)")
    upcast = bool(vae.config.get("force_upcast", True))
    float16 = np.float16
    jobs = [_Job(part, _TextEncoderXL(loaded[key]), _float32({"input_ids": (1, TOKENS)}), ["hidden_embeds", "pooled_outputs"])
            for part, key in (("TextEncoder", "text_encoder"), ("TextEncoder2", "text_encoder_2")) if loaded[key] is not None]
    jobs += [
        _Job("Unet", _UnetXL(unet), {
            "sample": ((UNET_BATCH, *latent), float16), "timestep": ((UNET_BATCH,), float16),
            "encoder_hidden_states": ((UNET_BATCH, unet.config.cross_attention_dim, 1, TOKENS), float16),
            "time_ids": ((UNET_BATCH, time_ids), float16), "text_embeds": ((UNET_BATCH, pooled), float16)}, ["noise_pred"]),
        _Job("VAEDecoder", _Decoder(vae), {"z": ((1, *latent), np.float32 if upcast else float16)}, ["image"], upcast),
        _Job("VAEEncoder", _Encoder(vae), _float32({"x": (1, 3, height, width)}), ["latent"], True),
    ]
    return jobs


def swift_resources(out: Path, name: str, progress: Progress) -> Path:
    """`out`/Resources as Apple's converter bundles it for the Swift CLI: every converted part in `out`
    compiled with `xcrun coremlcompiler` to <Part>.mlmodelc, plus vocab.json and merges.txt (and
    diffusiond's facts, which Swift ignores). A safety checker for another size than 512x512 stays
    out: Swift would feed it 512x512 images and fail every image."""
    resources = out / RESOURCES
    resources.mkdir(exist_ok=True)
    for part, suffix in PART_SUFFIXES.items():
        package = out / f"Stable_Diffusion_version_{name}_{suffix}.mlpackage"
        target = resources / f"{part}.mlmodelc"
        shutil.rmtree(target, ignore_errors=True)
        if not package.is_dir():
            continue
        if part == "SafetyChecker" and (reason := _swift_safety_refusal(package)):
            progress(f"{RESOURCES}/: no {target.name}: {reason}")
            continue
        progress(f"{RESOURCES}/: compiling {package.name} to {target.name} …")
        done = subprocess.run(["xcrun", "coremlcompiler", "compile", str(package), str(resources)],
                              capture_output=True, text=True)
        compiled = resources / f"{package.stem}.mlmodelc"
        if done.returncode != 0 or not compiled.is_dir():
            raise ConversionFailed(f"xcrun coremlcompiler could not compile {package.name} ({done.stderr.strip()}); "
                                   f"the packages in {out} are whole and diffusiond loads them; for {RESOURCES}/ "
                                   "install Xcode's command-line tools (xcode-select --install) and convert again")
        compiled.rename(target)
    for file in RESOURCE_FILES:
        if (out / file).is_file():
            shutil.copyfile(out / file, resources / file)
    if (out / SECOND_TOKENIZER).is_dir():
        shutil.copytree(out / SECOND_TOKENIZER, resources / SECOND_TOKENIZER, dirs_exist_ok=True)
    return resources


def _swift_safety_refusal(package: Path) -> str | None:
    """Why Apple's Swift pipeline cannot use this safety checker, or None when it can."""
    height, width = describe(package).input("images").shape[1:3]
    if (width, height) == SWIFT_SAFETY_SIZE:
        return None
    return (f"the safety checker takes {width}x{height} images and Apple's Swift pipeline (Diffusers for Mac too) "
            f"feeds it {SWIFT_SAFETY_SIZE[0]}x{SWIFT_SAFETY_SIZE[1]} ones; there it would fail every image, so Swift "
            f"runs without it (diffusiond uses it); convert at --resolution 512 for a checked Swift folder")


def _pull(store: Any, repo: str, progress: Progress) -> Path:
    files: list[str] = []

    def report(state: dict[str, Any]) -> None:  # a line per file still downloading at a report, then the total
        if state["file"] not in files:
            files.append(state["file"])
            gigabytes = f"{state['bytes'] / 1e9:.2f} of {state['total'] / 1e9:.2f} GB"
            file = state["file"]
            progress(f"downloading {repo}: {file} ({gigabytes})" if file else f"downloaded {repo} ({gigabytes})")

    progress(f"downloading {repo} (the torch runtime's files) …")
    return store.pull(repo, False, report)


def _palettize(ct: Any, model: Any) -> Any:
    config = ct.optimize.coreml.OptimizationConfig(
        global_config=ct.optimize.coreml.OpPalettizerConfig(nbits=6, mode="kmeans"),
        op_type_configs={"gather": None},
    )
    return ct.optimize.coreml.palettize_weights(model, config)


def _folder(source: str, progress: Progress) -> tuple[Path, dict[str, Any]]:
    """A diffusers-format folder or Hub repo (pulled into the HF cache as the torch runtime pulls it:
    float32 weights, configs, tokenizer) and its model_index.json."""
    from ..models import store
    from ..models.ref import parse

    ref = parse(source)
    folder, repo = ref.path, ref.canonical
    if folder is None:
        try:
            folder = store.local_path(repo) or _pull(store, repo, progress)
        except EngineError:
            raise
        except Exception as exc:  # the HTTP client's own errors (no network, …)
            raise ConversionFailed(f"downloading {repo} failed ({type(exc).__name__}: {exc}); "
                                   "check the network, or give a local folder") from exc
    if not (folder / "model_index.json").is_file():
        raise ConversionFailed(f"{folder} is not a diffusers-format model (no model_index.json)")
    return folder, json.loads((folder / "model_index.json").read_text())


def _present(index: dict[str, Any]) -> set[str]:
    """The components a model_index.json names (a refiner's text_encoder is [null, null])."""
    return {key for key, value in index.items() if isinstance(value, list) and value[0] is not None}


def _load(source: str, progress: Progress) -> dict[str, Any]:
    """The networks and configs of a diffusers-format model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder, index = _folder(source, progress)
    present = _present(index)
    feature_extractor = folder / "feature_extractor" / "preprocessor_config.json"
    with_checker = (index.get("safety_checker") or [None])[0] is not None and feature_extractor.is_file()
    try:
        checker = None
        if with_checker:
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

            checker = StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker").eval()
        second = "text_encoder_2" in present  # SDXL; its refiner has only this one
        return {
            "folder": folder, "index": index, "safety_checker": checker, "feature_extractor": feature_extractor,
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder").eval() if "text_encoder" in present else None,
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval() if second else None,
            "unet": UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
            "vae": AutoencoderKL.from_pretrained(folder / "vae").eval(),
            # Apple's layout has one vocab.json and merges.txt: SDXL's two tokenizers share CLIP's BPE
            "tokenizer_dir": folder / ("tokenizer" if "tokenizer" in present else "tokenizer_2"),
            "scheduler_config": json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
        }
    except (OSError, ValueError) as exc:
        raise ConversionFailed(f"cannot load {source}: {exc}") from exc


def _load_refiner(refiner: str, base: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """An SDXL refiner's UNet and configs, for its Unet beside a base's (torch2coreml.py --refiner-version):
    it runs with the base's TextEncoder2 and VAE, so only its UNet is loaded."""
    from diffusers import UNet2DConditionModel

    folder, index = _folder(refiner, progress)
    if _present(index) & {"text_encoder", "unet", "text_encoder_2"} != {"unet", "text_encoder_2"}:
        raise ConversionFailed(f"{refiner} is not an SDXL refiner: its model_index.json should name a unet and "
                               "text_encoder_2 and no text_encoder")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    except (OSError, ValueError) as exc:
        raise ConversionFailed(f"cannot load {refiner}: {exc}") from exc
    if unet.config.cross_attention_dim != base["text_encoder_2"].config.hidden_size:
        raise ConversionFailed(f"{refiner}'s UNet attends to {unet.config.cross_attention_dim} channels, and the base's "
                               f"TextEncoder2 gives {base['text_encoder_2'].config.hidden_size}: not this base's refiner")
    return {**base, "unet": unet, "text_encoder": None, "index": index,
            "scheduler_config": json.loads((folder / "scheduler" / "scheduler_config.json").read_text())}


class _TextEncoder(torch.nn.Module):
    """Apple's TextEncoder: float32 token ids (1, 77) → last_hidden_state (1, 77, C)."""

    def __init__(self, text_encoder: Any) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: Any) -> Any:
        return self.text_encoder(input_ids.long(), return_dict=False)[0]


class _TextEncoderXL(torch.nn.Module):
    """Apple's SDXL text encoders: float32 token ids (1, 77) → hidden_embeds, the penultimate layer's
    hidden states (1, 77, C), and pooled_outputs: the projection of CLIPTextModelWithProjection
    (TextEncoder2: SDXL's text_embeds), CLIPTextModel's pooler output otherwise."""

    def __init__(self, text_encoder: Any) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: Any) -> tuple[Any, Any]:
        output = self.text_encoder(input_ids.long(), output_hidden_states=True)
        pooled = output.text_embeds if "text_embeds" in output else output.pooler_output
        return output.hidden_states[-2], pooled


class _Unet(torch.nn.Module):
    """Apple's Unet: encoder_hidden_states in (B, C, 1, 77), the layout the Neural Engine prefers."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any) -> Any:
        hidden = encoder_hidden_states.squeeze(2).transpose(1, 2)
        return self.unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]


class _UnetXL(torch.nn.Module):
    """Apple's SDXL Unet: _Unet's inputs, then time_ids and text_embeds (diffusers' added_cond_kwargs)."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any, time_ids: Any, text_embeds: Any) -> Any:
        hidden = encoder_hidden_states.squeeze(2).transpose(1, 2)
        added = {"time_ids": time_ids, "text_embeds": text_embeds}
        return self.unet(sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]


class _Decoder(torch.nn.Module):
    """Apple's VAEDecoder: unscaled latents z → image in [-1, 1]."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: Any) -> Any:
        return self.vae.decode(z, return_dict=False)[0]


class _Encoder(torch.nn.Module):
    """Apple's VAEEncoder: image x in [-1, 1] → latent: the distribution's mean and log-variance."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: Any) -> Any:
        return self.vae.quant_conv(self.vae.encoder(x))


class _SafetyChecker(torch.nn.Module):
    """Apple's SafetyChecker: diffusers' safety checker as one traceable graph, with the threshold
    `adjustment` as an input (0: diffusers' thresholds); has_nsfw_concepts is 1.0 for a flagged image."""

    def __init__(self, checker: Any) -> None:
        super().__init__()
        self.checker = checker

    @staticmethod
    def _cosine(embeds: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeds) @ F.normalize(concepts).T

    def forward(
        self, clip_input: torch.Tensor, images: torch.Tensor, adjustment: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.checker
        embeds = c.visual_projection(c.vision_model(clip_input)[1])
        special = self._cosine(embeds, c.special_care_embeds) - c.special_care_embeds_weights + adjustment[:, None]
        special_care = (special > 0).float().amax(dim=1, keepdim=True) * 0.01
        concepts = self._cosine(embeds, c.concept_embeds) - c.concept_embeds_weights + special_care + adjustment[:, None]
        flagged = (concepts > 0).float().amax(dim=1)
        return images * (1 - flagged)[:, None, None, None], flagged
