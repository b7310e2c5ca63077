"""A diffusers-format model (any fine-tune, a Hub repo or a folder) → Core ML models in Apple's layout.

The output loads like Apple's published models: `Stable_Diffusion_version_<name>_<part>.mlpackage`
for TextEncoder, Unet, VAEDecoder, VAEEncoder (and SafetyChecker when the source has one) with the
I/O contract of Apple's models (see docs/coreml.md), vocab.json and merges.txt beside them, and
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConversionFailed, EngineError
from ..models.coreml_folder import FACTS_FILE, PART_SUFFIXES, PARTS, describe

ATTENTIONS = ("original", "split_einsum")
# Apple's torch2coreml.py --quantize-nbits palettizes the text encoders and the Unets only, the
# VAE and the safety checker stay float16; and it leaves the embedding table (a gather's) alone.
PALETTIZED = ("TextEncoder", "Unet")
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
) -> Path:
    """Convert the networks the runtime runs (``parts``: some of them, as Apple's converter allows);
    ``size`` is (width, height), default the model's own."""
    from . import split_einsum

    if attention not in ATTENTIONS:
        raise ConversionFailed(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTIONS)}")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ConversionFailed(f"unknown parts {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    ct = _coremltools()
    loaded = _load(source, progress)
    unet, vae = loaded["unet"], loaded["vae"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    width, height = size or (unet.config.sample_size * factor,) * 2
    if width % factor or height % factor:
        raise ConversionFailed(f"size {width}x{height} must be a multiple of the VAE's factor {factor}")
    if attention == "split_einsum":
        split_einsum.apply(unet)
    latent = (unet.config.in_channels, height // factor, width // factor)
    hidden = loaded["text_encoder"].config.hidden_size
    name = _slug(source)
    out.mkdir(parents=True, exist_ok=True)

    jobs: list[tuple[str, torch.nn.Module, dict[str, tuple[int, ...]], list[str]]] = [
        ("TextEncoder", _TextEncoder(loaded["text_encoder"]), {"input_ids": (1, TOKENS)}, ["last_hidden_state"]),
        ("Unet", _Unet(unet),
         {"sample": (UNET_BATCH, *latent), "timestep": (UNET_BATCH,), "encoder_hidden_states": (UNET_BATCH, hidden, 1, TOKENS)},
         ["noise_pred"]),
        ("VAEDecoder", _Decoder(vae), {"z": (1, *latent)}, ["image"]),
        ("VAEEncoder", _Encoder(vae), {"x": (1, 3, height, width)}, ["latent"]),
    ]
    checker = loaded["safety_checker"]
    if checker is not None:
        pixels = checker.config.vision_config.image_size
        jobs.append(("SafetyChecker", _SafetyChecker(checker),
                     {"clip_input": (1, 3, pixels, pixels), "images": (1, height, width, 3), "adjustment": (1,)},
                     ["filtered_images", "has_nsfw_concepts"]))
    elif "SafetyChecker" in parts:
        progress(f"{source} has no safety checker: none converted")
    jobs = [job for job in jobs if job[0] in parts]
    for number, (part, module, inputs, outputs) in enumerate(jobs, 1):
        started = time.monotonic()
        progress(f"[{number}/{len(jobs)}] {part}: tracing and converting …")
        examples = tuple(torch.zeros(shape) if key != "timestep" else torch.full(shape, 999.0) for key, shape in inputs.items())
        try:
            with torch.no_grad():
                traced = torch.jit.trace(module.eval(), examples, strict=False, check_trace=False)
            model = ct.convert(
                traced,
                inputs=[ct.TensorType(key, shape=shape, dtype=np.float32) for key, shape in inputs.items()],
                outputs=[ct.TensorType(key, dtype=np.float32) for key in outputs],
                convert_to="mlprogram",
                minimum_deployment_target=ct.target.macOS13,
                compute_precision=ct.precision.FLOAT16,
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
    if checker is not None:  # the safety checker's CLIP preprocessing (its size may not be 224)
        shutil.copyfile(loaded["feature_extractor"], out / "preprocessor_config.json")
    facts = {
        "source": source, "attention": attention, "palettized": palettize,
        "scaling_factor": float(vae.config.get("scaling_factor", 0.18215)),
        "scheduler_config": loaded["scheduler_config"],
    }
    (out / FACTS_FILE).write_text(json.dumps(facts, indent=2) + "\n")
    if shutil.which("xcrun"):
        swift_resources(out, name, progress)
    else:
        progress(f"{RESOURCES}/ for Apple's Swift CLI and Diffusers for Mac: skipped, compiling to .mlmodelc needs "
                 "xcrun coremlcompiler (macOS with Xcode's command-line tools); diffusiond loads the packages as they are")
    return out


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


def _load(source: str, progress: Progress) -> dict[str, Any]:
    """The networks and configs of a diffusers-format folder or Hub repo (pulled into the HF cache
    as the torch runtime pulls it: float32 weights, configs, tokenizer)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

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
    index = json.loads((folder / "model_index.json").read_text())
    feature_extractor = folder / "feature_extractor" / "preprocessor_config.json"
    with_checker = (index.get("safety_checker") or [None])[0] is not None and feature_extractor.is_file()
    try:
        checker = None
        if with_checker:
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

            checker = StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker").eval()
        return {
            "safety_checker": checker, "feature_extractor": feature_extractor,
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
            "unet": UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
            "vae": AutoencoderKL.from_pretrained(folder / "vae").eval(),
            "tokenizer_dir": folder / "tokenizer",
            "scheduler_config": json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
        }
    except (OSError, ValueError) as exc:
        raise ConversionFailed(f"cannot load {source}: {exc}") from exc


class _TextEncoder(torch.nn.Module):
    """Apple's TextEncoder: float32 token ids (1, 77) → last_hidden_state (1, 77, C)."""

    def __init__(self, text_encoder: Any) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: Any) -> Any:
        return self.text_encoder(input_ids.long(), return_dict=False)[0]


class _Unet(torch.nn.Module):
    """Apple's Unet: encoder_hidden_states in (B, C, 1, 77), the layout the Neural Engine prefers."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any) -> Any:
        hidden = encoder_hidden_states.squeeze(2).transpose(1, 2)
        return self.unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]


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
