"""A Core ML model folder in Apple's layout, its networks' declared inputs and outputs, and the
facts the pipeline reads from it.

The shapes come from each network's own description: a compiled .mlmodelc says them in its
metadata.json, an .mlpackage in its spec. Only declared inputs are relied on: Apple's compiled
models declare their outputs with an empty shape (`"shape": "[]"`). The latent size and channels
come from the Unet's `sample`, the VAE's factor from VAEEncoder's `x` against it (8 without an
encoder). What no shape tells — the VAE's scaling factor and the scheduler config — comes from
`diffusiond.json`, which `diffusiond convert` writes; Apple's published models lack it and get
their family's (Stable Diffusion's, or SDXL base 1.0's).

The family comes from the parts and the Unet's ports, as Apple's Swift pipeline tells them apart:
Stable Diffusion 1.x/2.x (TextEncoder, a Unet of sample, timestep, encoder_hidden_states), SDXL
(TextEncoder2 beside it, a Unet that also takes text_embeds and time_ids of width 6), the SDXL
refiner (TextEncoder2 only, time_ids of width 5), and SDXL with its refiner beside it (UnetRefiner).
SD3 (MultiModalDiffusionTransformer) and ControlNet (ControlledUnet, other Unet inputs) are
refused at open, naming what is found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import ModelInvalid
from .facts import default_guidance_of, read_facts
from .family import SD, SDXL, SDXL_REFINER

SECOND_TOKENIZER = "tokenizer_2"  # `diffusiond convert` copies SDXL's (it pads with "!") beside the models
# What `diffusiond convert` makes (UnetRefiner: with --refiner, beside an SDXL base).
PARTS = ("TextEncoder", "TextEncoder2", "Unet", "UnetRefiner", "VAEDecoder", "VAEEncoder", "SafetyChecker")
# Compiled models are named TextEncoder.mlmodelc …; packages Stable_Diffusion_version_<name>_text_encoder.mlpackage
# (torch2coreml.py's bundle_resources_for_swift_cli pairs them).
PART_SUFFIXES = {
    "TextEncoder": "text_encoder", "TextEncoder2": "text_encoder_2",
    "Unet": "unet", "UnetChunk1": "unet_chunk1", "UnetChunk2": "unet_chunk2",
    "UnetRefiner": "refiner", "UnetRefinerChunk1": "refiner_chunk1", "UnetRefinerChunk2": "refiner_chunk2",
    "VAEDecoder": "vae_decoder", "VAEEncoder": "vae_encoder", "SafetyChecker": "safety_checker",
}
# A base with its refiner beside it: the refiner's Unet parts, by the name the refiner alone gives them.
REFINER_PARTS = {"UnetRefiner": "Unet", "UnetRefinerChunk1": "UnetChunk1", "UnetRefinerChunk2": "UnetChunk2"}
# Stable Diffusion 1.x and 2 base ship this scheduler config and scaling factor.
SD_FACTS: dict[str, Any] = {
    "scaling_factor": 0.18215,
    "scheduler_config": {
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "clip_sample": False, "prediction_type": "epsilon",
    },
}
# SDXL base 1.0's (stabilityai/stable-diffusion-xl-base-1.0: vae/config.json, scheduler/scheduler_config.json,
# model_index.json), which Apple's SDXL repos were converted from; the refiner 1.0 has the same
# scheduler and VAE, requires_aesthetics_score and no force_zeros_for_empty_prompt.
SDXL_FACTS: dict[str, Any] = {
    "scaling_factor": 0.13025,
    "scheduler_config": {
        "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
        "interpolation_type": "linear", "prediction_type": "epsilon", "use_karras_sigmas": False,
        "clip_sample": False, "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    },
}
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
XL_UNET_INPUTS = ("time_ids", "text_embeds")  # SDXL's added conditioning, torch2coreml.py --xl-version
REFINER_TIME_IDS = 5  # original size, crop, aesthetic score; the base's 6 end with the target size
DEFAULT_VAE_SCALE_FACTOR = 8  # every Stable Diffusion VAE; used when no VAEEncoder tells
# Networks of the families not supported, by the names torch2coreml.py gives them.
UNSUPPORTED = {
    "MultiModalDiffusionTransformer": "Stable Diffusion 3", "ControlledUnet": "ControlNet",
    "ControlledUnetChunk1": "ControlNet",
}
_UNSUPPORTED_PACKAGES = {"MultiModalDiffusionTransformer": "mmdit",
                         "ControlledUnet": "control-unet", "ControlledUnetChunk1": "control-unet_chunk1"}
_PALETTE_OP = "constexprLutToDense"  # in a compiled ML program's op histogram: palettized weights (macOS 14)
_SPEC_DTYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "DOUBLE": "float64", "INT32": "int32", "INT8": "int8"}
_METADATA_DTYPES = {"Float32": "float32", "Float16": "float16", "Double": "float64", "Int32": "int32"}


@dataclass(frozen=True)
class Port:
    """One declared input or output of a network."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # a NumPy dtype name


@dataclass(frozen=True)
class Description:
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]  # shapes may be empty (Apple's compiled models): read names only
    palettized: bool = False

    def input(self, name: str) -> Port:
        return _port(self.inputs, name)

    def output(self, name: str) -> Port:
        return _port(self.outputs, name)


def _port(ports: tuple[Port, ...], name: str) -> Port:
    for port in ports:
        if port.name == name:
            return port
    raise ModelInvalid(f"the model declares no {name!r}; it has {', '.join(p.name for p in ports)}")


def description_from_spec(spec: Any) -> Description:
    """The ports a Core ML spec (protobuf Model) declares."""
    from coremltools.proto import FeatureTypes_pb2

    names = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType

    def ports(features: Any) -> tuple[Port, ...]:
        return tuple(
            Port(f.name, tuple(int(d) for d in f.type.multiArrayType.shape),
                 _SPEC_DTYPES[names.Name(f.type.multiArrayType.dataType)])
            for f in features
        )

    return Description(ports(spec.description.input), ports(spec.description.output))


def description_from_metadata(metadata: list[dict[str, Any]]) -> Description:
    """The ports a compiled model's metadata.json declares (`inputSchema`, `outputSchema`)."""

    def ports(schema: list[dict[str, Any]]) -> tuple[Port, ...]:
        return tuple(
            Port(p["name"], tuple(json.loads(p["shape"])), _METADATA_DTYPES[p["dataType"]])
            for p in schema if p.get("type", "MultiArray") == "MultiArray"
        )

    entry = metadata[0]
    histogram = entry.get("mlProgramOperationTypeHistogram", {})
    return Description(ports(entry["inputSchema"]), ports(entry["outputSchema"]),
                       any(op.endswith(_PALETTE_OP) for op in histogram))


def describe(path: Path) -> Description:
    """A network's declared ports, from a compiled .mlmodelc or an .mlpackage."""
    try:
        if path.suffix == ".mlmodelc":
            return description_from_metadata(json.loads((path / "metadata.json").read_text()))
        import coremltools as ct

        return description_from_spec(ct.utils.load_spec(str(path)))
    except ImportError:
        raise ModelInvalid(f"reading {path.name} needs coremltools: pip install 'diffusiond[coreml]'") from None
    except (OSError, ValueError, KeyError, IndexError, RuntimeError) as exc:  # RuntimeError: no package manifest
        raise ModelInvalid(f"cannot read the description of {path}: {exc}") from exc


def _find(folder: Path, part: str, suffix: str) -> Path | None:
    compiled = folder / f"{part}.mlmodelc"
    if compiled.is_dir():
        return compiled
    return next(iter(sorted(folder.glob(f"*_{suffix}.mlpackage"))), None)


def find_parts(folder: Path) -> dict[str, Path]:
    """Each network in `folder` by its Apple name; a compiled model beats a package of the same part.
    With both a Unet and its two chunks (Apple's 1.4 split_einsum, the pcuenq archives) only the
    chunks, as Apple's pipeline loads them: loading both costs ~1.7 GB and another compile. The
    same for the refiner's Unet and its chunks."""
    parts = {part: path for part, suffix in PART_SUFFIXES.items() if (path := _find(folder, part, suffix))}
    for whole in ("Unet", "UnetRefiner"):
        if {f"{whole}Chunk1", f"{whole}Chunk2"} <= parts.keys():
            parts.pop(whole, None)
    return parts


def unsupported(folder: Path, parts: dict[str, Description]) -> list[str]:
    """What makes a Core ML folder a family diffusiond does not run: the networks, the Unet's other inputs."""
    found = [f"{family} ({part})" for part, family in UNSUPPORTED.items()
             if _find(folder, part, _UNSUPPORTED_PACKAGES[part])]
    unet = parts.get("Unet") or parts.get("UnetChunk1")
    extra = [p.name for p in unet.inputs if p.name not in UNET_INPUTS + XL_UNET_INPUTS] if unet else []
    if extra:
        found.append(f"a Unet that takes {', '.join(extra)} beyond {', '.join(UNET_INPUTS + XL_UNET_INPUTS)}")
    return found


def time_ids_width(unet: Description) -> int | None:
    """How many numbers SDXL's time_ids hold per row (6 base, 5 refiner); None: not an SDXL Unet.
    Apple's first SDXL Unets declare time_ids flat, (12,) for two rows (StableDiffusionXLPipeline.swift)."""
    names = {p.name for p in unet.inputs}
    if not set(XL_UNET_INPUTS) <= names:
        return None
    shape = unet.input("time_ids").shape
    return shape[-1] if len(shape) > 1 else shape[0] // unet.input("sample").shape[0]


def find_tokenizer(path: Path) -> Path | None:
    """Where vocab.json and merges.txt lie: the models' own folder, else up to three above (a repo's top)."""
    for folder in (path, *list(path.parents)[:3]):
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return folder
    return None


def is_coreml_folder(folder: Path) -> bool:
    parts = find_parts(folder)
    return bool({"TextEncoder", "TextEncoder2"} & parts.keys()) and ("Unet" in parts or "UnetChunk1" in parts)


FAMILIES = (SD, SDXL, SDXL_REFINER)


@dataclass(frozen=True)
class CoreMLFolder:
    """The facts the pipeline reads, like ModelFolder's, for a folder of Core ML models.

    `refiner` True: the refiner beside an SDXL base in the same folder (Apple's base-with-refiner),
    its UnetRefiner parts taken as its Unet, with the base's TextEncoder2 and VAE."""

    path: Path
    name: str
    refiner: bool = False
    runtime = "coreml"
    fixed_size = True  # Core ML models take the one size they were converted for

    @classmethod
    def open(cls, path: Path, name: str) -> CoreMLFolder:
        folder = cls(path.resolve(), name)
        parts = folder.parts
        missing = []
        if not {"TextEncoder", "TextEncoder2"} & parts.keys():
            missing.append("TextEncoder")
        if "VAEDecoder" not in parts:
            missing.append("VAEDecoder")
        if "Unet" not in parts and not {"UnetChunk1", "UnetChunk2"} <= parts.keys():
            missing.append("Unet (or UnetChunk1 and UnetChunk2)")
        if find_tokenizer(folder.path) is None:
            missing.append("vocab.json and merges.txt")
        if missing:
            raise ModelInvalid(f"Core ML model {name} lacks {', '.join(missing)} in {folder.path}")
        others = unsupported(folder.path, {p: folder.descriptions[p] for p in ("Unet", "UnetChunk1") if p in parts})
        if others:
            raise ModelInvalid(f"Core ML model {name} is not supported: it has {'; '.join(others)}. "
                               f"Core ML runs Stable Diffusion 1.x, 2.x and XL; use a diffusers-format model with the torch runtime")
        folder._check_family()
        if folder.has_refiner:
            folder.refiner_model._check_family()
        return folder

    def _check_family(self) -> None:
        """The text encoders the Unet's family needs, as Apple's Swift pipeline loads them."""
        parts, family = self.parts, self.family
        needs = {SD: ("TextEncoder",), SDXL: ("TextEncoder", "TextEncoder2"), SDXL_REFINER: ("TextEncoder2",)}[family]
        lacking = [p for p in needs if p not in parts]
        if lacking:
            raise ModelInvalid(f"Core ML model {self.name} has a {_FAMILY_NAMES[family]} Unet but no "
                               f"{' or '.join(lacking)} in {self.path}")
        if family == "sd" and "TextEncoder2" in parts:
            raise ModelInvalid(f"Core ML model {self.name} has TextEncoder2 (SDXL's) but its Unet takes no "
                               f"{' or '.join(XL_UNET_INPUTS)}: the parts of two models are mixed in {self.path}")
        width = time_ids_width(self._unet)
        if width not in (None, 6, REFINER_TIME_IDS):
            raise ModelInvalid(f"Core ML model {self.name}: its Unet's time_ids hold {width} numbers a row; "
                               f"SDXL's take 6 (base) or {REFINER_TIME_IDS} (refiner)")

    @cached_property
    def parts(self) -> dict[str, Path]:
        found = find_parts(self.path)
        if self.refiner:
            unets = {REFINER_PARTS[p]: path for p, path in found.items() if p in REFINER_PARTS}
            return {**{p: path for p, path in found.items() if p in ("TextEncoder2", "VAEDecoder", "VAEEncoder")}, **unets}
        return {p: path for p, path in found.items() if p not in REFINER_PARTS}

    @cached_property
    def descriptions(self) -> dict[str, Description]:
        return {part: describe(path) for part, path in self.parts.items()}

    @property
    def has_refiner(self) -> bool:
        """An SDXL base with its refiner's Unet beside it (Apple's coreml-stable-diffusion-xl-base-with-refiner)."""
        return not self.refiner and any(p in REFINER_PARTS for p in find_parts(self.path))

    @property
    def refiner_model(self) -> CoreMLFolder:
        """The refiner beside this base, as a model of its own."""
        if not self.has_refiner:
            raise ModelInvalid(f"Core ML model {self.name} has no UnetRefiner beside it")
        return CoreMLFolder(self.path, f"{self.name} (refiner)", refiner=True)

    @property
    def _unet(self) -> Description:
        return self.descriptions["Unet" if "Unet" in self.parts else "UnetChunk1"]

    @property
    def family(self) -> str:
        """SD (1.x, 2.x), SDXL or SDXL_REFINER (models/family.py), from the Unet's ports as Apple's Swift pipeline tells:
        text_embeds and time_ids make it SDXL, time_ids of width 5 the refiner."""
        width = time_ids_width(self._unet)
        if width is None:
            return SD
        return SDXL_REFINER if width == REFINER_TIME_IDS else SDXL

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """The text encoders the pipeline runs, in order: SD's one, SDXL's two, the refiner's second."""
        return {SD: ("TextEncoder",), SDXL: ("TextEncoder", "TextEncoder2"), SDXL_REFINER: ("TextEncoder2",)}[self.family]

    @property
    def requires_aesthetics_score(self) -> bool:
        """The refiner's time_ids end with an aesthetic score instead of the target size."""
        return self.family == SDXL_REFINER

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL base: an empty negative prompt is zeros, not its encoding (diffusers' rule; the source's
        model_index.json via diffusiond.json, else SDXL base 1.0's). Apple's Swift pipeline encodes it."""
        return self.family != SD and bool(self.facts.get("force_zeros_for_empty_prompt", self.family == SDXL))

    @cached_property
    def facts(self) -> dict[str, Any]:
        defaults = SD_FACTS if self.family == "sd" else SDXL_FACTS
        facts = read_facts(self.path, self.name)
        if self.refiner:  # the converter keeps the refiner's own facts apart
            facts = {**facts, **facts.get("refiner", {})}
        return {**defaults, **facts}

    @property
    def default_guidance(self) -> float:
        """The guidance a request that names none gets (facts.py); the converter keeps its source's."""
        return default_guidance_of(self.facts, self.name)

    @property
    def merged_loras(self) -> tuple[tuple[str, float], ...]:
        """(hash, weight) of each LoRA `diffusiond convert --lora` merged into these weights."""
        return tuple((str(entry["hash"]), float(entry["weight"])) for entry in self.facts.get("loras", []))

    @property
    def source(self) -> str | None:
        """The diffusers-format model diffusiond converted this one from (a Hub id or a folder); None
        for Core ML models converted elsewhere (Apple's)."""
        source = self.facts.get("source")
        return source if isinstance(source, str) else None

    @property
    def _sample(self) -> Port:
        return self._unet.input("sample")

    @property
    def vae_scale_factor(self) -> int:
        """Image rows per latent row: VAEEncoder's `x` against the Unet's `sample` (outputs may declare no shape)."""
        if "VAEEncoder" not in self.parts:
            return DEFAULT_VAE_SCALE_FACTOR
        return self.descriptions["VAEEncoder"].input("x").shape[-2] // self._sample.shape[-2]

    @property
    def palettized(self) -> bool:
        """Palettized weights (6-bit lookup tables): Core ML runs them from macOS 14 on."""
        return bool(self.facts.get("palettized")) or any(d.palettized for d in self.descriptions.values())

    @property
    def latent_channels(self) -> int:
        return self._sample.shape[1]

    @property
    def default_shape(self) -> tuple[int, int]:
        """(width, height): the one size the models were converted for, from the Unet's sample port."""
        return self._sample.shape[-1] * self.vae_scale_factor, self._sample.shape[-2] * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        return float(self.facts["scaling_factor"])

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self.facts["scheduler_config"]

    @cached_property
    def tokenizer_dirs(self) -> tuple[Path, ...]:
        """The folder with vocab.json and merges.txt (the models' own, else the repo's top, two up),
        once per text encoder: Apple's layout has one CLIP vocabulary for both of SDXL's. The second
        encoder's is `tokenizer_2/` where the converter wrote it (with SDXL's "!" padding)."""
        folder = find_tokenizer(self.path)
        if folder is None:
            raise ModelInvalid(f"Core ML model {self.name} lacks vocab.json and merges.txt in {self.path}")
        second = self.path / SECOND_TOKENIZER
        dirs = {"TextEncoder": folder, "TextEncoder2": second if find_tokenizer(second) == second else folder}
        return tuple(dirs[part] for part in self.text_encoders)

    @property
    def has_safety_checker(self) -> bool:
        return "SafetyChecker" in self.parts

    @property
    def feature_extractor_dir(self) -> Path | None:
        """The safety checker's preprocessing the converter copies; None: CLIP's standard (Apple's)."""
        return self.path if (self.path / "preprocessor_config.json").is_file() else None


_FAMILY_NAMES = {SD: "Stable Diffusion 1.x/2.x", SDXL: "Stable Diffusion XL", SDXL_REFINER: "Stable Diffusion XL refiner"}
